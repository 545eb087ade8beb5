#!/usr/bin/env bash
# The GPU checks, sized for device calls of at most 600 s each (the device tool's limit per command).
#
#   tools/gpu_check.sh         call 1: one training step with --offload and one LoRA step with --offload on the
#                              tiny demo models (the CUDA paths no CPU test can run: nccl beside gloo, the bf16 base
#                              beside fp32 adapters in FSDP2), then the benchmark tables for BENCHMARKS.md, then the
#                              tiny FLUX model with the kernels vs SDPA
#   tools/gpu_check.sh tests   call 2: the kernel tests, compiled (tests/test_kernels.py without the slow ones)
#
# Each section runs under its own `timeout`, so one that hangs or runs long cannot take the others' time. The limits
# are estimates for an H100-class card; the per-call sums stay under 600 s (timeout's 5 s kill grace included):
#   call 1:  card 10 + versions 20 + 2 steps 2 x 60 + bench 280 + tiny FLUX 110 (+ 6 x 5 grace) = 570 s
#            steps: start-up, the tiny models, a 4-step rollout and 2 branches at 64x64 on SDPA (no kernel compiles),
#            the before/after grids and the checkpoint (~20 s each)
#            bench: attention autotuning compiles 17 configs for each of the 2 N specializations (~100 s), the
#            RMSNorm+RoPE rows ~18 Inductor graphs (~100 s), ~60 timings of do_bench (~40 s), start-up (~15 s)
#            tiny FLUX: 3 dtype setups; the kernels compile for its head width in fp32 and bf16 (~35 configs, ~80 s)
#   call 2:  pytest check 5 + kernel tests 570 (+ 5 grace)                        = 580 s
#            every (head width, dtype) case compiles its autotune candidates: roughly 200 compiles; if they do not
#            fit, pytest's summary says how far it got and `-k` narrows a rerun
# The compile report (`python -m tools.compile_report`: registers, spills, shared memory per autotune config) needs
# no GPU: run it on any machine, not on device time. Needs torch + triton beyond the repository; call 2 also pytest
# (requirements-dev.txt), and skips with a message where it is missing. Everything printed is also written to
# $OUT/gpu_check.log (the device tool returns only the output's tail).
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee "${OUT:-/tmp}/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1  # a section stopped by its timeout still shows what it printed
py="${PYTHON:-python3}"  # the device image's python3 holds torch; `python` may not exist there
stamp() { echo "--- $(date -u +%H:%M:%S) $*"; }

section() {  # section NAME SECONDS COMMAND...: COMMAND under its own time limit; says how it ended
    local name=$1 limit=$2 rc
    shift 2
    stamp "$name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "--- $name: stopped at its ${limit} s limit"
    elif [ "$rc" -ne 0 ]; then
        echo "--- $name: exit code $rc"
    fi
}

if [ "${1:-}" = tests ]; then
    if ! "$py" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed for $py: the kernel tests are skipped (pip install pytest, see requirements-dev.txt)"
        exit 0
    fi
    section "kernel tests, compiled" 570 "$py" -m pytest -q -m "not slow" tests/test_kernels.py
    stamp done
    exit 0
fi

section card 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
section versions 20 "$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)"
steps=$(mktemp -d)
tiny=(--device cuda:0 --attn sdpa --steps 1 --height 64 --width 64 --rollout-steps 4 --samples 1)
section "one --offload step" 60 "$py" srpo.py train --offload --out "$steps/offload" "${tiny[@]}"
section "one LoRA --offload step" 60 "$py" srpo.py train --lora-rank 4 --offload --out "$steps/lora" "${tiny[@]}"
section bench 280 "$py" -m tools.bench_kernels
section "tiny FLUX" 110 "$py" - <<'PY'  # the tiny FLUX with the kernels vs torch SDPA, forward and weight gradients
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
stamp "done (the compiled kernel tests: tools/gpu_check.sh tests, a second call)"
