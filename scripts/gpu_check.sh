#!/usr/bin/env bash
# One call on a GPU machine (the device tool): the benchmark tables for BENCHMARKS.md first (the part that matters
# most if the call runs out of time), then the FLUX model with the kernels vs SDPA, the compile report, and the
# kernel tests compiled. Needs only torch + triton beyond the repository, except the tests (requirements-dev.txt).
# Everything printed is also written to $OUT/gpu_check.log (the device tool returns only the output's tail).
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee "${OUT:-/tmp}/gpu_check.log") 2>&1
stamp() { echo "--- $(date -u +%H:%M:%S) $*"; }
py="${PYTHON:-python3}"  # the device image's python3 holds torch; `python` may not exist there
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
stamp bench
"$py" -m kernels.bench
stamp tiny FLUX
"$py" - <<'PY'  # the tiny FLUX with the kernels vs torch SDPA, forward and weight gradients
import torch
import flux_model as fm
# (weights, autocast): fp32; bf16; fp32 master weights under bf16 autocast, as training runs
for dtype, autocast, tol in ((torch.float32, False, 1e-5), (torch.bfloat16, False, 2e-2), (torch.float32, True, 2e-2)):
    torch.manual_seed(0)
    cfg = fm.FluxConfig.preset("tiny")
    model = fm.Flux(cfg).cuda().to(dtype)
    x = (torch.randn(2, 24, 64), fm.image_ids(64, 96), torch.randn(2, 7, 32), torch.zeros(7, 3), torch.randn(2, 32),
         torch.rand(2), torch.full((2,), 3.5))
    x = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in x]
    out = {}
    for backend in ("sdpa", "triton"):
        model.set_attention_backend(backend)
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = model(*x)
        y.float().square().mean().backward()
        out[backend] = (y.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    err = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out["triton"], out["sdpa"])]
    ok = err[0] <= tol and err[1] <= 10 * tol  # gradients sum over many tokens: looser
    print(f"tiny FLUX {dtype}{' + bf16 autocast' if autocast else ''}: triton vs sdpa rel. err. output "
          f"{err[0]:.1e}, weight grads {err[1]:.1e}:", "OK" if ok else "FAIL")
PY
stamp compile report
"$py" -m kernels.compile_report  # registers / spills / shared memory per autotune config, to read beside the timings
stamp kernel tests  # compiled; the slow CPU-only compile checks are left out (the report above covers them)
"$py" -m pytest -q -m "not slow" tests/test_kernels.py 2>&1 | tail -5
stamp done
