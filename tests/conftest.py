"""Test-wide settings: exact float32 matmuls (no TF32 on GPUs) so tolerances mean the same
on every platform; XLA's cheapest backend optimisation, because the suite's shapes are tiny and
its time goes to compiling, not running (subprocesses inherit it)."""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax  # noqa: E402  (XLA reads XLA_FLAGS when the backend starts)

jax.config.update("jax_default_matmul_precision", "highest")
