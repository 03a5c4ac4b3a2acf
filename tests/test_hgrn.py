"""HGRN's HGRU against the paper's equations as a complex128 numpy loop; the depth-dependent
lower bound, steps, padding and resets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import first_params_key

from lru_jax import hgrn, models
from lru_jax import nn as lnn


def numpy_hgrn(p, x, h0=None, reverse=False):
    """Qin et al. 2023, the HGRU one step at a time in complex128: x [time, batch, H] ->
    (y [time, batch, H], h_last [batch, N])."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    n = p["theta"].size

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    def silu(v):
        return v * sigmoid(v)

    gamma = sigmoid(p["bound_logit"]) if "bound_logit" in p else 0.0
    time, batch, _ = x.shape
    h = np.zeros((batch, n), complex) if h0 is None else np.asarray(h0, complex)
    y = np.zeros(x.shape)
    for t in range(time - 1, -1, -1) if reverse else range(time):
        lam = gamma + (1 - gamma) * sigmoid(x[t] @ p["W_f"].T + p["b_f"])
        c = silu(x[t] @ p["W_c"].T + p["b_c"])
        h = lam * np.exp(1j * p["theta"]) * h + (1 - lam) * (c[:, :n] + 1j * c[:, n:])
        feature = np.concatenate([h.real, h.imag], -1)
        mean, var = feature.mean(-1, keepdims=True), feature.var(-1, keepdims=True)
        normed = (feature - mean) / np.sqrt(var + 1e-5) * p["norm_scale"] + p["norm_bias"]
        gate = silu(x[t] @ p["W_g"].T + p["b_g"])
        y[t] = (normed * gate) @ p["W_o"].T + p["b_o"]
    return y, h


def _params(h=3, n=4, lower_bound=0.6, seed=0):
    """Parameters with every bias, norm parameter and bound away from its initial value."""
    p = hgrn.init(jax.random.key(seed), h, n, lower_bound)
    rng = np.random.default_rng(seed)
    fixed = ("b_", "norm_", "bound")
    return {k: (v + rng.normal(size=v.shape).astype(np.float32) * 0.5 if k.startswith(fixed)
                else v) for k, v in p.items()}  # fmt: skip


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_forward_matches_the_papers_equations(method):
    rng = np.random.default_rng(1)
    cases = []
    for p in (_params(), _params(lower_bound=0.0)):
        x = rng.normal(size=(10, 2, 3)).astype(np.float32)
        h0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
        cases += [(p, x, {}), (p, x, {"h0": h0, "reverse": True})]
    reverses = [kwargs.get("reverse", False) for *_, kwargs in cases]  # static, not traced

    @jax.jit  # the four forward passes in one compiled program, not op by op
    def forwards(arrays):
        return [
            hgrn.forward(p, x, h0, method=method, reverse=reverse)
            for (p, x, h0), reverse in zip(arrays, reverses, strict=True)
        ]

    arrays = [(p, x, kwargs.get("h0")) for p, x, kwargs in cases]
    for (p, x, kwargs), (y, h_last) in zip(cases, forwards(arrays), strict=True):
        y_ref, h_ref = numpy_hgrn(p, x, **kwargs)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=5e-5, rtol=5e-5)
        np.testing.assert_allclose(np.asarray(h_last), h_ref, atol=2e-5, rtol=2e-5)


def test_the_forget_gate_stays_above_its_lower_bound():
    """|a_t| = λ_t in [γ, 1) whatever the input, γ = σ(bound_logit) starting at `lower_bound`."""
    p = hgrn.init(jax.random.key(2), 3, 4, lower_bound=0.75)
    np.testing.assert_allclose(np.asarray(hgrn.lower_bound(p)), 0.75, rtol=1e-6)
    x = 100.0 * np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    lam = np.abs(np.asarray(hgrn.terms(p, x)[0]))
    assert lam.min() >= 0.75 - 1e-6 and lam.max() <= 1.0
    assert lam.min() < 0.76  # and it reaches the bound for strongly negative gates


def test_gradients_numerically():
    p = _params(h=2, n=2)
    x = np.random.default_rng(3).normal(size=(5, 2, 2)).astype(np.float32)

    @jax.jit
    def f(p, x):
        return hgrn.forward(p, x, method="associative")[0]

    check_grads(f, (p, x), order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-2)


def test_module_parameters_are_the_functional_init_of_its_key():
    x = jnp.ones((2, 5, 3))
    key = jax.random.key(4)
    got = lnn.HGRN(d_state=4, lower_bound=0.5).init(key, x)["params"]
    want = hgrn.init(first_params_key(key), 3, 4, 0.5)
    assert set(got) == set(want) == set(hgrn.PARAM_NAMES) | {"bound_logit"}
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    assert "bound_logit" not in lnn.HGRN(d_state=4).init(key, x)["params"]


def test_module_steps_padding_and_resets():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 3)).astype(np.float32)
    layer = lnn.HGRN(d_state=4, lower_bound=0.3, scan_method="sequential")
    variables = layer.init(jax.random.key(1), x)
    p = variables["params"]
    # steps equal the full call
    h0 = (rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))).astype(np.complex64)
    y = layer.apply(variables, x, initial_carry=h0)
    h, step = h0, jax.jit(functools.partial(layer.apply, method="step"))  # compiled once
    for t in range(7):
        h, y_t = step(variables, h, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=2e-5)
    carry = layer.initial_carry(3)
    assert carry.shape == (3, 4) and carry.dtype == jnp.complex64
    # padding, reverse within lengths
    lengths = np.array([7, 4, 0])
    for reverse in (False, True):
        h_last, y = layer.apply(variables, x, lengths, return_carry=True, reverse=reverse)
        for b, n in enumerate(lengths):
            assert np.all(np.asarray(y)[b, n:] == 0.0)
            if n:
                y_ref, h_ref = numpy_hgrn(p, x[b : b + 1, :n].swapaxes(0, 1), reverse=reverse)
                np.testing.assert_allclose(np.asarray(y)[b, :n], y_ref[:, 0], atol=5e-5)
                np.testing.assert_allclose(np.asarray(h_last[b]), h_ref[0], atol=2e-5)
    # resets restart sequence 0 at step 2
    resets = np.zeros((3, 7), bool)
    resets[0, 2] = True
    y = np.asarray(layer.apply(variables, x, resets=resets))
    np.testing.assert_allclose(
        y[0, 2:], numpy_hgrn(p, x[:1, 2:].swapaxes(0, 1))[0][:, 0], atol=5e-5
    )


def test_a_model_starts_block_k_of_l_at_the_papers_bound_k_over_l():
    options = {"expansion": 1.0, "lower_bound": True, "max_timescale": 0.0, "scan_method": "auto"}
    options = tuple(sorted(options.items()))
    model = models.SequenceModel(
        num_outputs=3, mixer="hgrn", d_model=4, num_layers=3, mixer_options=options
    )
    params = model.init(jax.random.key(0), jnp.ones((1, 5, 2)))["params"]
    assert "bound_logit" not in params["blocks_0"]["mixer"]  # the paper's first layer: γ = 0
    for k in (1, 2):
        gamma = jax.nn.sigmoid(params[f"blocks_{k}"]["mixer"]["bound_logit"])
        np.testing.assert_allclose(np.asarray(gamma), k / 3, rtol=1e-6)
    unbounded = dict(options, lower_bound=False)
    build = models.OPTION_MIXERS["hgrn"]
    assert build(4, unbounded, models.MixerContext(None, 2, 3)).lower_bound == 0.0


def test_chrono_initialisation_starts_the_forget_gate_with_memories_up_to_t():
    """With max_timescale T and no lower bound, λ at zero input is u/(1 + u), u ~ U(1, T − 1):
    memories 1/(1 − λ) = 1 + u spread over [2, T]; the other parameters are unchanged."""
    key, T = jax.random.key(5), 1000.0
    plain, chrono = hgrn.init(key, 4, 2000), hgrn.init(key, 4, 2000, max_timescale=T)
    lam = np.abs(np.asarray(hgrn.terms(chrono, jnp.zeros((1, 4)))[0][0])).astype(np.float64)
    memory = 1.0 / (1.0 - lam)
    assert 2.0 - 1e-3 <= memory.min() < 20 and T - 20 < memory.max() <= T * 1.001
    assert abs(memory.mean() - T / 2) < 0.05 * T  # u uniform: mean T/2
    for name in set(plain) - {"b_f"}:
        np.testing.assert_array_equal(np.asarray(chrono[name]), np.asarray(plain[name]), name)
    with pytest.raises(ValueError, match="max_timescale: expected 0 .* or a number > 2"):
        hgrn.init(key, 4, 4, max_timescale=2)


def test_bad_input_is_named():
    x = jnp.ones((2, 5, 3))
    layer = lnn.HGRN(d_state=4)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x: the parameters expect 3 features"):
        layer.apply(variables, jnp.ones((2, 5, 4)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"resets: expected rank 2 \[batch, time\]"):
        layer.apply(variables, x, resets=jnp.zeros((5,), bool))
    with pytest.raises(ValueError, match=r"lower_bound: expected a number in \[0, 1\)"):
        lnn.HGRN(d_state=4, lower_bound=1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.HGRN(d_state=4, scan_method="cumsum").init(jax.random.key(0), x)
