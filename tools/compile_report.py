"""Compile the kernels for a GPU that is not here, and report what the compiler made of each autotune config:
`python -m tools.compile_report [--arch 90] [--dtype bf16] [--head-dim 128] [--tokens 4608]`.

Triton's compiler and ptxas run on any machine; only loading and launching need a GPU. So this is the compiled
path's check where none is lent: it compiles exactly what the launchers would launch (their calls are captured on
meta tensors, at FLUX's shapes by default) for every config the autotuner would try, and prints per config:

- registers per thread and spilled bytes (ptxas' resource usage, via cuobjdump): a spill is local-memory traffic
  inside the inner loop, the first thing that wrecks a flash-attention kernel;
- shared memory (K/V or Q/dO tiles times pipeline stages): a config over the card's per-block limit cannot launch,
  and the autotuner silently drops it;
- the matrix instruction tl.dot became: `wgmma` (Hopper's asynchronous warpgroup MMA, what FA3-class speed needs),
  `mma` (Ampere's warp MMA) or none (fp32 with input_precision="ieee" runs on FMA units);
- resident CTAs per SM from registers, shared memory and threads (how much latency the SM can hide).

It says nothing about time: that needs the card (`python -m tools.bench_kernels`). TRITON_INTERPRET must be unset, so
that the kernels are decorated for compilation. A development tool on compiler internals: it reads triton.knobs
(triton >= 3.4) and has been run with triton 3.6 and 3.8 only.
"""

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

from flux_kernels import attention as attention_module
from flux_kernels import rope as rope_module
from flux_kernels.dispatch import INTERPRETED


@dataclasses.dataclass(frozen=True)
class Card:
    """The per-SM limits that decide whether a config launches and how many CTAs share an SM."""
    name: str
    shared_per_block: int  # bytes a CTA may opt in to
    shared_per_sm: int
    registers_per_sm: int = 65536
    warps_per_sm: int = 64


CARDS = {90: Card("H100 (sm_90)", 227 * 1024, 228 * 1024), 80: Card("A100 (sm_80)", 163 * 1024, 164 * 1024)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher issued it: the kernel object, positional args and keyword args."""
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def captured_launches(dtype: torch.dtype, head_dim: int, tokens: int, batch: int = 1, heads: int = 24):
    """The launches of attention forward + backward and norm_rope forward + backward at one shape, as the launchers
    issue them (tensors on the meta device: shapes, strides and dtypes without memory)."""
    launches = []
    swapped = [(module, name) for module in (attention_module, rope_module) for name in dir(module)
               if isinstance(getattr(module, name), (triton.runtime.JITFunction, triton.runtime.Autotuner))]
    originals = {(module, name): getattr(module, name) for module, name in swapped}
    try:
        for (module, name), kernel in originals.items():
            setattr(module, name, _Recorder(kernel, launches))
        shape = (batch, heads, tokens, head_dim)
        q, k, v, do = (torch.empty(shape, dtype=dtype, device="meta") for _ in range(4))
        o, lse = attention_module._attention_forward(q, k, v)
        attention_module._attention_backward(q, k, v, o, lse, do)
        # x as FLUX hands it over: a (B, N, H, D) projection output viewed as (B, H, N, D)
        x = torch.empty(batch, tokens, heads, head_dim, dtype=dtype, device="meta").transpose(1, 2).requires_grad_()
        scale = torch.empty(head_dim, dtype=dtype, device="meta", requires_grad=True)
        cos = torch.empty(tokens, head_dim // 2, device="meta")
        out = rope_module._NormRope.apply(x, scale, cos, cos, 1e-6)
        torch.autograd.grad(out, (x, scale), torch.empty_like(out))
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def _named(fn, args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}  # the constexprs come as keywords


def _source(fn, args: tuple, kwargs: dict, backend) -> ASTSource:
    """What `fn[grid](*args, **kwargs)` hands the compiler, specialized by Triton's own launcher rule: argument types,
    constexprs (declared ones, and integers equal to 1), and divisibility by 16 of pointers and integers (it lets
    loads vectorize; the meta tensors here count as aligned, as real allocations are)."""
    values = _named(fn, args, kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            kind, spec = "constexpr", values[name]
        else:
            kind, spec = native_specialize_impl(backend, values[name], param.is_const, not param.do_not_specialize,
                                                not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return ASTSource(fn, signature, constexprs, attrs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spilled bytes per thread) from ptxas' record in the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for line in text.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"])


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "none"


def _ctas_per_sm(card: Card, registers: int, shared: int, warps: int) -> int:
    # registers are allocated per warp in units of 256 (8 per thread); the driver reserves 1 KB of shared per CTA
    by_registers = card.registers_per_sm // (-(-registers // 8) * 8 * 32 * warps)
    by_shared = card.shared_per_sm // (shared + 1024)
    return min(by_registers, by_shared, card.warps_per_sm // warps)


@dataclasses.dataclass
class Compiled:
    kernel: str
    config: dict  # constexpr tiles plus num_warps / num_stages
    registers: int = 0
    spilled: int = 0
    shared: int = 0
    mma: str = ""
    ctas_per_sm: int = 0
    error: str = ""  # a compile failure; a config over the shared-memory limit is not one (see `fits`)

    def fits(self, card: Card) -> bool:
        return not self.error and self.shared <= card.shared_per_block


def compile_launch(launch: Launch, arch: int) -> list[Compiled]:
    """Compile one captured launch for sm_`arch`, once per config the autotuner would try."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    if isinstance(kernel, triton.runtime.Autotuner):
        fn, configs = kernel.fn, kernel.configs
        if kernel.early_config_prune:  # the autotuner's own narrowing, e.g. by dtype
            configs = kernel.early_config_prune(configs, _named(fn, launch.args, kwargs))
    else:
        fn = kernel
        configs = [triton.Config({}, num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))]
    card, results = CARDS[arch], []
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    for config in configs:
        tiles = {k: v for k, v in {**kwargs, **config.kwargs}.items() if k.startswith("BLOCK_")}
        meta = {**tiles, "num_warps": config.num_warps, "num_stages": config.num_stages}
        result = Compiled(fn.__name__, meta)
        try:
            compiled = triton.compile(_source(fn, launch.args, {**kwargs, **config.kwargs}, backend), target=target,
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        except Exception as exc:  # noqa: BLE001 - one failing config is a row of the report, not the end of it
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
            results.append(result)
            continue
        result.registers, result.spilled = _resource_usage(compiled.asm["cubin"])
        result.shared, result.mma = compiled.metadata.shared, _mma(compiled.asm["ptx"])
        result.ctas_per_sm = _ctas_per_sm(card, result.registers, result.shared, config.num_warps)
        results.append(result)
    return results


def report(arch: int, dtype: torch.dtype, head_dim: int, tokens: int) -> tuple[list[str], list[Compiled]]:
    card, dtype_name = CARDS[arch], str(dtype).removeprefix("torch.")
    lines = [f"### Compiled for {card.name}: {dtype_name}, D {head_dim}, N {tokens} (no GPU involved)", "",
             "| kernel | tiles | warps | stages | registers | spilled B | shared KB | MMA | CTAs/SM | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    results = []
    for launch in captured_launches(dtype, head_dim, tokens):
        for r in compile_launch(launch, arch):
            results.append(r)
            tiles = " x ".join(f"{k.removeprefix('BLOCK_')} {v}" for k, v in r.config.items() if k.startswith("BLOCK"))
            if r.error:
                note = r.error
            elif not r.fits(card):
                note = f"over the {card.shared_per_block // 1024} KB per block: the autotuner skips it"
            else:
                note = "spills" if r.spilled else ""
            lines.append(f"| {r.kernel} | {tiles} | {r.config['num_warps']} | {r.config['num_stages']} | "
                         f"{r.registers} | {r.spilled} | {r.shared / 1024:.0f} | {r.mma} | {r.ctas_per_sm} | {note} |")
    return lines, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(CARDS), default=90)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, choices=(16, 32, 64, 128), default=128)
    parser.add_argument("--tokens", type=int, default=4608)
    args = parser.parse_args(argv)
    if INTERPRETED:
        print("error: TRITON_INTERPRET=1 is set; the kernels must be decorated for compilation", file=sys.stderr)
        return 2
    lines, results = report(args.arch, DTYPES[args.dtype], args.head_dim, args.tokens)
    print("\n".join(lines))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
