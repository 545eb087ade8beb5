"""Where the kernels of this package run, and the buffers they write: shared by flux_kernels/attention.py and rope.py.

Dispatch (`use_triton`): CUDA tensors run the compiled kernels; CPU tensors run the same kernels in the Triton
interpreter when TRITON_INTERPRET=1 at call time; anything else runs the kernel's plain-PyTorch `*_reference`.
Triton itself decides compiled vs interpreted when `@triton.jit` decorates, i.e. when triton (its own library of jit
functions) and the kernels are imported, so interpreting also needs TRITON_INTERPRET=1 at import (tests/conftest.py
does that on CPU-only machines); a CPU call that asks for the interpreter in a process that imported triton without
it fails with a clear error rather than falling back silently. Which mode the kernels got is read off a decorated
probe, not from triton's settings: triton >= 3.4 decides by `triton.knobs.runtime.interpret`, earlier versions by
TRITON_INTERPRET == "1" in the environment, and there is no `knobs` before 3.4.

Triton launches a kernel on the current CUDA device and its current stream, whatever device the pointers are on;
every launcher therefore runs under `torch.cuda.device_of(x)` (a no-op off CUDA), so that `--device cuda:1` launches
on GPU 1, on the stream torch is using there.
"""

import os

import torch
import triton


@triton.jit
def _probe():
    """Decorated like every kernel, so its type tells which mode triton chose for them (see above)."""


INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


def use_triton(x: torch.Tensor) -> bool:
    """True where the kernels run on x: compiled on CUDA, interpreted on a CPU under TRITON_INTERPRET=1."""
    if x.is_cuda:
        return True
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if not INTERPRETED:
            raise RuntimeError("TRITON_INTERPRET=1 must already be set when triton and kernels are imported")
        return True
    return False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill: NaN-filled when KERNELS_POISON_OUTPUTS=1, so unwritten elements show.

    When interpreting, 16-bit outputs are written in fp32 (the interpreter's fp32 -> bf16 cast truncates instead of
    rounding) and the caller casts them on the torch side.
    """
    if INTERPRETED and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if os.environ.get("KERNELS_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
