"""Test-wide settings: exact float32 matmuls (no TF32 on GPUs) so tolerances mean the same
on every platform; XLA's cheapest CPU compilation, because the suite's shapes are tiny and its
time goes to compiling, not running (subprocesses inherit it): the backend's lowest
optimisation, the older elemental emitters in place of the fusion emitters (which compile
faster) and the module compiled in one piece, not split for parallel codegen."""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1",
)

import jax  # noqa: E402  (XLA reads XLA_FLAGS when the backend starts)

jax.config.update("jax_default_matmul_precision", "highest")
