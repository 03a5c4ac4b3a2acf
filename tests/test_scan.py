"""linear_scan against a numpy loop, forward and gradients, for every method."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lru_jax.scan import linear_scan

METHODS = ["sequential", "associative", "chunked", "auto"]


def numpy_scan(a, b, h0=None, reverse=False, resets=None):
    """The definition, one step at a time, in float64/complex128."""
    b = np.asarray(b, np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64)
    a = np.broadcast_to(np.asarray(a, b.dtype), np.broadcast_shapes(np.shape(a), b.shape))
    b = np.broadcast_to(b, a.shape)
    h = np.zeros(b.shape[1:], b.dtype) if h0 is None else np.broadcast_to(h0, b.shape[1:])
    out = np.zeros(b.shape, b.dtype)
    steps = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
    for t in steps:
        a_t = a[t]
        if resets is not None and resets[t].any():
            restart = resets[t].reshape(resets[t].shape + (1,) * (b.ndim - resets.ndim))
            a_t = np.where(restart, 0, a_t)
        h = a_t * h + b[t]
        out[t] = h
    return out


def numpy_scan_grads(a, b, h0, cotangent):
    """Gradients of sum(cotangent * h) for real inputs and full-shape a, by the adjoint loop.

    g_t = dL/dh_t (total) = c_t + a_{t+1} g_{t+1};  dL/da_t = g_t h_{t-1};  dL/db_t = g_t.
    """
    h = numpy_scan(a, b, h0)
    g = np.zeros_like(h)
    carry = np.zeros(h.shape[1:])
    for t in range(h.shape[0] - 1, -1, -1):
        carry = cotangent[t] + (a[t + 1] * carry if t + 1 < h.shape[0] else 0)
        g[t] = carry
    h_prev = np.concatenate([h0[None], h[:-1]], axis=0)
    return g * h_prev, g, a[0] * g[0]


def _case(rng, time, complex_=False, time_varying=True):
    shape = (time, 3, 4)
    a = rng.uniform(0.6, 1.0, size=shape if time_varying else shape[-1:])
    b = rng.normal(size=shape)
    h0 = rng.normal(size=shape[1:])
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, size=a.shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
    dtype = np.complex64 if complex_ else np.float32
    resets = rng.uniform(size=shape[:2]) < 0.15
    return a.astype(dtype), b.astype(dtype), h0.astype(dtype), resets


def _close(got, want, tol=2e-5):
    got = np.asarray(got)
    assert got.shape == want.shape
    scale = 1.0 + np.max(np.abs(want))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_matches_numpy_loop(method, reverse):
    rng = np.random.default_rng(0)
    cases = []
    for time in (1, 7, 200):
        for complex_ in (False, True):
            for time_varying in (True, False):
                a, b, h0, resets = _case(rng, time, complex_, time_varying)
                for kwargs in ({}, {"h0": h0}, {"h0": h0, "resets": resets}):
                    cases.append((a, b, kwargs))

    # all 36 scans in one compiled program: one compilation instead of 36 op-by-op runs
    @jax.jit
    def scans(cases):
        return [linear_scan(a, b, method=method, reverse=reverse, **kw) for a, b, kw in cases]

    for (a, b, kwargs), got in zip(cases, scans(cases), strict=True):
        _close(got, numpy_scan(a, b, reverse=reverse, **kwargs))
        assert got.dtype == b.dtype


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, 300])
def test_chunked_any_block_length(chunk_size):
    rng = np.random.default_rng(1)
    a, b, h0, _ = _case(rng, 61, complex_=True)
    got = linear_scan(a, b, h0, method="chunked", chunk_size=chunk_size)
    _close(got, numpy_scan(a, b, h0))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_adjoint_loop(method):
    rng = np.random.default_rng(2)
    cases = []
    for time in (1, 9, 64):
        a, b, h0, _ = _case(rng, time)
        cases.append((a, b, h0, rng.normal(size=b.shape).astype(np.float32)))

    def loss(a, b, h0, cot):
        return jnp.sum(cot * linear_scan(a, b, h0, method=method))

    # the three gradients in one compiled program, not op by op
    grads = jax.jit(lambda cases: [jax.grad(loss, argnums=(0, 1, 2))(*c) for c in cases])
    for (a, b, h0, cot), got in zip(cases, grads(cases), strict=True):
        for g, w in zip(got, numpy_scan_grads(a, b, h0, cot), strict=True):
            _close(g, w, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_numerically_complex_reverse_resets(method):
    """Finite differences (check_grads), complex inputs, time-invariant a, reverse, resets."""
    rng = np.random.default_rng(3)
    a, b, h0, resets = _case(rng, 11, complex_=True, time_varying=False)

    @jax.jit  # check_grads evaluates f many times: compiled once, not op by op each time
    def f(a, b, h0):
        return linear_scan(a, b, h0, method=method, reverse=True, resets=resets)

    check_grads(f, (a, b, h0), order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-2)


def test_forward_mode_and_jit():
    """Forward mode needs adjoint=False (JAX's autodiff): the adjoint is a custom VJP."""
    rng = np.random.default_rng(4)
    a, b, h0, _ = _case(rng, 5, time_varying=False)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda a: linear_scan(a, b, method="chunked"), (a,), (a,))
    scan = jax.jit(lambda a, b: linear_scan(a, b, method="chunked", adjoint=False))
    jac = jax.jacfwd(scan, argnums=0)(a, b)  # [T, 3, 4, 4]
    # dh_t/da for a time-invariant a: numerically, by central differences in float64.
    eps = 1e-3
    for k in range(a.shape[0]):
        d = np.zeros(a.shape)
        d[k] = eps
        fd = (numpy_scan(a + d, b) - numpy_scan(a - d, b)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(jac[..., k]), fd, atol=2e-3, rtol=2e-3)


def test_resets_restart_from_zero_by_hand():
    # a = 2, b = 1 with a reset at t = 2: 1, 3, [reset] 1, 3.
    a = jnp.full((4, 1), 2.0)
    b = jnp.ones((4, 1))
    resets = jnp.array([False, False, True, False])
    for method in METHODS:
        got = linear_scan(a, b, h0=jnp.array([5.0]), method=method, resets=resets)
        np.testing.assert_allclose(np.asarray(got)[:, 0], [11.0, 23.0, 1.0, 3.0])


def _broadcasts_to(jaxpr, shape):
    """Whether any equation in a jaxpr (recursively) broadcasts a value to `shape`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "broadcast_in_dim" and tuple(eqn.params["shape"]) == shape:
            return True
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if _broadcasts_to(sub, shape):
                return True
    return False


def test_time_invariant_a_is_not_materialised():
    a = jnp.full((8,), 0.9)
    b = jnp.ones((500, 8))
    for method in ("sequential", "chunked"):
        jaxpr = jax.make_jaxpr(lambda a, b, m=method: linear_scan(a, b, method=m))(a, b).jaxpr
        assert not _broadcasts_to(jaxpr, (500, 8)), method
    # The associative scan needs a at every step: the check above does see that.
    jaxpr = jax.make_jaxpr(lambda a, b: linear_scan(a, b, method="associative"))(a, b).jaxpr
    assert _broadcasts_to(jaxpr, (500, 8))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"a": np.ones((5, 3), np.int32)}, TypeError, "a: expected a floating"),
        ({"b": np.ones((5, 3), np.int32)}, TypeError, "b: expected a floating"),
        ({"a": np.ones((4,), np.float32)}, ValueError, "a and b must broadcast"),
        ({"b": np.float32(1.0)}, ValueError, "b: expected at least rank 1"),
        ({"a": np.ones((2, 5, 3), np.float32)}, ValueError, "a: expected at most b.s 2 axes"),
        ({"h0": np.ones((2,), np.float32)}, ValueError, "h0: "),
        ({"method": "parallel"}, ValueError, "method: expected one of"),
        ({"resets": np.ones((5, 3), np.float32)}, TypeError, "resets: expected a bool"),
        ({"resets": np.ones((4,), bool)}, ValueError, "resets: expected shape"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"reverse": 1}, TypeError, "reverse"),
        ({"adjoint": "yes"}, TypeError, "adjoint"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = {"a": np.full((3,), 0.5, np.float32), "b": np.ones((5, 3), np.float32)}
    args.update(kwargs)
    a, b = args.pop("a"), args.pop("b")
    with pytest.raises(error, match=match):
        linear_scan(a, b, **args)


@pytest.mark.parametrize("method", [*METHODS, "pallas"])
def test_no_steps_give_no_states_and_zero_gradients(method):
    """time 0 (a batch of empty sequences): an empty h of the state shape, in both directions."""
    a, b, h0 = jnp.full((3,), 0.5), jnp.ones((0, 2, 3)), jnp.ones((2, 3))
    h = linear_scan(a, b, h0, method=method)
    assert h.shape == (0, 2, 3) and h.dtype == jnp.float32
    grads = jax.grad(lambda a, h0: jnp.sum(linear_scan(a, b, h0, method=method)), (0, 1))(a, h0)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_nested_lists_are_arrays_and_a_with_more_axes_than_b_is_refused():
    a, b = [0.5, -0.25], [[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]]
    np.testing.assert_allclose(linear_scan(a, b), numpy_scan(a, b), rtol=1e-6)
    # broadcasting a [3, 6, 2, 4] against b [6, 2, 4] would scan a's 3 steps, b's time a batch
    with pytest.raises(
        ValueError, match=r"a: expected at most b's 3 axes, got shape \(3, 6, 2, 4\)"
    ):
        linear_scan(jnp.ones((3, 6, 2, 4)), jnp.ones((6, 2, 4)))
