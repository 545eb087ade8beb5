"""Beyond one machine: `srpo.py train` under torchrun agents that meet through a c10d rendezvous, as on several nodes
(here two agents on this machine, each its own process tree, talking over 127.0.0.1 with gloo), against one agent
with the same world size; and --hybrid (HYBRID_SHARD: FSDP2 over a 2-D DeviceMesh, shard within a node, replicate
across nodes). Tiny models only.
"""

import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from references import rel_err, spawned
from test_sharded_saves import adamw_state
from test_train import ROOT, SMALL, TORCHRUN, cli, log_lines, weights
from torch.distributed.tensor import Replicate, Shard

import flux2_model as f2
import flux_model as fm
import srpo
from common.util import InputError
from training import checkpoints, memory, runtime

# --batch 4: a multiple of every world size here (2 and 4 processes); a checkpoint after each of the 2 steps
ARGS = ["train", "--demo", "random", "--device", "cpu", "--batch", "4", "--steps", "2", "--save-every", "1", "--keep",
        "2", *SMALL]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agents(nodes, per_node, out, *flags):
    """`nodes` torchrun agents started together, as one per machine: --nnodes and a c10d rendezvous at 127.0.0.1 (the
    first agent hosts its store, as the first node of tools/slurm_srpo.sh does); each runs per_node gloo processes.
    All must exit 0."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
         f"--rdzv-conf=is_host={node == 0}", "srpo.py", *ARGS, *flags, "--out", out],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for node in range(nodes)]
    for agent in started:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-3000:]


# srun and scontrol as on a job of SLURM_JOB_NUM_NODES nodes, all of them this machine: srun starts its command once
# a node, here, and exits with the last non-zero code (--kill-on-bad-exit aside); the first node is 127.0.0.1
FAKE_SLURM = {
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & done
rc=0; for job in $(jobs -p); do wait "$job" || rc=$?; done; exit $rc
""",
    "scontrol": "#!/usr/bin/env bash\necho 127.0.0.1\n",
}


def slurm(nodes, per_node, out, tmp, *flags):
    """tools/slurm_srpo.sh as sbatch runs it on `nodes` nodes of per_node GPUs, with FAKE_SLURM: its torchrun
    agents, one a node, meet at 127.0.0.1 (each thinks it is the first node: one hosts the store, the other joins)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])  # and this python
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=path, SLURM_JOB_NODELIST="node[1-2]",
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_GPUS_ON_NODE=str(per_node), SLURM_JOB_ID=str(os.getpid()),
               MASTER_PORT=str(free_port()))
    r = subprocess.run(["bash", "tools/slurm_srpo.sh", *ARGS[1:], *flags, "--out", out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def one_agent(tmp_path_factory):
    """The reference: one torchrun agent running 2 gloo processes, --batch 4 for 2 steps."""
    out = str(tmp_path_factory.mktemp("one-agent"))
    cli(*TORCHRUN, *ARGS, "--out", out)
    return out


def optimizer_state(out, step):
    """The AdamW state of a torchrun checkpoint, read whole from its shards (each rank saves its own)."""
    return adamw_state(os.path.join(out, checkpoints.CHECKPOINT.format(step)))


def test_two_agents_on_two_nodes_give_the_weights_of_one_agent(one_agent, tmp_path):
    """torchrun --nnodes 2 (one process each, a c10d rendezvous) == torchrun --nproc-per-node 2: the same world of 2
    gloo processes, so bit for bit the same checkpoint after each step, log and AdamW state. --out is one folder
    both nodes see (a shared file system): rank 0 writes it."""
    out = str(tmp_path)
    agents(2, 1, out)
    for step in (1, 2):
        a, b = (os.path.join(folder, checkpoints.CHECKPOINT.format(step), "diffusion_pytorch_model.safetensors")
                for folder in (one_agent, out))
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), step
    one, two = optimizer_state(one_agent, 2), optimizer_state(out, 2)
    assert all(torch.equal(one[n][k], two[n][k]) for n in one for k in one[n])
    assert log_lines(out) == log_lines(one_agent)  # but their "seconds"


@pytest.mark.slow
def test_slurm_script_with_hybrid_shard_over_two_nodes_of_two_processes_trains_as_fsdp(one_agent, tmp_path):
    """tools/slurm_srpo.sh --hybrid on 2 nodes x 2 processes: FSDP2 over the 2-D mesh (2 nodes replicating, 2
    processes sharding) gives the weights and AdamW state of FSDP2 over 2 processes running the same global batch
    (1e-5: the gradient is summed in another order), and its checkpoint holds the whole model."""
    out = str(tmp_path / "run")
    slurm(2, 2, out, tmp_path, "--hybrid")
    a, b = weights(one_agent, 2), weights(out, 2)
    assert a.keys() == b.keys()
    assert max(rel_err(b[k], a[k]) for k in a) <= 1e-5
    assert max(rel_err(a[k], weights(one_agent, 1)[k]) for k in a) > 1e-3  # the weights did move
    one, hybrid = optimizer_state(one_agent, 2), optimizer_state(out, 2)
    assert one.keys() == hybrid.keys() == {name for name, _ in fm.Flux(fm.FluxConfig.preset("tiny")).named_parameters()}
    assert all(torch.allclose(hybrid[n]["exp_avg"], one[n]["exp_avg"], rtol=1e-4, atol=1e-9) for n in one)


def test_hybrid_shards_each_block_over_a_2d_mesh():
    """fsdp_shard with Ranks.node: every parameter a DTensor on the (replicate, shard) mesh, replicated across nodes
    and sharded by rows within one, holding rank 0's weights (here a group of one: a 1 x 1 mesh)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        cfg = fm.FluxConfig.preset("tiny")
        full = fm.Flux(cfg)
        with torch.device("meta"):
            model = fm.Flux(cfg)
        runtime.fsdp_shard(model, full.state_dict, runtime.Ranks(0, 1, torch.device("cpu"), node=1))
        for (name, p), want in zip(model.named_parameters(), full.parameters(), strict=True):
            assert p.device_mesh.mesh_dim_names == ("replicate", "shard"), name
            assert p.placements == (Replicate(), Shard(0)) and torch.equal(p.full_tensor(), want), name
    finally:
        torch.distributed.destroy_process_group()


def test_hybrid_needs_torchrun_and_equal_nodes(monkeypatch):
    """--hybrid in one process, or with a node count that does not divide the world: one line, before any group."""
    with pytest.raises(InputError, match="--hybrid .* needs torchrun"):
        runtime.init_ranks("cpu", hybrid=True)
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(InputError, match=r"6 processes, 4 on this node"):
        runtime.init_ranks("cpu", hybrid=True)


def test_hybrid_memory_is_fsdp_over_one_node():
    """HYBRID_SHARD on 4 nodes x 8 GPUs holds on each GPU what FSDP2 over 8 does (FLUX.1-dev full: ~36 GB, against
    ~18 GB over all 32), and the pre-flight counts it so: FLUX.2 [dev] full, which FSDP2 over 32 x 80 GB takes, is
    refused with --hybrid on 4 x 8."""
    hybrid, flat = runtime.Ranks(0, 32, torch.device("cpu"), node=8), runtime.Ranks(0, 32, torch.device("cpu"))
    assert (hybrid.shards, flat.shards) == (8, 32)
    e = memory.preflight_terms(fm.FluxConfig.preset("flux-dev"), 0, 720, 720)
    assert memory.per_gpu(e, hybrid.shards) == memory.per_gpu(e, 8)
    assert round(memory.per_gpu(e, 8) - memory.per_gpu(e, 32)) == 18
    dev, h100 = f2.Flux2Config.preset("flux2-dev"), 80 * 2**30 * 0.99
    assert memory.memory_error(dev, srpo.TrainConfig(), flat.shards, False, h100, 2048 * 2**30) is None
    assert memory.memory_error(dev, srpo.TrainConfig(), hybrid.shards, False, h100, 2048 * 2**30) is not None


def _load_in_turn(rank, world, store, log, fail):
    """One of `world` gloo processes of one node: Ranks.in_turn of a load that logs when it starts and ends."""
    import time

    import torch.distributed as dist

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    ranks = runtime.Ranks(rank, world, torch.device("cpu"))

    def load():
        with open(log, "a") as f:
            f.write(f"start {rank} {time.monotonic()}\n")
        time.sleep(0.3)
        if rank == fail:
            raise InputError(f"process {rank} refuses")
        with open(log, "a") as f:
            f.write(f"end {rank} {time.monotonic()}\n")
        return rank

    try:
        assert ranks.in_turn(load) == rank
        outcome = "ok"
    except InputError as e:
        outcome = str(e)
    with open(f"{log}.{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [None, 1])
def test_the_processes_of_a_node_load_their_models_in_turn(fail, tmp_path):
    """Ranks.in_turn over 3 real gloo processes: each load starts after the one before has ended (what a load stages
    on the host is there once per node), and a refusal on one process is raised on all of them."""
    log = str(tmp_path / "log")
    outcomes = spawned(_load_in_turn, 3, tmp_path, log, fail)
    if fail is not None:
        assert outcomes == ["process 1 refuses"] * 3
        return
    assert outcomes == ["ok"] * 3
    with open(log) as f:
        events = sorted((float(t), kind, int(rank)) for kind, rank, t in (line.split() for line in f))
    assert [(kind, rank) for _, kind, rank in events] == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                                                          ("start", 2), ("end", 2)]
