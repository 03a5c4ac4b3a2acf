"""Inputs shared by tests/test_sharding.py and the 4-device worker it starts."""

import jax.numpy as jnp
import numpy as np
import tiny_configs

from lru_jax import scan

SCAN_CASES = ("invariant_complex", "varying_reverse", "resets_chunked")
TIME, BATCH, STATE = 8, 2, 3


def tiny_config():
    """A few steps of a tiny LRU language model on a global batch of 8."""
    return tiny_configs.tiny_config(batch_size=8, num_steps=4)


def scan_inputs(case: str):
    """(a, b [TIME, BATCH, STATE], h0 [BATCH, STATE], linear_scan keyword arguments)."""
    rng = np.random.default_rng(SCAN_CASES.index(case))

    def cnormal(*shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)

    if case == "varying_reverse":
        a = rng.uniform(0.5, 1.0, (TIME, BATCH, STATE)).astype(np.float32)
        b = rng.normal(size=(TIME, BATCH, STATE)).astype(np.float32)
        h0 = rng.normal(size=(BATCH, STATE)).astype(np.float32)
        return a, b, h0, {"reverse": True}
    radius = rng.uniform(0.6, 0.99, STATE)
    a = (radius * np.exp(1j * rng.uniform(0, np.pi, STATE))).astype(np.complex64)
    kwargs = {}
    if case == "resets_chunked":
        kwargs = {"resets": rng.random((TIME, BATCH)) < 0.2, "method": "chunked"}
    return a, cnormal(TIME, BATCH, STATE), cnormal(BATCH, STATE), kwargs


def scan_loss(a, b, h0, **kwargs):
    """A real function of every state, so gradients reach a, b and h0."""
    h = scan.linear_scan(a, b, h0, **kwargs)
    weights = jnp.arange(1, h.size + 1, dtype=jnp.float32).reshape(h.shape) / h.size
    return jnp.sum(weights * jnp.real(h)) + jnp.sum(jnp.abs(h) ** 2)
