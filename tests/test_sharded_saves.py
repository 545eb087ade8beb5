"""Checkpoints of torchrun runs (training/checkpoints.py): each rank writes its own shards of AdamW's state with
torch.distributed.checkpoint, rank 0 the transformer once; a save of N processes resumes with M; a SIGKILL at any
moment of a save leaves the previous checkpoint usable. Two gloo processes on the CPU, as tests/test_train.py's FSDP
tests."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from references import rel_err, spawned
from safetensors.torch import load_file
from test_faults import disk, fill  # noqa: F401  disk is a fixture
from test_train import (  # noqa: F401  fsdp_runs is a fixture
    FSDP_ARGS,
    ROOT,
    TORCHRUN,
    cli,
    fsdp_runs,
    log_lines,
    run_cli,
    weights,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import cli as command_line
import flux_model as fm
from common import util
from training import checkpoints, runtime
from weights import flux_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def adamw_state(folder):
    """A checkpoint's whole AdamW state {name: {step, exp_avg, exp_avg_sq}} in this one process: training.pt's (one
    process saved it) or its shards' (torchrun), each tensor read whole by DCP."""
    shards = os.path.join(folder, checkpoints.SHARDS)
    if not os.path.isdir(shards):
        return torch.load(os.path.join(folder, "training.pt"), weights_only=True)["optimizer"]["state"]
    with warnings.catch_warnings():  # DCP's note that it reads in one process: what this does
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=shards)["state"]


def checkpoint(out, step):
    return os.path.join(out, checkpoints.CHECKPOINT.format(step))


def resume_from(run, step, out):
    """out holding run's checkpoint of `step` and its log, as a run stopped after it leaves them."""
    shutil.copytree(checkpoint(run, step), checkpoint(out, step))
    shutil.copy(os.path.join(run, "log.jsonl"), out)
    return out


def test_two_processes_write_their_own_adamw_shards_and_rank_0_the_weights_once(fsdp_runs):  # noqa: F811
    """The 2-process checkpoint: the transformer in one file, AdamW's state in one shard file per rank (together the
    1-process run's state), training.pt without it; rank 0 writes the weights and half the state."""
    one, two = checkpoint(fsdp_runs[0], 2), checkpoint(fsdp_runs[1], 2)
    assert sorted(os.listdir(os.path.join(two, checkpoints.SHARDS))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert torch.load(os.path.join(two, "training.pt"), weights_only=True)["optimizer"].keys() == {"param_groups"}
    assert checkpoints.SHARDS not in os.listdir(one)  # one process: today's single training.pt

    def size(folder, *names):
        return sum(os.path.getsize(os.path.join(folder, name)) for name in names)

    weights_file = "diffusion_pytorch_model.safetensors"
    before = size(one, weights_file, "training.pt")  # what rank 0 wrote when it gathered AdamW's state
    after = size(two, weights_file, "training.pt", f"{checkpoints.SHARDS}/__0_0.distcp",
                 f"{checkpoints.SHARDS}/.metadata")
    print(f"rank 0 writes {before} bytes gathered, {after} sharded (weights {size(one, weights_file)})")
    assert after < 0.75 * before


def test_a_two_process_checkpoint_resumes_in_one_process(fsdp_runs, tmp_path, monkeypatch):  # noqa: F811
    """2 -> 1: the one process reads every shard whole, the AdamW state it trains on is the saved one bit for bit,
    and its step 2 is the uninterrupted 2-process run's (to 1e-5, as 1 and 2 processes are)."""
    two = fsdp_runs[1]
    out = resume_from(two, 1, str(tmp_path))
    loaded = []
    load_shards = checkpoints.load_shards

    def recording(model, opt, folder, groups):
        load_shards(model, opt, folder, groups)
        # copies: the fused AdamW updates its state in place at every step after this
        loaded.append({name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in model.named_parameters()})

    monkeypatch.setattr(checkpoints, "load_shards", recording)
    command_line.main([*FSDP_ARGS, "--out", out, "--resume"])
    saved = adamw_state(checkpoint(two, 1))
    assert loaded and loaded[0].keys() == saved.keys()
    assert all(torch.equal(loaded[0][n][k], saved[n][k]) for n in saved for k in saved[n])
    a, b = weights(two, 2), weights(out, 2)
    assert max(rel_err(b[k], a[k]) for k in a) <= 1e-5
    assert checkpoints.SHARDS not in os.listdir(checkpoint(out, 2))  # saved again as one process saves


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_processes(fsdp_runs, tmp_path):  # noqa: F811
    """1 -> 2: rank 0 reads training.pt and broadcasts it into the shards (as before), the next save is sharded, and
    step 2 is the uninterrupted 1-process run's (to 1e-5)."""
    one = fsdp_runs[0]
    out = resume_from(one, 1, str(tmp_path))
    cli(*TORCHRUN, *FSDP_ARGS, "--out", out, "--resume")
    a, b = weights(one, 2), weights(out, 2)
    assert max(rel_err(b[k], a[k]) for k in a) <= 1e-5
    x, y = adamw_state(checkpoint(one, 2)), adamw_state(checkpoint(out, 2))
    assert all(torch.allclose(y[n]["exp_avg"], x[n]["exp_avg"], rtol=1e-4, atol=1e-9) for n in x)
    assert os.path.isdir(os.path.join(checkpoint(out, 2), checkpoints.SHARDS))


def test_a_checkpoint_whose_shard_index_is_gone_is_refused_in_one_line(fsdp_runs, tmp_path, capsys):  # noqa: F811
    out = resume_from(fsdp_runs[1], 2, str(tmp_path))
    os.remove(os.path.join(checkpoint(out, 2), checkpoints.SHARDS, ".metadata"))
    code, err = run_cli([*FSDP_ARGS, "--out", out, "--resume"], capsys)
    assert code == 2 and len(err) == 1 and f"{checkpoints.SHARDS}: not the AdamW shards" in err[0], err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process saves here
def test_a_full_disk_during_the_shards_is_a_fault_and_leaves_no_half_checkpoint(disk):  # noqa: F811
    """A real full disk under DCP's writer: its CheckpointException (which every rank gets) becomes the Fault of the
    OSError inside it, and rank 0 removes the checkpoint's folder."""
    folder = os.path.join(disk, checkpoints.CHECKPOINT.format(1))
    os.makedirs(folder)
    adamw = {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(1 << 20), "exp_avg_sq": torch.ones(1 << 20)}}
    fill(disk, 1 << 20)  # room for a quarter of the 8 MiB
    with pytest.raises(util.Fault, match="could not write the checkpoint .*No space left on device"):
        checkpoints.save_shards(adamw, folder, f"the checkpoint {folder}", runtime.Ranks(0, 1, torch.device("cpu")))
    assert not os.path.exists(folder)


# Where the step-2 save of a 2-process run is held while the test kills it: its weights written and no shard yet;
# every shard and the index written but not training.pt nor state.json; state.json written but the older checkpoint
# not yet deleted.
PAUSE = {"weights": ("save_shards", "before"), "shards": ("save_shards", "after"), "marker": ("prune", "before")}
PAUSED = """import os, runpy, sys, time
sys.path.insert(0, {root!r})
from training import checkpoints
name, when, flag = {name!r}, {when!r}, {flag!r}
with open(flag + "pid" + os.environ["RANK"], "w") as f:
    f.write(str(os.getpid()))
original = getattr(checkpoints, name)
def paused(*args, **kwargs):
    step2 = 2 in checkpoints.complete(args[0]) if name == "prune" else checkpoints.CHECKPOINT.format(2) in args[1]
    if step2 and when == "before":
        open(flag + os.environ["RANK"], "w").close(); time.sleep(600)
    original(*args, **kwargs)
    if step2:
        open(flag + os.environ["RANK"], "w").close(); time.sleep(600)
setattr(checkpoints, name, paused)
sys.argv = ["srpo.py", *sys.argv[1:]]
runpy.run_path(os.path.join({root!r}, "srpo.py"), run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", PAUSE)
def test_sigkill_during_a_two_process_save_leaves_the_last_checkpoint_usable(fsdp_runs, tmp_path, moment):  # noqa: F811
    """SIGKILL to both processes (and torchrun) while they save step 2 (--keep 1): the step-1 checkpoint stays (or
    step 2's, once its state.json is written), and --resume by 2 processes ends with the uninterrupted run's step-2
    weights, AdamW state and log, bit for bit."""
    two, out = fsdp_runs[1], str(tmp_path / "out")
    name, when = PAUSE[moment]
    script, flag = tmp_path / "paused.py", str(tmp_path / "paused-")
    script.write_text(PAUSED.format(root=ROOT, name=name, when=when, flag=flag))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [*FSDP_ARGS, "--keep", "1", "--out", out]
    p = subprocess.Popen([sys.executable, *TORCHRUN[:-1], str(script), *args], cwd=ROOT, env=env,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    # one rank paused: the other is inside the same collective save or waiting on it (prune: rank 0 alone)
    while not os.path.exists(flag + "0") and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    paused = os.path.exists(flag + "0")
    # torchrun starts each worker in a session of its own: SIGKILL reaches them one by one, as the OOM killer's
    for pid in [flag + "pid0", flag + "pid1"]:
        if os.path.exists(pid):
            with open(pid) as f:
                os.kill(int(f.read()), signal.SIGKILL)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert paused, p.stderr.read()[-3000:]
    assert sorted(checkpoints.complete(out)) == ([1, 2] if moment == "marker" else [1])
    cli(*TORCHRUN, *args, "--resume")
    a, b = weights(two, 2), weights(out, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, y = adamw_state(checkpoint(two, 2)), adamw_state(checkpoint(out, 2))
    assert all(torch.equal(x[n][k], y[n][k]) for n in x for k in x[n])
    assert log_lines(out) == log_lines(two)


def _stream_two_ranks(rank, world, store, folder, fail_after):
    """One of 2 gloo processes: the tiny FLUX.1 sharded by fsdp_shard, then stream_weights into folder; rank 0's
    writer fails with ENOSPC after `fail_after` tensors (None: never). Writes what happened to folder.rank."""
    import errno

    import torch.distributed as dist

    from common.util import Fault

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    full = fm.Flux(fm.FluxConfig.preset("tiny"))
    with torch.device("meta"):
        model = fm.Flux(full.cfg)
    ranks = runtime.Ranks(rank, world, torch.device("cpu"))
    runtime.fsdp_shard(model, full.state_dict, ranks)
    if rank == 0 and fail_after is not None:
        write = checkpoints.write_safetensors

        def failing(path, specs, make, *args, **kwargs):
            def make_or_fail(name, made=[]):  # noqa: B006  counts across calls
                made.append(name)
                if len(made) > fail_after:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return make(name)
            return write(path, specs, make_or_fail, *args, **kwargs)

        checkpoints.write_safetensors = failing
    try:
        checkpoints.stream_weights(model, folder, "the checkpoint", ranks)
        outcome = "ok"
    except Fault as e:
        outcome = f"fault: {e}"
    with open(f"{folder}.{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail_after", [None, 3])
def test_stream_weights_over_two_ranks_writes_the_model_or_fails_on_every_rank(fail_after, tmp_path):
    """stream_weights on 2 real gloo processes: the file is save_transformer's of the unsharded model, tensor for
    tensor (fused q, k, v split as diffusers keeps them); a full disk on rank 0 after 3 tensors ends both ranks with
    its Fault (rank 1 finishes its gathers with rank 0, no hang) and leaves no folder."""
    folder = str(tmp_path / "checkpoint")
    outcomes = spawned(_stream_two_ranks, 2, tmp_path, folder, fail_after)
    if fail_after is not None:
        assert all(o.startswith("fault: could not write") and "No space left on device" in o for o in outcomes)
        assert not os.path.exists(folder)
        return
    assert outcomes == ["ok", "ok"]
    torch.manual_seed(0)
    reference = flux_weights.save_transformer(fm.Flux(fm.FluxConfig.preset("tiny")), str(tmp_path / "reference"))
    ours, theirs = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")), load_file(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
