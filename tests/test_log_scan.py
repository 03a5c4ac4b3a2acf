"""log_linear_scan against a float64 numpy loop, and where it beats the plain float32 scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax.scan import LOG_METHODS, linear_scan, log_linear_scan


def numpy_loop(log_a, log_b, log_h0=None, reverse=False, resets=None):
    """h_t = a_t h_{t-1} + b_t one step at a time in float64, from the logs (the definition)."""
    a, b = np.exp(np.float64(log_a)), np.exp(np.float64(log_b))
    a = np.broadcast_to(a, b.shape)
    h = np.zeros(b.shape[1:]) if log_h0 is None else np.exp(np.float64(log_h0))
    out = np.zeros(b.shape)
    for t in range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0]):
        a_t = a[t] if resets is None else np.where(resets[t][:, None], 0.0, a[t])
        h = a_t * h + b[t]
        out[t] = h
    return out


def _case(rng, time=12):
    log_a = rng.uniform(-2.0, -0.01, (time, 3, 4)).astype(np.float32)
    log_b = rng.normal(size=(time, 3, 4)).astype(np.float32)
    log_h0 = rng.normal(size=(3, 4)).astype(np.float32)
    resets = rng.uniform(size=(time, 3)) < 0.2
    return log_a, log_b, log_h0, resets


@pytest.mark.parametrize("method", LOG_METHODS)
def test_forward_matches_a_float64_loop(method):
    log_a, log_b, log_h0, resets = _case(np.random.default_rng(0))
    restarts = {} if method == "cumsum" else {"resets": resets}
    scan = jax.jit(log_linear_scan, static_argnames=("method", "reverse", "return_log"))
    for kwargs, reverse in (({}, False), ({"log_h0": log_h0, **restarts}, True)):
        got = scan(log_a, log_b, method=method, reverse=reverse, **kwargs)
        want = numpy_loop(log_a, log_b, reverse=reverse, **kwargs)
        np.testing.assert_allclose(np.asarray(got), want, rtol=3e-6)
    if method == "sequential":  # a time-invariant decay; log h itself; "auto" on CPU
        got = scan(log_a[0], log_b, method=method, return_log=True)
        np.testing.assert_allclose(np.asarray(got), np.log(numpy_loop(log_a[0], log_b)), atol=2e-6)
        if jax.default_backend() == "cpu":
            auto = scan(log_a, log_b, method="auto")
            np.testing.assert_array_equal(auto, scan(log_a, log_b, method=method))


@jax.jit
def _plain_grads(log_a, log_b, log_h0, resets):
    def loss(*logs):
        h = linear_scan(*(jnp.exp(v) for v in logs), method="sequential", resets=resets)
        return jnp.sum(jnp.sin(h))

    return jax.grad(loss, (0, 1, 2))(log_a, log_b, log_h0)


@pytest.mark.parametrize("method", LOG_METHODS)
def test_gradients_equal_the_plain_scans(method):
    """d/d(log a, log b, log h0) of a loss of h, against the plain scan of exp(...), where the
    plain scan is exact; resets leave no nan behind."""
    log_a, log_b, log_h0, resets = _case(np.random.default_rng(1), time=9)
    resets = np.zeros_like(resets) if method == "cumsum" else resets

    def loss(*logs):
        restarts = None if method == "cumsum" else resets
        return jnp.sum(jnp.sin(log_linear_scan(*logs, method=method, resets=restarts)))

    got = jax.jit(jax.grad(loss, (0, 1, 2)))(log_a, log_b, log_h0)
    want = _plain_grads(log_a, log_b, log_h0, resets)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-5)


def test_a_state_below_float32s_range_stays_exact_in_log_space():
    """64 steps with log a_t in [-3, -2]: the product of the a_t reaches e^-150, and so does the
    state (inputs that shrink with it, h0 = 1). Below float32's smallest normal (e^-87) the
    plain associative scan loses the state, and flushes it to zero where float32 has no number
    for it at all; log h stays right to 1e-4 (a few float32 spacings at |log h| ~ 150, so
    1e-4 relative in h) against the float64 loop."""
    rng = np.random.default_rng(2)
    log_a = rng.uniform(-3.0, -2.0, (64, 1, 4)).astype(np.float32)
    a_star = np.cumsum(np.float64(log_a), axis=0)
    log_b = (a_star + rng.uniform(-3.0, 0.0, a_star.shape)).astype(np.float32)
    log_h0 = np.zeros((1, 4), np.float32)
    want = np.log(numpy_loop(log_a, log_b, log_h0))
    assert want.min() < -140
    plain = jax.jit(linear_scan, static_argnames="method")(
        np.exp(log_a), np.exp(log_b), np.exp(log_h0), method="associative"
    )
    relative_error = np.abs(np.asarray(plain) / np.exp(want) - 1)
    assert np.all(relative_error[want < -110] == 1.0)  # zero: 100% off
    assert np.all(relative_error[want > -80] < 1e-5)  # where float32 holds h, it is right
    got = jax.jit(log_linear_scan, static_argnames=("method", "return_log"))(
        log_a, log_b, log_h0, method="associative", return_log=True
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_the_papers_cumsum_form_loses_precision_on_long_strongly_decaying_sequences():
    """T = 1024, log a_t in [-3, -1]: |a*_T| ~ 2000, whose float32 spacing (2^-13) becomes the
    cumsum form's error in log h; the log-semiring scan stays at float32 rounding."""
    rng = np.random.default_rng(3)
    log_a = -rng.uniform(1.0, 3.0, (1024, 1, 4)).astype(np.float32)
    log_b = rng.normal(size=(1024, 1, 4)).astype(np.float32)
    want = numpy_loop(log_a, log_b)

    def error(method):
        got = jax.jit(log_linear_scan, static_argnames="method")(log_a, log_b, method=method)
        return np.max(np.abs(np.asarray(got) / want - 1))

    assert error("cumsum") > 1e-4
    assert error("sequential") < 3e-6


def test_bad_input_is_named():
    log_a, log_b = np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(TypeError, match="log_a: expected a floating-point dtype"):
        log_linear_scan(log_a.astype(np.complex64), log_b)
    with pytest.raises(ValueError, match="log_a and log_b must broadcast"):
        log_linear_scan(np.zeros((4, 3), np.float32), log_b)
    with pytest.raises(ValueError, match="log_h0: expected a shape broadcastable"):
        log_linear_scan(log_a, log_b, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="method: expected one of"):
        log_linear_scan(log_a, log_b, method="chunked")
    with pytest.raises(ValueError, match="resets: method 'cumsum' cannot restart"):
        log_linear_scan(log_a, log_b, method="cumsum", resets=np.zeros((4, 2), bool))
    with pytest.raises(TypeError, match="reverse: expected a bool"):
        log_linear_scan(log_a, log_b, reverse=1)
