"""Test-wide settings: exact float32 matmuls (no TF32 on GPUs) so tolerances mean the same
on every platform."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
