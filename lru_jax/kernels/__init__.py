"""Accelerator kernels behind `lru_jax.scan.linear_scan` (imported lazily, only when asked for).

- `pallas_scan`: the diagonal linear scan as a Pallas kernel for GPUs (Triton lowering);
  interpret mode elsewhere.
"""
