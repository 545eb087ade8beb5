"""Tools beside the method, none of them imported by it; each runs from the repository root as `python -m tools.X`
(gpu_check.sh as `tools/gpu_check.sh`):

- `bench_kernels`: the Triton kernels vs PyTorch at FLUX shapes (a GPU; without one, an interpreter pass);
- `compile_report`: what Triton and ptxas make of every autotune config for an H100, on any machine;
- `bench_sample`: time per sampling step, ours vs diffusers' FluxPipeline, on a CPU;
- `memory_estimate`: GPU memory (and model calls, FLOP, copies) of one training step at FLUX.1-dev's or FLUX.2
  [klein]'s sizes, measured on a CPU;
- `preflight`: is this Python fit to run the repository (requirements present and imports, no shadowed names);
- `try_newest`: the newest versions from PyPI in a new venv (install, demo, tests) against constraints.txt;
- `gpu_check.sh`: the GPU-only checks, sized for device calls of at most 600 s.
"""
