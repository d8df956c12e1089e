"""Compute kernels of the compose path (Triton for GPUs, torch as the CPU path and the reference).

Installed as `knots_serve.kernels` (see pyproject.toml), never as a top-level `kernels` package: that name
belongs to Hugging Face's `kernels`, which transformers probes for at import time.
"""
