"""The timing harness: failures and wrong results are left out, not timed."""

import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import timing


def test_a_failing_candidate_is_reported_only_when_failures_may_be_skipped():
    def broken(x):
        raise ValueError("no kernel for this shape")

    x = jnp.ones(3)
    results = timing.measure_group([(jnp.sin, (x,)), (broken, (x,))], 2, skip_failures=True)
    assert results[1] == {"error": "ValueError: no kernel for this shape"}
    assert results[0]["median_ms"] > 0
    with pytest.raises(ValueError, match="no kernel"):
        timing.measure_group([(jnp.sin, (x,)), (broken, (x,))], 1)


def test_a_candidate_failing_its_check_is_left_out():
    def exact(output):
        if not np.allclose(output, np.sin(np.arange(3.0))):
            raise ValueError("off by 1e-3")

    x = jnp.arange(3.0)
    candidates = [(jnp.sin, (x,)), (lambda v: jnp.sin(v) + 1e-3, (x,))]
    results = timing.measure_group(candidates, 1, skip_failures=True, check=exact)
    assert "median_ms" in results[0] and results[1] == {"error": "ValueError: off by 1e-3"}
