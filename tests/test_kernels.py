"""The Triton kernels against float64 math written here (not the modules' references).

On a CPU-only machine the kernels run in the Triton interpreter: conftest.py imports triton and `flux_kernels` in
interpreter mode, and the autouse fixture sets TRITON_INTERPRET=1 at call time, which is what routes CPU tensors to
the kernels. With a GPU they run compiled on it.

Error = max|ours - ref| / max|ref|, where for gradients max|ref| is taken over dQ, dK, dV (resp. dx, dscale)
together: at N = 1 dQ and dK are exactly 0 and have no scale of their own. Tolerance: 1e-5 for fp32, 1e-2 for
fp16/bf16. Every kernel output is NaN-poisoned before the kernel runs (KERNELS_POISON_OUTPUTS=1), so an element
the kernel fails to write fails the comparison. Inputs are fresh random normals each run; the seed is in the
failure message and KERNELS_TEST_SEED=<seed> replays it.
"""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flux_kernels import attention as attention_module
from flux_kernels import rope as rope_module
from flux_kernels.attention import attention, attention_reference
from flux_kernels.dispatch import INTERPRETED, new_output
from flux_kernels.rope import norm_rope, norm_rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KERNELS_POISON_OUTPUTS", "1")


@pytest.fixture
def seed():
    seed = int(os.environ["KERNELS_TEST_SEED"]) if "KERNELS_TEST_SEED" in os.environ else torch.seed()
    torch.manual_seed(seed)
    return seed


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def check(name, ours, refs, tol, seed):
    """Each of `ours` against float64 `refs`, errors relative to the largest reference magnitude among `refs`."""
    scale = max(r.abs().max().item() for r in refs)
    for i, (a, r) in enumerate(zip(ours, refs, strict=True)):
        assert torch.isfinite(a).all(), f"{name}[{i}]: non-finite (unwritten?) elements, seed {seed}"
        err = ((a.double() - r).abs().max() / scale).item()
        assert err <= tol, f"{name}[{i}]: relative error {err:.3g} > {tol}, seed {seed}"


def attention_float64(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def run_attention(q, k, v, do):
    """Ours (out, dq, dk, dv) and the float64 autograd of the same, on the same (possibly strided) inputs."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves)
    out.backward(do)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out64 = attention_float64(*leaves64)
    out64.backward(do.double())
    return (out, *(x.grad for x in leaves)), (out64, *(x.grad for x in leaves64))


ATTENTION_CASES = [
    (1, 2, 1, 16, torch.float32),
    (2, 1, 7, 32, torch.float32),
    (1, 2, 77, 64, torch.float32),
    (1, 1, 100, 16, torch.float32),
    (1, 2, 257, 32, torch.float32),
    (1, 2, 1, 32, torch.bfloat16),
    (2, 1, 7, 64, torch.bfloat16),
    (1, 2, 77, 32, torch.bfloat16),
    (1, 1, 100, 64, torch.bfloat16),
    (1, 1, 257, 16, torch.bfloat16),
    (1, 2, 7, 16, torch.float16),
    (2, 1, 77, 64, torch.float16),
    (1, 1, 100, 32, torch.float16),
    (1, 1, 257, 64, torch.float16),
    (1, 1, 77, 128, torch.bfloat16),
    (2, 2, 300, 64, torch.bfloat16),
]


@pytest.mark.parametrize("B,H,N,D,dtype", ATTENTION_CASES)
def test_attention(B, H, N, D, dtype, seed):
    q, k, v, do = (randn(B, H, N, D, dtype=dtype) for _ in range(4))
    ours, refs = run_attention(q, k, v, do)
    assert ours[0].dtype == dtype and ours[0].shape == (B, H, N, D)
    check("out", ours[:1], refs[:1], TOL[dtype], seed)
    check("dq,dk,dv", ours[1:], refs[1:], TOL[dtype], seed)


def test_attention_strided_inputs(seed):
    B, H, N, D = 2, 2, 77, 32
    q = randn(B, N, H, D).transpose(1, 2)  # the layout of a (B, N, H*D) projection viewed per head
    k = randn(B, H, D, N).transpose(-1, -2)  # D not unit-stride: must be copied
    v = randn(B, H, N, 2 * D)[..., :D]  # token stride 2D
    do = randn(B, N, H, D).transpose(1, 2)
    ours, refs = run_attention(q, k, v, do)
    check("out", ours[:1], refs[:1], TOL[torch.float32], seed)
    check("dq,dk,dv", ours[1:], refs[1:], TOL[torch.float32], seed)


@pytest.mark.parametrize("N", [7, 77])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp2 on lanes masked afterwards
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # in padded rows, never stored
def test_attention_very_negative_scores(N, seed):
    # Every score near -120: lse is so negative that a padded key (score 0) would get p = exp(120) = inf in fp32
    # unless the tail is masked, and inf * 0 would then turn dQ into NaN. fp32 scores of magnitude 120 carry
    # absolute errors near 1e-5, hence the looser tolerance.
    B, H, D = 1, 2, 16
    k = 1 + 0.1 * randn(B, H, N, D)
    q = -30 + 0.1 * randn(B, H, N, D)
    v, do = randn(B, H, N, D), randn(B, H, N, D)
    ours, refs = run_attention(q, k, v, do)
    check("out", ours[:1], refs[:1], 1e-4, seed)
    check("dq,dk,dv", ours[1:], refs[1:], 1e-4, seed)


def norm_rope_float64(x, scale, cos, sin, eps):
    """RMSNorm then RoPE written as a complex product: pair (y[2j], y[2j+1]) times (cos + i sin)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale
    pairs = torch.view_as_complex(y.reshape(*y.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


def run_norm_rope(x, scale, g, eps=1e-6, fn=norm_rope):
    N, D = x.shape[-2:]
    angle = torch.rand(N, D // 2, device=DEVICE) * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    xl, sl = x.detach().requires_grad_(), scale.detach().requires_grad_()
    out = fn(xl, sl, cos, sin, eps)
    out.backward(g)
    x64, s64 = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    out64 = norm_rope_float64(x64, s64, cos.double(), sin.double(), eps)
    out64.backward(g.double())
    return (out, xl.grad, sl.grad), (out64, x64.grad, s64.grad)


NORM_ROPE_CASES = [
    (2, 2, 1, 16, torch.float32),
    (1, 2, 7, 64, torch.float32),
    (1, 1, 77, 128, torch.float32),
    (2, 1, 257, 16, torch.float32),
    (1, 2, 1, 64, torch.bfloat16),
    (2, 1, 7, 128, torch.bfloat16),
    (1, 2, 77, 16, torch.bfloat16),
    (1, 1, 257, 64, torch.bfloat16),
    (1, 1, 1, 128, torch.float16),
    (1, 2, 7, 16, torch.float16),
    (2, 1, 77, 64, torch.float16),
    (1, 1, 257, 128, torch.float16),
]


@pytest.mark.parametrize("B,H,N,D,dtype", NORM_ROPE_CASES)
def test_norm_rope(B, H, N, D, dtype, seed):
    x, g = randn(B, H, N, D, dtype=dtype), randn(B, H, N, D, dtype=dtype)
    scale = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype)
    ours, refs = run_norm_rope(x, scale, g)
    assert ours[0].dtype == dtype and ours[0].is_contiguous() and ours[2].dtype == dtype
    check("out", ours[:1], refs[:1], TOL[dtype], seed)
    check("dx,dscale", ours[1:], refs[1:], TOL[dtype], seed)


def test_norm_rope_strided_inputs(seed):
    B, H, N, D = 2, 3, 77, 64
    x = randn(B, N, H, D).transpose(1, 2)  # q as sliced out of FLUX's (B, N, 3, H, D) projection
    g = randn(B, N, H, D).transpose(1, 2)
    ours, refs = run_norm_rope(x, 1 + 0.5 * randn(D), g)
    check("out", ours[:1], refs[:1], TOL[torch.float32], seed)
    check("dx,dscale", ours[1:], refs[1:], TOL[torch.float32], seed)


def test_bench_compiled_rope_baseline_is_fused_by_inductor(seed):
    """The bench's torch.compile row must time Inductor's own fused code, forward and backward: no eager aten call
    (what Inductor emits for the reference's complex product, e.g. `torch.ops.aten.view_as_complex.default(...)`)
    and no library kernel in its generated code; and it is the same math (against float64, 1e-5)."""
    from torch._inductor.utils import run_and_get_code

    from tools.bench_kernels import norm_rope_real

    torch._dynamo.reset()
    x, g = randn(2, 33, 3, 32).transpose(1, 2), randn(2, 3, 33, 32)  # strided, as in the bench
    compiled = torch.compile(norm_rope_real, dynamic=False)
    (ours, refs), codes = run_and_get_code(lambda: run_norm_rope(x, 1 + 0.5 * randn(32), g, fn=compiled))
    assert len(codes) == 2  # the forward and the backward graph
    calls = [call for code in codes for call in re.findall(r"\b(?:aten|extern_kernels)\.[\w.]+\(", code)]
    assert not calls, f"eager calls in Inductor's code: {calls}"
    check("out", ours[:1], refs[:1], TOL[torch.float32], seed)
    check("dx,dscale", ours[1:], refs[1:], TOL[torch.float32], seed)


def test_outputs_are_poisoned():
    assert torch.isnan(new_output((4, 4), torch.bfloat16, DEVICE)).all()


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    x, scale, cos, sin = torch.randn(1, 2, 33, 16), torch.randn(16), torch.randn(33, 8), torch.randn(33, 8)
    assert torch.equal(norm_rope(x, scale, cos, sin), norm_rope_reference(x, scale, cos, sin))


@pytest.mark.skipif(not INTERPRETED, reason="kernels compiled for the GPU in this process")
def test_cpu_with_interpreter_runs_triton(monkeypatch):
    def fail(*args):
        raise AssertionError("the reference ran instead of the Triton kernel")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention_module, "attention_reference", fail)
    monkeypatch.setattr(rope_module, "norm_rope_reference", fail)
    q = torch.randn(1, 1, 5, 16)
    attention(q, q, q)
    norm_rope(q, torch.ones(16), torch.ones(5, 8), torch.zeros(5, 8))


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device and its current stream, whatever device the pointers are on, so a
    model on cuda:1 while cuda:0 is current must have cuda:1 made current around every launch. Checked without a GPU:
    fake cuda:1 tensors (FakeTensorMode), torch's device switch simulated, the kernels replaced by recorders of the
    device that is current when they launch."""
    current, launched = [0], []

    def exchange(index):  # what torch.cuda.device's enter/exit call: make `index` current (-1: none), return the old
        previous = current[0]
        if index >= 0:
            current[0] = index
        return previous

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, current[0]))

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    names = [(attention_module, "_fwd_kernel"), (attention_module, "_delta_kernel"), (attention_module, "_dkdv_kernel"),
             (attention_module, "_dq_kernel"), (rope_module, "_norm_rope_fwd_kernel"),
             (rope_module, "_norm_rope_bwd_kernel")]
    for module, name in names:
        monkeypatch.setattr(module, name, Kernel(name))
    with FakeTensorMode():
        q, k, v, do = (torch.empty(1, 2, 33, 16, device="cuda:1") for _ in range(4))
        o, lse = attention_module._attention_forward(q, k, v)
        attention_module._attention_backward(q, k, v, o, lse, do)
        scale, cos = torch.empty(16, device="cuda:1"), torch.empty(33, 8, device="cuda:1")
        ctx = types.SimpleNamespace(save_for_backward=lambda *saved: setattr(ctx, "saved_tensors", saved))
        rope_module._NormRope.forward(ctx, q, scale, cos, cos, 1e-6)
        rope_module._NormRope.backward(ctx, do)
    assert sorted(launched) == sorted((name, 1) for _, name in names)
    assert current == [0]  # and the caller's device is current again


@pytest.mark.skipif(not INTERPRETED, reason="kernels compiled for the GPU in this process")
def test_warm_up_runs_forward_and_backward_kernels_at_the_given_shape(monkeypatch):
    """warm_up(n, heads, D) launches the forward and the backward once at (1, heads, n, D) where the kernels run
    (interpreted here), and nothing where they do not."""
    calls = []
    for name in ("_attention_forward", "_attention_backward"):
        real = getattr(attention_module, name)
        monkeypatch.setattr(attention_module, name,
                            lambda *args, real=real, name=name: calls.append((name, args[0].shape)) or real(*args))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    attention_module.warm_up(37, 3, 16, torch.float32, DEVICE)
    assert calls == []  # a CPU without the interpreter runs the reference: nothing to tune
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attention_module.warm_up(37, 3, 16, torch.float32, DEVICE)
    assert calls == [("_attention_forward", (1, 3, 37, 16)), ("_attention_backward", (1, 3, 37, 16))]


WITHOUT_KNOBS = """
import sys, torch, triton
del triton.knobs  # as before triton 3.4, which reads TRITON_INTERPRET when @triton.jit decorates
import flux_model
from flux_kernels import attention, dispatch, rope
assert not hasattr(triton, "knobs") and dispatch.INTERPRETED == (sys.argv[1] == "1")
torch.manual_seed(0)
q, k, v, x = (torch.randn(1, 2, 77, 32) for _ in range(4))
scale, angle = 1 + 0.5 * torch.randn(32), torch.rand(77, 16) * 6.3
torch.save({"inputs": (q, k, v, x, scale, angle), "attention": attention.attention(q, k, v),
            "norm_rope": rope.norm_rope(x, scale, angle.cos(), angle.sin())}, sys.argv[2])
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_import_and_interpreter_without_triton_knobs(interpret, tmp_path):
    """`import flux_model` and the interpreter switch must not need `triton.knobs` (triton >= 3.4 only): in a fresh
    process with it deleted, the kernels are decorated in the mode TRITON_INTERPRET asks for and, interpreted, match
    float64 math on CPU tensors (not interpreted, the CPU path is the torch reference)."""
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    done = subprocess.run([sys.executable, "-c", WITHOUT_KNOBS, interpret, str(tmp_path / "out.pt")], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "out.pt")
    q, k, v, x, scale, angle = (t.double() for t in saved["inputs"])
    check("attention", [saved["attention"]], [attention_float64(q, k, v)], TOL[torch.float32], 0)
    ref = norm_rope_float64(x, scale, angle.cos(), angle.sin(), 1e-6)
    check("norm_rope", [saved["norm_rope"]], [ref], TOL[torch.float32], 0)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        attention(randn(1, 2, 8, 16), randn(1, 2, 9, 16), randn(1, 2, 9, 16))
    with pytest.raises(ValueError):
        norm_rope(randn(1, 2, 8, 16), randn(16), randn(8, 4), randn(8, 4))


COMPILE_REPORT = """
import dataclasses, json, sys, torch
from tools.compile_report import report
_, results = report(90, getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps([dataclasses.asdict(r) for r in results]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype,D,N", [("bfloat16", 128, 4608), ("float16", 64, 2537), ("float32", 128, 2537)])
def test_kernels_compile_for_h100(dtype, D, N):
    """The compiled path, checked where no GPU is: Triton + ptxas build every autotune config for sm_90 exactly as the
    launchers would launch it (tools/compile_report.py). Every config must compile, fit in an H100's shared memory
    and not spill registers; the attention matmuls must be Hopper's wgmma in 16 bits and plain FMA in fp32 (exact
    fp32 products, which the 1e-5 tolerance needs; TF32 would not meet it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # decorate the kernels for compiling
    done = subprocess.run([sys.executable, "-c", COMPILE_REPORT, dtype, str(D), str(N)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert {r["kernel"] for r in results} == {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel",
                                              "_norm_rope_fwd_kernel", "_norm_rope_bwd_kernel"}
    for r in results:
        where = f"{r['kernel']} {r['config']}"
        assert not r["error"], f"{where}: {r['error']}"
        assert r["shared"] <= 227 * 1024, f"{where}: {r['shared']} B of shared memory"
        assert r["spilled"] == 0, f"{where}: {r['spilled']} B spilled per thread"
        if r["kernel"] in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
            assert r["mma"] == ("none" if dtype == "float32" else "wgmma"), f"{where}: {r['mma']}"
