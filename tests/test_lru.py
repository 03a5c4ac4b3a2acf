"""The LRU against the paper's equations written as a numpy loop, and its initialisation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import first_params_key, numpy_lru

from lru_jax import lru
from lru_jax import nn as lnn

METHODS = ["sequential", "associative", "chunked"]


def _params(key=0, h=3, n=5, **ring):
    return lru.init(jax.random.key(key), h, n, **ring)


@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_paper_equations(method):
    rng = np.random.default_rng(0)
    p = _params(r_min=0.5, r_max=0.99)
    cases = []
    for time in (1, 8, 33):
        u = rng.normal(size=(time, 2, 3)).astype(np.float32)
        h0 = (rng.normal(size=(2, 5)) + 1j * rng.normal(size=(2, 5))).astype(np.complex64)
        cases += [(u, h0, reverse) for reverse in (False, True)]

    @jax.jit  # the six forward passes in one compiled program, not op by op
    def forwards(p, inputs):
        return [
            lru.forward(p, u, h0, reverse=reverse, method=method)
            for (u, h0), (*_, reverse) in zip(inputs, cases, strict=True)
        ]

    outputs = forwards(p, [(u, h0) for u, h0, _ in cases])
    for (u, h0, reverse), (y, h_last) in zip(cases, outputs, strict=True):
        y_ref, h_ref = numpy_lru(p, u, h0, reverse=reverse)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(h_last), h_ref, atol=2e-5, rtol=2e-5)


def test_resets_restart_the_state():
    rng = np.random.default_rng(1)
    p = _params()
    u = rng.normal(size=(9, 2, 3)).astype(np.float32)
    resets = np.zeros((9, 2), bool)
    resets[4, 0] = True
    y, _ = lru.forward(p, u, resets=resets)
    # Sequence 0 from step 4 on is a fresh run on u[4:]; sequence 1 is unaffected.
    fresh, _ = numpy_lru(p, u[4:, :1])
    np.testing.assert_allclose(np.asarray(y)[4:, 0], fresh[:, 0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(y)[:, 1], numpy_lru(p, u)[0][:, 1], atol=2e-5)


def test_ring_initialisation_and_normalisation():
    r_min, r_max, max_phase = 0.4, 0.9, math.pi / 4
    p = lru.init(jax.random.key(0), 16, 20000, r_min, r_max, max_phase)
    lam = np.asarray(lru.eigenvalues(p))
    radius = np.abs(lam)
    assert radius.min() >= r_min - 1e-6 and radius.max() <= r_max + 1e-6
    # Uniform by area on the ring: |λ|² uniform on [r_min², r_max²].
    r2 = np.sort(radius**2)
    uniform = np.linspace(r_min**2, r_max**2, r2.size)
    assert np.max(np.abs(r2 - uniform)) < 0.02
    phase = np.asarray(jnp.exp(p["theta_log"]))
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-6
    assert abs(phase.mean() - max_phase / 2) < 0.02 * max_phase
    np.testing.assert_allclose(np.exp(np.asarray(p["gamma_log"])), np.sqrt(1 - radius**2), 1e-5)
    assert abs(np.var(np.asarray(p["B_re"])) * 2 * 16 - 1) < 0.05
    assert abs(np.var(np.asarray(p["C_im"])) * 20000 - 1) < 0.05


def test_default_ring_covers_the_unit_disc():
    p = lru.init(jax.random.key(1), 4, 4096)
    radius = np.abs(np.asarray(lru.eigenvalues(p)))
    assert np.all(np.isfinite(np.asarray(p["nu_log"]))) and radius.max() < 1.0
    assert abs(np.mean(radius**2) - 0.5) < 0.03


def test_normalisation_keeps_state_energy_at_input_energy():
    """With γ = sqrt(1-|λ|²) and white-noise input, E|h_t|² -> E|B u_t|² in every channel."""
    p = lru.init(jax.random.key(2), 8, 6, r_min=0.9, r_max=0.99)
    u = np.random.default_rng(3).normal(size=(2000, 64, 8))
    lam = np.asarray(lru.eigenvalues(p), complex)
    b = np.asarray(p["B_re"], np.float64) + 1j * np.asarray(p["B_im"], np.float64)
    bu = u @ b.T  # unnormalised input term [T, batch, N]
    gamma = np.exp(np.asarray(p["gamma_log"], np.float64))
    h = np.zeros(bu.shape[1:], complex)
    energy = np.zeros(bu.shape[-1])
    for t in range(bu.shape[0]):
        h = lam * h + gamma * bu[t]
        if t >= 1000:  # past the transient: |λ|^1000 < 1e-4
            energy += np.mean(np.abs(h) ** 2, axis=0) / 1000
    ratio = energy / np.mean(np.abs(bu) ** 2, axis=(0, 1))
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)


def test_step_equals_parallel_forward():
    rng = np.random.default_rng(4)
    p = _params()
    u = rng.normal(size=(12, 2, 3)).astype(np.float32)
    y_par, h_par = lru.forward(p, u)
    h = lru.zero_state((2,), 5)
    for t in range(12):
        h, y_t = lru.step(p, h, u[t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y_par[t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_par), atol=1e-5)


def test_flax_module_parameters_named_and_shaped():
    x = jnp.ones((2, 7, 6))
    variables = lnn.LRU(d_state=4).init(jax.random.key(0), x)
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes == {
        "nu_log": (4,),
        "theta_log": (4,),
        "gamma_log": (4,),
        "B_re": (4, 6),
        "B_im": (4, 6),
        "C_re": (6, 4),
        "C_im": (6, 4),
        "D": (6,),
    }
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_flax_module_parameters_are_the_functional_init_of_its_key():
    x = jnp.ones((2, 7, 6))
    ring = {"r_min": 0.4, "r_max": 0.9, "max_phase": 1.0}
    for seed in (0, 1):
        key = jax.random.key(seed)
        got = lnn.LRU(d_state=4, **ring).init(key, x)["params"]
        want = lru.init(first_params_key(key), 6, 4, **ring)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    other = lru.init(first_params_key(jax.random.key(0)), 6, 4, **ring)
    assert not np.array_equal(np.asarray(got["B_re"]), np.asarray(other["B_re"]))


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_flax_module_padding_and_carry(method):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 10, 4)).astype(np.float32)
    lengths = np.array([10, 6, 0])
    layer = lnn.LRU(d_state=5, r_min=0.5, scan_method=method)
    variables = layer.init(jax.random.key(0), x)
    p = variables["params"]
    for reverse in (False, True):
        h_last, y = layer.apply(variables, x, lengths, return_carry=True, reverse=reverse)
        y = np.asarray(y)
        for b, n in enumerate(lengths):
            assert np.all(y[b, n:] == 0.0)
            if n == 0:
                np.testing.assert_array_equal(np.asarray(h_last[b]), 0)
                continue
            y_ref, h_ref = numpy_lru(p, x[b : b + 1, :n].transpose(1, 0, 2), reverse=reverse)
            np.testing.assert_allclose(y[b, :n], y_ref[:, 0], atol=2e-5)
            np.testing.assert_allclose(np.asarray(h_last[b]), h_ref[0], atol=2e-5)
        # Garbage in the padding changes nothing.
        noisy = x.copy()
        for b, n in enumerate(lengths):
            noisy[b, n:] = 1e3
        h2, y2 = layer.apply(variables, noisy, lengths, return_carry=True, reverse=reverse)
        np.testing.assert_array_equal(np.asarray(y2), y)
        np.testing.assert_array_equal(np.asarray(h2), np.asarray(h_last))


def test_flax_step_and_initial_carry():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    layer = lnn.LRU(d_state=4)
    variables = layer.init(jax.random.key(1), x)
    h0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
    y = layer.apply(variables, x, initial_carry=h0)
    h, step = h0, jax.jit(functools.partial(layer.apply, method="step"))  # compiled once
    for t in range(6):
        h, y_t = step(variables, h, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=1e-5)
    assert layer.initial_carry(2).shape == (2, 4)
    assert layer.initial_carry(2).dtype == jnp.complex64


def test_gradients_numerically():
    rng = np.random.default_rng(7)
    p = _params(r_min=0.5, r_max=0.95, h=2, n=3)
    u = rng.normal(size=(6, 2, 2)).astype(np.float32)

    @jax.jit  # check_grads evaluates f many times: compiled once, not op by op each time
    def f(p):
        return lru.forward(p, u, method="associative")[0]

    check_grads(f, (p,), order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-2)


def test_bad_input_is_named():
    x = jnp.ones((2, 5, 3))
    layer = lnn.LRU(d_state=4)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x: the parameters expect 3 features"):
        layer.apply(variables, jnp.ones((2, 5, 4)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"x: expected rank 3 \[batch, time, features\]"):
        layer.apply(variables, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="seq_lengths: expected values in"):
        layer.apply(variables, x, jnp.array([5, 6]))
    with pytest.raises(ValueError, match="r_min, r_max"):
        lnn.LRU(d_state=4, r_min=0.9, r_max=0.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.LRU(d_state=4, scan_method="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="d_state"):
        lnn.LRU(d_state=0).init(jax.random.key(0), x)


def test_no_steps_return_the_initial_state_and_lists_are_arrays():
    """time 0 runs (an empty output, the given state back, in both directions); a nested list
    is the array it spells."""
    p = _params()
    h0 = jnp.full((2, 5), 0.5 + 0.25j, jnp.complex64)
    y, h_last = lru.forward(p, jnp.ones((0, 2, 3)), h0)
    assert y.shape == (0, 2, 3)
    np.testing.assert_array_equal(h_last, h0)
    grad = jax.grad(lambda h0: jnp.sum(jnp.abs(lru.forward(p, jnp.ones((0, 2, 3)), h0)[1]) ** 2))
    np.testing.assert_allclose(grad(h0), 2 * np.conj(h0), rtol=1e-6)  # d|h|^2/dh* = 2h, as JAX
    u = [[[0.5, -1.0, 2.0]], [[1.0, 0.0, -0.5]]]  # [time 2, batch 1, H 3]
    y, h_last = lru.forward(p, u)
    want_y, want_h = numpy_lru(p, np.asarray(u))
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(h_last, want_h, atol=1e-5)


def test_under_jit_lengths_outside_the_time_axis_are_clamped():
    """Concrete lengths outside [0, time] are refused; traced ones cannot be, and act as the
    nearest valid length (documented in _checks.seq_lengths and the README)."""
    p, u = _params(), jax.random.normal(jax.random.key(1), (5, 2, 3))
    run = jax.jit(lambda lengths: lru.forward(p, u, seq_lengths=lengths, reverse=True))
    outside, inside = run(jnp.array([-2, 9])), run(jnp.array([0, 5]))
    for got, want in zip(outside, inside, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"seq_lengths: expected values in \[0, 5\]"):
        lru.forward(p, u, seq_lengths=jnp.array([-2, 9]))
