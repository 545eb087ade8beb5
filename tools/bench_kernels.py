"""Benchmark the kernels against PyTorch at FLUX shapes: `python -m tools.bench_kernels`.

On a CUDA GPU it prints a markdown report to paste into BENCHMARKS.md: attention (ours vs the SDPA backends)
correctness and speed, then fused RMSNorm+RoPE vs PyTorch with a device copy as the bandwidth roof. Every
measurement is guarded, so a backend that refuses a shape or a failing torch.compile shows up as an error cell.
Without a GPU it runs a tiny correctness pass of the kernels in the Triton interpreter instead, then prints
what the compiler makes of them for an H100 (`tools.compile_report`: registers, spills, shared memory, MMA).
"""

import datetime
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flux_kernels import attention as attention_module
from flux_kernels.attention import attention, attention_reference
from flux_kernels.dispatch import INTERPRETED
from flux_kernels.rope import norm_rope, norm_rope_reference

HEADS, HEAD_DIM, DTYPE = 24, 128, torch.bfloat16
SHAPES = [(1, 4608), (2, 4608), (1, 2537), (2, 2537)]  # (B, N): 1024^2 and 720^2 images with 512 text tokens
ROPE_SHAPES = [SHAPES[0], SHAPES[3]]  # fewer: every shape costs torch.compile two recompilations
EPS = 1e-6


def _error_cell(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return f"error: {text[:70]}"


def _guarded(fn, *args):
    """fn(*args) or, if it raises, the error as a table cell (and whatever memory it left behind freed)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failing row must not stop the report
        torch.cuda.empty_cache()
        return _error_cell(exc)


def _ms(fn, **kwargs) -> float:
    return do_bench(fn, return_mode="median", **kwargs)


def _fmt(value, spec: str) -> str:
    return value if isinstance(value, str) else format(value, spec)


def _copy_gbs(x) -> float:
    """GB/s of a plain device copy of x (read + write), the bandwidth roof for a memory-bound kernel."""
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / _ms(lambda: y.copy_(x)) / 1e6


def _time_fwd_and_fwd_bwd(fn, args, wrt, grad_out):
    """Median ms of fn(*args) without autograd, and of fn(*args) plus its gradients wrt `wrt`; or error cells."""
    def fwd():
        with torch.no_grad():
            return _ms(lambda: fn(*args))

    def fwd_bwd():
        return _ms(lambda: torch.autograd.grad(fn(*args), wrt, grad_out))

    return _guarded(fwd), _guarded(fwd_bwd)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


ATTENTION_IMPLS = {
    "ours (triton)": attention,
    "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa math": _sdpa(SDPBackend.MATH),
}


def _attention_inputs(B: int, N: int, device: str):
    q, k, v, do = (torch.randn(B, HEADS, N, HEAD_DIM, device=device, dtype=DTYPE) for _ in range(4))
    return [x.requires_grad_() for x in (q, k, v)], do


def _forward_backward(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _correctness_row(B: int, N: int, device: str) -> str:
    (q, k, v), do = _attention_inputs(B, N, device)
    ours = _forward_backward(attention, q, k, v, do)
    sdpa = _forward_backward(F.scaled_dot_product_attention, q, k, v, do)
    with torch.no_grad():
        exact = attention_reference(q.float(), k.float(), v.float())
    errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(ours, sdpa, strict=True)]
    errs += [(ours[0].float() - exact).abs().max().item(), (sdpa[0].float() - exact).abs().max().item()]
    return " | ".join(f"{e:.2e}" for e in errs)


def attention_correctness(device: str) -> list[str]:
    lines = ["### Attention correctness (bf16, H 24, D 128): max abs error",
             "",
             "| B | N | out vs SDPA | dQ vs SDPA | dK vs SDPA | dV vs SDPA | out vs fp32 math "
             "| SDPA out vs fp32 math |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {B} | {N} | {_guarded(_correctness_row, B, N, device)} |" for B, N in SHAPES]
    return lines


def _tflops(flops: float, ms) -> str:
    return "-" if isinstance(ms, str) else f"{flops / ms / 1e9:.0f}"


def attention_speed(device: str) -> list[str]:
    lines = ["### Attention speed (bf16, H 24, D 128, non-causal; FLOPs fwd F = 4·B·H·N²·D, bwd 2.5 F, fwd+bwd 3.5 F)",
             "",
             "bwd TFLOP/s = 2.5 F / (fwd+bwd ms - fwd ms): the backward alone, as the FlashAttention papers report it.",
             "",
             "| B | N | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for B, N in SHAPES:
        (q, k, v), do = _attention_inputs(B, N, device)
        fwd_flops = 4 * B * HEADS * N * N * HEAD_DIM
        for name, fn in ATTENTION_IMPLS.items():
            fwd, fwd_bwd = _time_fwd_and_fwd_bwd(fn, (q, k, v), (q, k, v), do)
            bwd = "-" if isinstance(fwd, str) or isinstance(fwd_bwd, str) else fwd_bwd - fwd
            cells = [_fmt(fwd, ".3f"), _tflops(fwd_flops, fwd), _fmt(fwd_bwd, ".3f"), _tflops(3.5 * fwd_flops, fwd_bwd),
                     _tflops(2.5 * fwd_flops, bwd)]
            lines.append(f"| {B} | {N} | {name} | {' | '.join(cells)} |")
    best = [f"{kernel}: {getattr(getattr(attention_module, kernel), 'best_config', None)}"
            for kernel in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")]
    lines += ["", f"Autotuned configs at the last shape: {'; '.join(best)}"]
    return lines


def _norm_fp32(x, scale, eps=EPS):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale.float()


def _rotate_pairs(y, cos, sin):
    even, odd = y[..., 0::2], y[..., 1::2]
    return torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).flatten(-2)


def _norm_only(x, scale):
    return _norm_fp32(x, scale).to(x.dtype)


def _rope_only(y, cos, sin):
    return _rotate_pairs(y.float(), cos, sin).to(y.dtype)


def norm_rope_real(x, scale, cos, sin, eps=EPS):
    """`norm_rope_reference`'s math in real arithmetic, for torch.compile: Inductor runs the reference's complex
    product as eager aten calls between its kernels (it generates no code for complex ops), this it fuses whole."""
    return _rotate_pairs(_norm_fp32(x, scale, eps), cos, sin).to(x.dtype)


def _rope_impls():
    """Fresh (recompiled) torch.compile wrappers, so that each shape gets static-shape kernels."""
    torch._dynamo.reset()
    compiled_norm, compiled_rope = torch.compile(_norm_only, dynamic=False), torch.compile(_rope_only, dynamic=False)
    return {
        "ours (fused triton)": norm_rope,
        "torch eager (reference)": norm_rope_reference,
        "torch.compile norm, then rope (unfused)": lambda x, s, c, n: compiled_rope(compiled_norm(x, s), c, n),
        "torch.compile(reference in real arithmetic) (fused by inductor)": torch.compile(norm_rope_real, dynamic=False),
    }


def rope_speed(device: str) -> list[str]:
    lines = ["### RMSNorm + RoPE on q (bf16, H 24, D 128; x a (B, N, H, D) -> (B, H, N, D) strided view)",
             "",
             "Bytes: fwd = read x + write out + read cos, sin; fwd+bwd adds read x, read dOut, write dx, read cos, "
             "sin (the dscale partial sums are not counted). % of copy = GB/s over a same-size bf16 device copy.",
             "",
             "| B | N | implementation | fwd ms | fwd GB/s | fwd % of copy | fwd+bwd ms | fwd+bwd GB/s |"
             " fwd+bwd % of copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for B, N in ROPE_SHAPES:
        x = torch.randn(B, N, HEADS, HEAD_DIM, device=device, dtype=DTYPE).transpose(1, 2).requires_grad_()
        scale = (1 + 0.1 * torch.randn(HEAD_DIM, device=device)).to(DTYPE).requires_grad_()
        angle = torch.rand(N, HEAD_DIM // 2, device=device) * 2 * math.pi
        cos, sin = angle.cos(), angle.sin()
        g = torch.randn(B, HEADS, N, HEAD_DIM, device=device, dtype=DTYPE)
        x_bytes, table_bytes = x.numel() * x.element_size(), 2 * cos.numel() * cos.element_size()
        fwd_bytes = 2 * x_bytes + table_bytes
        fwd_bwd_bytes = fwd_bytes + 3 * x_bytes + table_bytes

        copy_gbs = _guarded(_copy_gbs, g)
        lines.append(f"| {B} | {N} | device copy (roof) | | {_fmt(copy_gbs, '.0f')} | 100 | | | |")

        for name, fn in _rope_impls().items():
            cells = []
            times = _time_fwd_and_fwd_bwd(fn, (x, scale, cos, sin), (x, scale), g)
            for ms, nbytes in zip(times, (fwd_bytes, fwd_bwd_bytes), strict=True):
                if isinstance(ms, str):
                    cells += [ms, "-", "-"]
                    continue
                gbs = nbytes / ms / 1e6
                share = "" if isinstance(copy_gbs, str) else f"{100 * gbs / copy_gbs:.0f}"
                cells += [f"{ms:.3f}", f"{gbs:.0f}", share]
            lines.append(f"| {B} | {N} | {name} | {' | '.join(cells)} |")
    return lines


def gpu_report() -> None:
    print(f"## {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}\n")
    for section in (attention_correctness, attention_speed, rope_speed):
        print("\n".join(section("cuda")) + "\n", flush=True)


def interpreter_pass() -> None:
    """Ours vs the torch references on tiny shapes, forward and gradients, in the Triton interpreter."""
    for dtype in (torch.float32, torch.bfloat16):
        B, H, N, D = 1, 2, 77, 64
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, dtype=dtype)
        ours = _forward_backward(attention, q, k, v, do)
        ref = _forward_backward(attention_reference, q, k, v, do)
        errs = ", ".join(f"{name} {(a.float() - b.float()).abs().max().item():.1e}"
                         for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True))
        print(f"attention  {str(dtype):15} B{B} H{H} N{N} D{D}: max abs error {errs}")

        x, g = torch.randn(B, H, N, D, dtype=dtype).requires_grad_(), torch.randn(B, H, N, D, dtype=dtype)
        scale = (1 + 0.1 * torch.randn(D)).to(dtype).requires_grad_()
        angle = torch.rand(N, D // 2) * 2 * math.pi
        results = []
        for fn in (norm_rope, norm_rope_reference):
            out = fn(x, scale, angle.cos(), angle.sin())
            results.append((out, *torch.autograd.grad(out, (x, scale), g)))
        errs = ", ".join(f"{name} {(a.float() - b.float()).abs().max().item():.1e}"
                         for name, a, b in zip(("out", "dx", "dscale"), *results, strict=True))
        print(f"norm_rope  {str(dtype):15} B{B} H{H} N{N} D{D}: max abs error {errs}")


def main() -> int:
    if torch.cuda.is_available():
        gpu_report()
        return 0
    if INTERPRETED:
        print("no CUDA GPU: a tiny correctness pass in the Triton interpreter")
        interpreter_pass()
        return 0
    from tools import compile_report  # Triton compiler internals: kept out of the GPU path's imports

    # Triton picks compiled vs interpreted when it is imported (as it was, above): the pass runs in a fresh process.
    code = subprocess.call([sys.executable, "-m", "tools.bench_kernels"], env={**os.environ, "TRITON_INTERPRET": "1"})
    print("\nand what the compiler makes of the kernels for an H100 at the first shape (untimed without the card):\n")
    print("\n".join(compile_report.report(90, DTYPE, HEAD_DIM, SHAPES[0][1])[0]))
    return code


if __name__ == "__main__":
    sys.exit(main())
