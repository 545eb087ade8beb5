"""Triton kernels for the FLUX transformer: `flux_kernels.attention.attention` (fused attention) and
`flux_kernels.rope.norm_rope` (fused per-head RMSNorm + interleaved RoPE), each with a plain-PyTorch `*_reference`;
`flux_kernels.dispatch` decides where they run (compiled, interpreted or the reference).

The functions are not re-exported here: `flux_kernels.attention` must stay the module, not its function of that name.
Benchmarks and the compile report: `python -m tools.bench_kernels`, `python -m tools.compile_report`.
"""
