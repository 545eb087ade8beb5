"""Fused per-head RMSNorm + interleaved RoPE for FLUX's q and k, in Triton.

`norm_rope(x, scale, cos, sin)` on x of shape (B, H, N, D), all math in fp32, one cast at the end:

    y = x * rsqrt(mean_d(x^2) + eps) * scale
    out[2j]   = cos[n, j] * y[2j] - sin[n, j] * y[2j+1]
    out[2j+1] = sin[n, j] * y[2j] + cos[n, j] * y[2j+1]

Backward, with g = dL/dout, xhat = x * r, r = rsqrt(mean_d(x^2) + eps): the rotation is orthogonal per pair, so
dy is g rotated back (dy[2j] = cos g[2j] + sin g[2j+1], dy[2j+1] = -sin g[2j] + cos g[2j+1]); then

    dscale = sum over rows of dy o xhat
    dx = r * (dy o scale - xhat * mean_d(dy o scale o xhat))

dscale is reduced without atomics: each program writes the partial sum over its rows, torch sums the partials
(B*H*N/rows_per_program rows of D floats, written once and read once: about 4 % of the backward's traffic).

Fused because both halves are memory-bound (a few flops per element): time is bytes moved. Per element of a bf16 q
or k the kernel reads x and writes out, 4 bytes (cos/sin add 8 bytes per pair per token, shared by all B*H heads, so
they mostly hit L2). A separate norm and RoPE would read x, write y, read y and write out: 8 bytes and a second
launch; the eager reference (upcast, RMSNorm, complex product, downcast) makes a full pass per op. The bound is
therefore a device copy of x, at half the traffic of the best unfused pair; `python -m tools.bench_kernels` times
the kernel against eager torch, a separately compiled norm and RoPE, torch.compile of the reference's math in real
arithmetic, and that copy (BENCHMARKS.md).
The kernel also performs the layout change: x may be any strided (B, H, N, D) view (e.g. a permute of the qkv
projection's (B, N, 3, H, D) output) and out is contiguous (B, H, N, D), ready for attention.

Dispatch: `flux_kernels.dispatch.use_triton`, as for attention. Loads are upcast to fp32 unconditionally (the math is
fp32 by spec), so the interpreter's broken bf16 arithmetic is never reached; its truncating fp32 -> bf16 store is
avoided by `new_output` writing fp32 there.
"""

import torch
import triton
import triton.language as tl

from flux_kernels.dispatch import new_output, use_triton


def _rows_per_program(D: int) -> int:
    # 4096 elements per program: 32 values per thread at 4 warps, enough loads in flight to keep HBM busy.
    return 4096 // D


@triton.jit
def _rotate(a, c, s, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Rotate the interleaved pairs (a[2j], a[2j+1]) of each row by the angle whose cosine and sine are c, s."""
    even, odd = tl.split(tl.reshape(a, (BLOCK_N, D // 2, 2)))
    return tl.reshape(tl.join(c * even - s * odd, s * even + c * odd), (BLOCK_N, D))


@triton.jit
def _norm_rope_fwd_kernel(X, W, COS, SIN, OUT, sxb, sxh, sxn, H, N, eps,
                          D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, D // 2)
    rows = offs_n[:, None] < N

    x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :], mask=rows, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(W + offs_d).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    y = x * r[:, None] * w[None, :]
    cs = offs_n[:, None] * (D // 2) + offs_j[None, :]
    c = tl.load(COS + cs, mask=rows, other=0.0)
    s = tl.load(SIN + cs, mask=rows, other=0.0)
    out = _rotate(y, c, s, BLOCK_N, D)
    tl.store(OUT + (bh.to(tl.int64) * N + offs_n[:, None]) * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=rows)


@triton.jit
def _norm_rope_bwd_kernel(X, W, COS, SIN, G, DX, DW_PARTIAL, sxb, sxh, sxn, sgb, sgh, sgn, H, N, eps,
                          D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, D // 2)
    rows = offs_n[:, None] < N

    # Padded rows load x = 0 and g = 0, so they add nothing to the partial sum and are never stored.
    x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :], mask=rows, other=0.0)
    g = tl.load(G + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :], mask=rows, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(W + offs_d).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    xhat = x * r[:, None]
    cs = offs_n[:, None] * (D // 2) + offs_j[None, :]
    c = tl.load(COS + cs, mask=rows, other=0.0)
    s = tl.load(SIN + cs, mask=rows, other=0.0)
    dy = _rotate(g.to(tl.float32), c, -s, BLOCK_N, D)

    tl.store(DW_PARTIAL + (bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * D + offs_d,
             tl.sum(dy * xhat, 0))
    dxhat = dy * w[None, :]
    dx = r[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, 1) / D)[:, None])
    tl.store(DX + (bh.to(tl.int64) * N + offs_n[:, None]) * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
             mask=rows)


def _prepare(x, scale, cos, sin):
    """What the kernels assume: unit stride over D for x, contiguous scale, contiguous fp32 cos/sin (no-ops in FLUX)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, scale.contiguous(), cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, cos, sin, eps):
        x, scale, cos, sin = _prepare(x, scale, cos, sin)
        B, H, N, D = x.shape
        block_n = _rows_per_program(D)
        out = new_output((B, H, N, D), x.dtype, x.device)
        with torch.cuda.device_of(x):  # Triton launches on the current device (flux_kernels/dispatch.py)
            _norm_rope_fwd_kernel[(triton.cdiv(N, block_n), B * H)](
                x, scale, cos, sin, out, *x.stride()[:3], H, N, eps, D=D, BLOCK_N=block_n, num_warps=4)
        ctx.save_for_backward(x, scale, cos, sin)
        ctx.eps = eps
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, scale, cos, sin = ctx.saved_tensors
        if g.stride(-1) != 1:
            g = g.contiguous()
        B, H, N, D = x.shape
        block_n = _rows_per_program(D)
        blocks = triton.cdiv(N, block_n)
        dx = new_output((B, H, N, D), x.dtype, x.device)
        dw_partial = new_output((B * H * blocks, D), torch.float32, x.device)
        with torch.cuda.device_of(x):
            _norm_rope_bwd_kernel[(blocks, B * H)](
                x, scale, cos, sin, g, dx, dw_partial, *x.stride()[:3], *g.stride()[:3], H, N, ctx.eps,
                D=D, BLOCK_N=block_n, num_warps=4)
        return dx.to(x.dtype), dw_partial.sum(0).to(scale.dtype), None, None, None


def norm_rope_reference(x: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """The spec and the fallback: RMSNorm over D with weight `scale`, then rotate interleaved pairs, in fp32."""
    y = torch.nn.functional.rms_norm(x.float(), x.shape[-1:], scale.float(), eps)
    # the pair rotation is a complex product, (y[2j] + i y[2j+1]) * (cos + i sin): half the passes of the
    # real-arithmetic form, which matters where this reference is the CPU path of the model
    y = torch.view_as_complex(y.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
    return torch.view_as_real(y).flatten(-2).to(x.dtype)


def norm_rope(x: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * scale then interleaved RoPE; x (B, H, N, D) any strides, scale (D,), cos/sin fp32 (N, D//2).

    Differentiable in x and scale. Returns a contiguous (B, H, N, D) tensor of x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got {tuple(x.shape)}")
    B, H, N, D = x.shape
    if scale.shape != (D,) or cos.shape != (N, D // 2) or sin.shape != (N, D // 2):
        raise ValueError(f"for x {tuple(x.shape)} expected scale ({D},) and cos/sin ({N}, {D // 2}), got "
                         f"{tuple(scale.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if not use_triton(x):
        return norm_rope_reference(x, scale, cos, sin, eps)
    if D < 2 or D & (D - 1):
        raise ValueError(f"norm_rope kernel needs a power-of-two head dim, got {D}")
    return _NormRope.apply(x, scale, cos, sin, eps)
