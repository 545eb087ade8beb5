"""Sampling: the schedule, the Euler sampler, decoding and the `sample` command (sampler), and what is FLUX.1's and
FLUX.2's own in it (flux_sampling, flux2_sampling; families.py holds both in one table)."""
