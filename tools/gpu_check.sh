#!/usr/bin/env bash
# The GPU checks, in device calls sized for a session's 15 minutes of device time (a machine's start, ~1-2 min,
# included), most important first:
#
#   tools/gpu_check.sh         call 1 (~9 min): the CUDA paths no CPU test can run, on the tiny demo models: one
#                              FLUX.1 training step with --offload (nccl beside gloo), one LoRA step with --offload
#                              (the bf16 base beside fp32 adapters in FSDP2), one FLUX.2 step (CFG branches), all on
#                              SDPA; one step on the default path (the Triton kernels tuned at warm-up, inside FSDP2
#                              by --offload, per-block checkpointing, bf16 autocast); then both families' tiny
#                              transformers and one FLUX-shaped double block with the kernels compiled vs SDPA
#                              (tools.backend_parity: fp32, bf16, bf16 autocast; the block's 4,608 tokens of
#                              head width 128 under autocast; outputs and weight gradients)
#   tools/gpu_check.sh bench   call 2 (~5 min): the kernel benchmark tables for BENCHMARKS.md
#   tools/gpu_check.sh tests   call 3 (~4 min, estimated): the kernel tests compiled, each kernel on one fixed tile
#                              per dtype (KERNELS_FIXED_TILES=1: autotuning would compile and time 16 candidates
#                              at every test's shape, ~250 compiles, far past one call)
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
#   call 1:  card 10 + versions 20 + 3 SDPA steps 3 x 45 + Triton step 100 + parity 200 (+ 7 x 5 grace) = 500 s
#            (+ the pre-flight: 565 s at most, within one 600 s call)
#            SDPA steps: start-up, the tiny models, a 4-step rollout and 2 branches at 64x64 (no kernel compiles), the
#            before/after grids and the checkpoint (~20 s each)
#            Triton step: the same, after the warm-up's autotuning of the 16 bf16 tiles at head width 32 (~50 s)
#            parity: the compiles of the step come from Triton's disk cache; new ones: the fp32 tiles at width 32,
#            the 16 bf16 tiles at width 128 timed at 4,608 tokens (~60 s); 7 cases of two backends each
#   call 2:  bench 280 (+ 5 grace): attention autotuning compiles 17 configs for each of the 2 N specializations
#            (~100 s), the RMSNorm+RoPE rows ~18 Inductor graphs (~100 s), ~60 timings of do_bench (~40 s), start-up
#   call 3:  pytest check 5 + kernel tests 570 (+ 5 grace): one tile per (kernel, dtype), each compiled once per head
#            width and dtype, ~60 compiles. Each test stops at 120 s with pytest-timeout, else pytest's own
#            faulthandler_timeout prints the stacks of a test past 120 s (it stops nothing: the section's limit
#            does); with pytest-xdist, 4 workers. Neither is on the device image: carry their wheels in .whl to
#            have them. If the tests do not fit, pytest's summary says how far they got and `-k` narrows a rerun
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
    per_test=(-o faulthandler_timeout=120)  # pytest's own: the stacks of a test still running after 120 s
    if "$py" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 120); fi  # stops that test too
    workers=()
    if "$py" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
    section "kernel tests, compiled, fixed tiles" 570 env KERNELS_FIXED_TILES=1 "$py" -m pytest -q -m "not slow" \
        "${per_test[@]}" "${workers[@]}" tests/test_kernels.py
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
tiny=(--device cuda:0 --steps 1 --height 64 --width 64 --rollout-steps 4 --samples 1)
sdpa=(--attn sdpa "${tiny[@]}")
section "one --offload step" 45 "$py" srpo.py train --offload --out "$steps/offload" "${sdpa[@]}"
section "one LoRA --offload step" 45 "$py" srpo.py train --lora-rank 4 --offload --out "$steps/lora" "${sdpa[@]}"
section "one FLUX.2 step" 45 "$py" srpo.py train --family flux2 --out "$steps/flux2" "${sdpa[@]}"
# the default attention: no --attn (the Triton kernels on CUDA), FSDP2 in one process by --offload
section "one step, default attention (Triton)" 100 "$py" srpo.py train --offload --out "$steps/triton" "${tiny[@]}"
section "kernels vs SDPA, both families and a FLUX block" 200 "$py" -m tools.backend_parity
stamp "done (then: tools/gpu_check.sh bench, a second call; the compiled kernel tests: tools/gpu_check.sh tests)"
