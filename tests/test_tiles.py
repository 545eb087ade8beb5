"""The attention kernels' tiles across processes (flux_kernels.attention.warm_up with ranks): rank 0 times them and
every rank launches its choice. Two gloo processes under torchrun, the kernels interpreted on the CPU, each kernel
given two candidate tiles and a stub timing that makes rank r's own winner candidate r: the way two GPUs' timings can
disagree."""

import json
import os
import subprocess
import sys

from test_train import ROOT

TWO_RANKS = """
import json, sys, torch, triton
from flux_kernels import attention
from training import runtime

ranks = runtime.init_ranks("cpu")
benched = {}
for name, kernel in attention._TUNED.items():
    kernel.configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
                      triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]

    def timing(*args, config, name=name, kernel=kernel, **meta):  # this rank's "GPU" prefers its own candidate
        benched[name] = benched.get(name, 0) + 1
        return [0.0 if config is kernel.configs[ranks.rank] else 1.0]

    kernel._bench = timing


def picked(ranks=None):
    for kernel in attention._TUNED.values():
        kernel.cache.clear()
    benched.clear()
    attention.warm_up(37, 2, 16, torch.float32, torch.device("cpu"), ranks)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    tiles = {name: [str(c) for c in cache.values()] for name, cache in attention.tiles().items()}
    return {"tiles": tiles, "benched": dict(benched), "out": attention.attention(q, k, v).flatten().tolist()}


with open(f"{sys.argv[1]}/rank{ranks.rank}.json", "w") as f:
    json.dump({"alone": picked(), "shared": picked(ranks)}, f)
torch.distributed.destroy_process_group()
"""


def test_rank_0_tunes_the_tiles_every_rank_launches(tmp_path):
    """Tuning alone, each rank picks its own winner; with warm_up(ranks=...) rank 0 alone times the candidates and
    both ranks launch its tiles, so the same attention inputs give bit-identical outputs on both."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    names = ("forward", "dK dV", "dQ")
    alone = [{name: run["alone"]["tiles"][name] for name in names} for run in (zero, one)]
    assert all(len(tiles) == 1 for tiles in alone[0].values()) and alone[0] != alone[1]  # each its own winner
    assert zero["shared"]["tiles"] == one["shared"]["tiles"] == alone[0]  # rank 0's, on both
    assert zero["shared"]["benched"] == dict.fromkeys(names, 2) and one["shared"]["benched"] == {}
    assert zero["shared"]["out"] == one["shared"]["out"]


FIXED = """
import json, sys
from flux_kernels import attention
print(json.dumps({name: [(c.kwargs, c.num_warps, c.num_stages) for c in kernel.configs]
                  for name, kernel in attention._TUNED.items()}))
"""


def test_fixed_tiles_leave_one_candidate_per_dtype():
    """KERNELS_FIXED_TILES=1 (the compiled tests' mode, tools/gpu_check.sh tests): each kernel compiled with the
    smallest 16-bit and the smallest fp32 tile only, so a launch compiles one tile and times none."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "KERNELS_FIXED_TILES": "1"}
    done = subprocess.run([sys.executable, "-c", FIXED], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    tiles = {name: [(c["BLOCK_M"], c["BLOCK_N"], warps, stages) for c, warps, stages in configs]
             for name, configs in json.loads(done.stdout).items()}
    assert tiles == {"forward": [(64, 32, 4, 2), (16, 16, 4, 1)], "dK dV": [(32, 64, 8, 3), (16, 16, 4, 1)],
                     "dQ": [(64, 32, 4, 3), (16, 16, 4, 1)]}
