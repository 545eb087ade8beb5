"""Fused non-causal attention for FLUX (FlashAttention-2 style), in Triton.

`attention(q, k, v)` takes `(B, H, N, D)` tensors and returns softmax(Q K^T / sqrt(D)) V without ever writing the
N x N score matrix to memory.

Forward, one program per (query block, batch*head), streaming over key blocks j with an online softmax
(s = q k^T / sqrt(D) for the current block, m = running row max, l = running row sum):

    m' = max(m, rowmax(s))
    l' = l * exp(m - m') + rowsum(exp(s - m'))
    acc' = acc * exp(m - m') + exp(s - m') V_j
    O = acc / l,   lse = m + log(l)  (saved: it is all the backward needs to rebuild P)

The exponentials are exp2 (the hardware instruction; exp(x) compiles to exp2(x * log2 e)) with log2(e) folded into
the 1/sqrt(D) scale, which saves a multiply per score; lse is therefore kept in base 2 between the passes.

Backward, with P = exp(S - lse) recomputed block by block:

    dV = P^T dO,   dP = dO V^T,   dS = P o (dP - delta),   delta = rowsum(dO o O)  (= rowsum(P o dP))
    dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D)

Schedule: three kernels and no atomics. A preprocessing kernel computes delta; a dK/dV kernel owns one key block
and loops over all query blocks; a dQ kernel owns one query block and loops over all key blocks. P is recomputed
in both loops (one extra Q K^T product); in exchange every output tile has exactly one writer, so there is no
atomic fp32 accumulation (non-deterministic, and a read-modify-write of dQ per key block), and each kernel gets
its own tile shape from the autotuner.

Any N is supported: each loop runs over the full blocks without masks and then over at most one masked tail
block, so the common path pays nothing for the tail. Padded rows are loaded as zeros and never stored; padded
columns of P are forced to 0 where they would otherwise leak into a stored row.

Dispatch: `flux_kernels.dispatch.use_triton` (CUDA: compiled; CPU with TRITON_INTERPRET=1: interpreted; else
`attention_reference`); every launch runs under `torch.cuda.device_of(q)` (flux_kernels/dispatch.py says why).
"""

import math
import os

import torch
import triton
import triton.language as tl

from flux_kernels.dispatch import INTERPRETED, new_output, use_triton

LOG2E = 1.4426950408889634
# KERNELS_FIXED_TILES=1 at import: each kernel gets one tile per dtype, the smallest candidate, and nothing is timed
# (the compiled tests: the autotuner would compile and time every candidate at every test's shape, ~250 compiles).
FIXED_TILES = os.environ.get("KERNELS_FIXED_TILES") == "1"


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _autotune(tiles_16bit, tiles_fp32):
    """Autotune over (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, the 16-bit or the fp32 list by Q's dtype;
    one fixed config when interpreting (autotuning needs a GPU driver; the interpreter wants small tiles, its cost
    grows with the tile, that still leave several full blocks plus a tail at the tests' sequence lengths).

    Two lists because fp32 is a different machine: its tl.dot runs on FMA units (input_precision "ieee", as the
    1e-5 tolerance needs), with operands in registers, and anything but small tiles spills; 16-bit runs on tensor
    cores, where those small tiles would waste the MMA. With FIXED_TILES each list's last (smallest) tile alone: the
    tests' short sequences then still cross several full blocks and a tail.
    """
    if INTERPRETED:
        return triton.autotune(configs=_configs([(32, 16, 4, 1)]), key=["N", "D"])
    if FIXED_TILES:
        tiles_16bit, tiles_fp32 = tiles_16bit[-1:], tiles_fp32[-1:]
    half, full = _configs(tiles_16bit), _configs(tiles_fp32)

    def by_dtype(configs, named_args, **kwargs):
        return full if named_args["Q"].dtype == torch.float32 else half

    return triton.autotune(configs=half + full, key=["N", "D"], prune_configs_by={"early_config_prune": by_dtype})


# Tiles for an H100 at D = 128 in 16 bits: the forward wants a tall query tile (Q stays in registers, K/V stream
# through shared memory); dK/dV holds a key tile and streams thin query tiles, dQ the reverse. Every candidate
# compiles for sm_90 without register spills, within shared memory, and the 16-bit ones on wgmma
# (`python -m tools.compile_report` prints it; tests/test_kernels.py holds them to it). Absent because they spill at
# D = 128: 4 warps on the 128 x 64 forward, 128 x 32 dQ and 32 x 128 dK/dV tiles; in fp32, nearly every larger tile.
_fwd_autotune = _autotune([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3),
                           (64, 32, 4, 2)],
                          [(32, 64, 8, 2), (16, 16, 4, 1)])
_dkdv_autotune = _autotune([(32, 128, 8, 3), (32, 128, 8, 4), (64, 64, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3)],
                           [(64, 16, 4, 1), (16, 16, 4, 1)])
_dq_autotune = _autotune([(128, 32, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
                         [(32, 64, 8, 2), (16, 16, 4, 1)])


@triton.jit
def _load(ptrs, mask, MASK: tl.constexpr, UPCAST: tl.constexpr):
    """A tile, masked only where it may cross the end of the sequence (the common path pays nothing), and upcast to
    fp32 when interpreting (the interpreter's 16-bit arithmetic is broken)."""
    x = tl.load(ptrs, mask=mask, other=0.0) if MASK else tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, lo, hi, N, qk_scale,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
        kt = _load(kt_ptrs, offs_n[None, :] < N, MASK, UPCAST)
        v = _load(v_ptrs, offs_n[:, None] < N, MASK, UPCAST)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        if MASK:
            qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
        # Scaling inside the max and the exponent (rather than scaling the tile first) lets both fold into FMAs.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_fwd_autotune
@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m[:, None] < N

    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], rows, True, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    n_full = N - N % BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, 0, n_full, N, qk_scale,
                               D, BLOCK_N, False, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, n_full, N, N, qk_scale,
                               D, BLOCK_N, True, UPCAST, PRECISION)

    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)
    o = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=rows)


@triton.jit
def _delta_kernel(Out, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N, D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m[:, None] < N
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sdn, lo, hi, N, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    # Works on the transposed problem (key rows x query columns) so that dK and dV come out as row tiles.
    offs_d = tl.arange(0, D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_base + offs_m[None, :] * sqn + offs_d[:, None]
        do_ptrs = do_base + offs_m[:, None] * sdn + offs_d[None, :]
        qt = _load(qt_ptrs, offs_m[None, :] < N, MASK, UPCAST)
        do = _load(do_ptrs, offs_m[:, None] < N, MASK, UPCAST)
        lse = _load(lse_base + offs_m, offs_m < N, MASK, False)
        delta = _load(delta_base + offs_m, offs_m < N, MASK, False)
        pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            pt = tl.where(offs_m[None, :] < N, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@_dkdv_autotune
@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                 H, N, sm_scale, qk_scale,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows = offs_n[:, None] < N

    k = _load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], rows, True, UPCAST)
    v = _load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], rows, True, UPCAST)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N
    m_full = N - N % BLOCK_M
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sdn, 0, m_full, N, qk_scale,
                         D, BLOCK_M, False, UPCAST, PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sdn, m_full, N, N, qk_scale,
                         D, BLOCK_M, True, UPCAST, PRECISION)

    g_offs = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :]
    tl.store(DK + g_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=rows)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=rows)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, lo, hi, N, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None]
        vt_ptrs = v_base + offs_n[None, :] * svn + offs_d[:, None]
        kt = _load(kt_ptrs, offs_n[None, :] < N, MASK, UPCAST)
        vt = _load(vt_ptrs, offs_n[None, :] < N, MASK, UPCAST)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASK:
            # A padded key scores 0, so p = exp2(-lse) there, which can overflow; zero K alone would not cancel inf.
            p = tl.where(offs_n[None, :] < N, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@_dq_autotune
@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
               H, N, sm_scale, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m[:, None] < N

    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], rows, True, UPCAST)
    do = _load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], rows, True, UPCAST)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    n_full = N - N % BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, 0, n_full, N, qk_scale,
                   D, BLOCK_N, False, UPCAST, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, n_full, N, N, qk_scale,
                   D, BLOCK_N, True, UPCAST, PRECISION)

    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)


def _strides(x: torch.Tensor):
    """(batch, head, token) strides; the kernels assume a unit stride over D, so anything else is copied first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride()[:3]


def _precision(dtype: torch.dtype) -> str:
    # tl.dot on fp32 is TF32 on the GPU unless asked otherwise; 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_forward(q, k, v):
    B, H, N, D = q.shape
    (q, sq), (k, sk), (v, sv) = _strides(q), _strides(k), _strides(v)
    o = new_output((B, H, N, D), q.dtype, q.device)
    lse = new_output((B, H, N), torch.float32, q.device)
    with torch.cuda.device_of(q):
        _fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, *sq, *sk, *sv, *o.stride()[:3], H, N, LOG2E / math.sqrt(D),
            D=D, UPCAST=INTERPRETED, PRECISION=_precision(q.dtype))
    return o.to(q.dtype), lse


def _attention_backward(q, k, v, o, lse, do):
    B, H, N, D = q.shape
    (q, sq), (k, sk), (v, sv), (do, sd) = _strides(q), _strides(k), _strides(v), _strides(do)
    delta = new_output((B, H, N), torch.float32, q.device)
    dq, dk, dv = (new_output((B, H, N, D), q.dtype, q.device) for _ in range(3))
    sg = dq.stride()[:3]
    sm_scale = 1.0 / math.sqrt(D)
    common = {"D": D, "UPCAST": INTERPRETED, "PRECISION": _precision(q.dtype)}
    with torch.cuda.device_of(q):
        _delta_kernel[(triton.cdiv(N, 64), B * H)](o, do, delta, *o.stride()[:3], *sd, H, N, D=D, BLOCK_M=64)
        _dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
            q, k, v, do, dk, dv, lse, delta, *sq, *sk, *sv, *sd, *sg, H, N, sm_scale, sm_scale * LOG2E, **common)
        _dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, *sq, *sk, *sv, *sd, *sg, H, N, sm_scale, sm_scale * LOG2E, **common)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _attention_backward(*ctx.saved_tensors, do)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The spec and the fallback: softmax(Q K^T / sqrt(D)) V computed in fp32, returned in the input dtype."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal, unmasked attention with scale 1/sqrt(D); q, k, v are (B, H, N, D) of one dtype; differentiable.

    D must be 16, 32, 64 or 128; dtypes fp16, bf16 or fp32; any N; any strides.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not use_triton(q):
        return attention_reference(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention kernel supports fp16, bf16 and fp32, got {q.dtype}")
    if q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"attention kernel supports head dims 16, 32, 64, 128, got {q.shape[-1]}")
    return _Attention.apply(q, k, v)


# The autotuned kernels, by the names tiles() gives their choices
_TUNED = {"forward": _fwd_kernel, "dK dV": _dkdv_kernel, "dQ": _dq_kernel}


def warm_up(n: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, ranks=None) -> None:
    """Run the forward and backward kernels once at sequence length n, batch 1 x `heads`, so that the autotuner times
    its tiles now, alone on the GPU, rather than inside a run's first backward beside FSDP's NCCL kernels (which
    skews the timings). A no-op where the kernels do not run (see use_triton).

    With `ranks` (training.runtime.Ranks: several processes) rank 0 alone times the tiles and every rank takes its
    choice (tiles(), broadcast by ranks.from_main) before its own first launch: the winner is a timing, which differs
    from GPU to GPU, and another tile sums the online softmax's blocks in another order, so ranks tuning alone could
    round one model's attention differently.

    The choice is kept per (N, D) for the process. TRITON_CACHE_AUTOTUNING=1 (triton >= 3.4) also writes it to
    TRITON_CACHE_DIR (default ~/.triton/cache), where the next run on the same GPU finds it."""
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    if not use_triton(q):
        return
    main = ranks is None or ranks.main
    if main:  # times every candidate tile
        attention(q, k, v).backward(torch.ones_like(q))
    if ranks is not None:
        use_tiles(ranks.from_main(tiles() if main else None))
    if not main:  # compiles rank 0's tiles, times nothing
        attention(q, k, v).backward(torch.ones_like(q))


def tiles():
    """{kernel name: {autotuning key: the chosen triton.Config}}: what the autotuners chose in this process."""
    return {name: dict(kernel.cache) for name, kernel in _TUNED.items()}


def use_tiles(chosen):
    """Take tiles() of another process: a launch at one of its keys uses its tile, without timing any."""
    for name, kernel in _TUNED.items():
        kernel.cache.update(chosen[name])
