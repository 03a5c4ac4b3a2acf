"""linear_scan's adjoint (its custom VJP) against a float64 numpy loop of the adjoint and
against JAX's autodiff of the plain sequential scan, for every method (finite differences of
the adjoint: tests/test_scan.py's check_grads test, which runs it by default)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import scan
from lru_jax.scan import linear_scan

METHODS = ["sequential", "associative", "chunked", "pallas", "auto"]

# (complex, a's shape: "tv" [T, B, N], "ti" [N], "ti2" [B, 1]; reverse, resets, h0)
CASES = [
    (False, "tv", False, True, True),
    (True, "ti", True, True, True),
    (True, "tv", True, False, False),
    (False, "ti2", False, False, True),
    (True, "ti", True, False, False),
]
T, B, N = 7, 2, 3


def numpy_adjoint(a, b, h0, ct, reverse, resets):
    """(da, db, dh0) of sum(ct * h) by the adjoint loop, in complex128, in JAX's convention:
    cotangents are transposes (no conjugation).

    Steps run in order s = 0..T-1 (time t = s, or T-1-s if reverse); with a_s zeroed at
    resets, h_s = a_s h_{s-1} + b_s, g_s = ct_s + a_{s+1} g_{s+1}, da_s = g_s h_{s-1},
    db_s = g_s, dh0 = a_0 g_0.
    """
    a_full = np.broadcast_to(np.asarray(a, np.complex128), b.shape).copy()
    if resets is not None:
        a_full[np.asarray(resets)] = 0
    order = list(range(T))[::-1] if reverse else list(range(T))
    h_prev, h = {}, np.zeros(b.shape[1:]) if h0 is None else np.asarray(h0, np.complex128)
    for t in order:
        h_prev[t] = h
        h = a_full[t] * h + b[t]
    g, carry, after = np.zeros(b.shape, np.complex128), np.zeros(b.shape[1:]), None
    for t in order[::-1]:
        carry = ct[t] + (a_full[after] * carry if after is not None else 0)
        g[t], after = carry, t
    da_full = np.stack([g[t] * h_prev[t] for t in range(T)])
    if resets is not None:
        da_full[np.asarray(resets)] = 0
    lead = da_full.ndim - np.ndim(a)
    da = da_full.sum(axis=tuple(range(lead)))
    da = da.sum(axis=tuple(i for i, n in enumerate(np.shape(a)) if n == 1), keepdims=True)
    first = order[0]
    dh0 = None if h0 is None else a_full[first] * g[first]
    return da.reshape(np.shape(a)), g, dh0


def _inputs(rng, complex_, a_kind, with_h0):
    a_shape = {"tv": (T, B, N), "ti": (N,), "ti2": (B, 1)}[a_kind]
    a = rng.uniform(0.5, 0.95, a_shape)
    b, h0, ct = (rng.normal(size=s) for s in ((T, B, N), (B, N), (T, B, N)))
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, a_shape))
        b, h0, ct = (v + 1j * rng.normal(size=v.shape) for v in (b, h0, ct))
    dtype = np.complex64 if complex_ else np.float32
    return a.astype(dtype), b.astype(dtype), (h0.astype(dtype) if with_h0 else None), ct


def _vjp(method, adjoint, reverse, resets):
    """A jitted (args, ct) -> linear_scan's VJP at ct."""

    def vjp(args, ct):
        def scan(*args):
            return linear_scan(
                *args, method=method, reverse=reverse, resets=resets, adjoint=adjoint
            )

        return jax.vjp(scan, *args)[1](ct)

    return jax.jit(vjp)


@functools.cache
def _case(i):
    """Case i of CASES: (args, resets, ct, the numpy adjoint, the plain scan's autodiff)."""
    complex_, a_kind, reverse, with_resets, with_h0 = CASES[i]
    rng = np.random.default_rng(i)
    a, b, h0, ct = _inputs(rng, complex_, a_kind, with_h0)
    resets = jnp.asarray(rng.uniform(size=(T, B)) < 0.3) if with_resets else None
    args = (a, b) if h0 is None else (a, b, h0)
    ct = jnp.asarray(ct, b.dtype)
    want = numpy_adjoint(a, b, h0, np.asarray(ct), reverse, resets)
    plain = _vjp("sequential", False, reverse, resets)(args, ct)
    return args, resets, ct, want, plain


@pytest.mark.parametrize("method", METHODS)
def test_adjoint_matches_numpy_loop_and_sequential_autodiff(method):
    for i, case in enumerate(CASES):
        args, resets, ct, want, plain = _case(i)
        got = _vjp(method, True, case[2], resets)(args, ct)
        for g, w, p in zip(got, want, plain, strict=False):
            assert g.shape == p.shape and g.dtype == p.dtype, case
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=str(case))
            np.testing.assert_allclose(g, p, rtol=2e-5, atol=2e-5, err_msg=str(case))


def test_the_one_loop_sequential_adjoint_matches(monkeypatch):
    """The sequential method's adjoint for a time-invariant a (the loop that sums da as it
    goes), taken here at any state size."""
    monkeypatch.setattr(scan, "FUSED_ADJOINT_MIN_BYTES", 0)
    for i, case in enumerate(CASES):
        args, resets, ct, want, _ = _case(i)
        got = _vjp("sequential", True, case[2], resets)(args, ct)
        for g, w in zip(got, want, strict=False):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=str(case))


def _residual_bytes(f, *args):
    """Bytes that jax.vjp keeps for the backward pass (the leaves of its VJP function)."""
    vjp = jax.jit(lambda *args: jax.vjp(f, *args)[1])(*args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))


def test_backward_keeps_only_a_and_h():
    """The adjoint needs a, h0 and h for the backward pass; autodiff of the associative scan
    keeps the partial products of every level as well."""
    a = jnp.full((4,), 0.9, jnp.complex64)
    b, h0 = jnp.ones((32, 4), jnp.complex64), jnp.ones((4,), jnp.complex64)
    kept = {
        adjoint: _residual_bytes(
            lambda a, b, h0, adj=adjoint: linear_scan(a, b, h0, method="associative", adjoint=adj),
            a,
            b,
            h0,
        )
        for adjoint in (True, False)
    }
    assert kept[True] <= a.nbytes + b.nbytes + h0.nbytes
    assert kept[False] > 2 * b.nbytes


def test_forward_mode_needs_adjoint_false():
    a, b = jnp.full((3,), 0.5), jnp.ones((4, 3))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda b: linear_scan(a, b, method="sequential"), (b,), (b,))
    h, dh = jax.jvp(lambda b: linear_scan(a, b, method="sequential", adjoint=False), (b,), (b,))
    np.testing.assert_allclose(dh, h)  # linear in b
