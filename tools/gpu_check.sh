#!/usr/bin/env bash
# The GPU checks, in device calls sized for a session's 15 minutes of device time (a machine's start, ~1-2 min,
# included), most important first:
#
#   tools/gpu_check.sh         call 1 (~7 min): the CUDA paths no CPU test can run, on the tiny demo models: one
#                              FLUX.1 training step with --offload (nccl beside gloo), one LoRA step with --offload
#                              (the bf16 base beside fp32 adapters in FSDP2), one FLUX.2 step (CFG branches); then
#                              both families' tiny transformers with the kernels compiled vs SDPA
#                              (tools.backend_parity: fp32, bf16, bf16 autocast; velocity and weight gradients)
#   tools/gpu_check.sh bench   call 2 (~5 min): the kernel benchmark tables for BENCHMARKS.md
#   tools/gpu_check.sh tests   call 3 (~10 min, another session's time): the kernel tests compiled
#
# The device image is not ours (torch 2.11, triton 3.6, transformers 5.17; no ftfy, no wcwidth, nothing can be
# installed there): each call starts with `python -m tools.preflight` (seconds), which names what is missing.
# Bring the missing packages as wheels: here, before the device call, `tools/gpu_check.sh wheels` downloads them
# for the image's Python 3.12 into .whl/ (git-ignored) at constraints.txt's versions; name `.whl` in the call's
# carry, and this script installs them into a temporary folder there before the pre-flight. Call 1 stops at a
# failed pre-flight (its steps need everything); calls 2 and 3 need only torch and triton and go on.
#
# Each section runs under its own `timeout`, so one that hangs or runs long cannot take the others' time. The limits
# are estimates for an H100-class card (timeout's 5 s kill grace each):
#   each:    pre-flight 60 (+ 5 grace; it takes seconds: imports, no GPU work)
#   call 1:  card 10 + versions 20 + 3 steps 3 x 60 + parity 150 (+ 6 x 5 grace)  = 390 s (+ the pre-flight)
#            steps: start-up, the tiny models, a 4-step rollout and 2 branches at 64x64 on SDPA (no kernel compiles),
#            the before/after grids and the checkpoint (~20 s each)
#            parity: the kernels compile for the tiny models' head width (32, both families) in fp32 and bf16,
#            ~35 autotune configs (~80 s), then 6 cases of two backends each
#   call 2:  bench 280 (+ 5 grace): attention autotuning compiles 17 configs for each of the 2 N specializations
#            (~100 s), the RMSNorm+RoPE rows ~18 Inductor graphs (~100 s), ~60 timings of do_bench (~40 s), start-up
#   call 3:  pytest check 5 + kernel tests 570 (+ 5 grace): every (head width, dtype) case compiles its autotune
#            candidates, roughly 200 compiles; if they do not fit, pytest's summary says how far it got and `-k`
#            narrows a rerun
# The compile report (`python -m tools.compile_report`: registers, spills, shared memory per autotune config) needs
# no GPU: run it on any machine, not on device time. Needs torch + triton beyond the repository; call 3 also pytest
# (requirements-dev.txt), and skips with a message where it is missing. Everything printed is also written to
# $OUT/gpu_check.log (the device tool returns only the output's tail).
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee "${OUT:-/tmp}/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1  # a section stopped by its timeout still shows what it printed
py="${PYTHON:-python3}"  # the device image's python3 holds torch; `python` may not exist there
stamp() { echo "--- $(date -u +%H:%M:%S) $*"; }

section() {  # section NAME SECONDS COMMAND...: COMMAND under its own time limit; says how it ended (and leaves rc)
    local name=$1 limit=$2
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

if [ "${1:-}" = wheels ]; then  # here, not on the device: ftfy and wcwidth at the tested versions, for its Python
    pins=$(grep -iE '^(ftfy|wcwidth)==' constraints.txt)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        $pins && ls .whl
    exit
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels: installed beside the image's packages, not over them
    site=$(mktemp -d)
    "$py" -m pip install -q --root-user-action ignore --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
        && export PYTHONPATH="$site"
fi
section pre-flight 60 "$py" -m tools.preflight
if [ "$rc" -ne 0 ] && [ -z "${1:-}" ]; then
    echo "--- call 1 stops here: its training steps need what the pre-flight names (see this script's header)"
    exit 1
fi

if [ "${1:-}" = tests ]; then
    if ! "$py" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed for $py: the kernel tests are skipped (pip install pytest, see requirements-dev.txt)"
        exit 0
    fi
    section "kernel tests, compiled" 570 "$py" -m pytest -q -m "not slow" tests/test_kernels.py
    stamp done
    exit 0
fi
if [ "${1:-}" = bench ]; then
    section bench 280 "$py" -m tools.bench_kernels
    stamp done
    exit 0
fi

section card 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
section versions 20 "$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)"
steps=$(mktemp -d)
tiny=(--device cuda:0 --attn sdpa --steps 1 --height 64 --width 64 --rollout-steps 4 --samples 1)
section "one --offload step" 60 "$py" srpo.py train --offload --out "$steps/offload" "${tiny[@]}"
section "one LoRA --offload step" 60 "$py" srpo.py train --lora-rank 4 --offload --out "$steps/lora" "${tiny[@]}"
section "one FLUX.2 step" 60 "$py" srpo.py train --family flux2 --out "$steps/flux2" "${tiny[@]}"
section "kernels vs SDPA, both families" 150 "$py" -m tools.backend_parity
stamp "done (then: tools/gpu_check.sh bench, a second call; the compiled kernel tests: tools/gpu_check.sh tests)"
