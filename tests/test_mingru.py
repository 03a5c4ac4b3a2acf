"""minGRU and minLSTM against the paper's sequential algorithm (a float64 numpy loop) and the
mingru-pytorch package given the same weights; both forms, steps, padding and resets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import first_params_key

from lru_jax import mingru, models
from lru_jax import nn as lnn
from lru_jax.tasks.base import TaskSpec
from lru_jax.training import config as config_lib


def numpy_min_rnn(p, x, h0=None, reverse=False, activation="g"):
    """Feng et al. 2024, the sequential minGRU / minLSTM, one step at a time in float64.

    x: [time, batch, H]; returns (y [time, batch, H], h_last [batch, N])."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}

    def linear(gate, x_t):
        return x_t @ p[f"W_{gate}"].T + p[f"b_{gate}"]

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    time, batch, _ = x.shape
    h = np.zeros((batch, p["W_h"].shape[0])) if h0 is None else np.float64(h0)
    y = np.zeros((time, batch, p["W_h"].shape[1]))
    for t in range(time - 1, -1, -1) if reverse else range(time):
        v = linear("h", x[t])
        candidate = np.where(v >= 0, v + 0.5, sigmoid(v)) if activation == "g" else v
        if "W_z" in p:  # minGRU
            z = sigmoid(linear("z", x[t]))
            h = (1 - z) * h + z * candidate
        else:  # minLSTM, normalised gates
            f, i = sigmoid(linear("f", x[t])), sigmoid(linear("i", x[t]))
            h = f / (f + i) * h + i / (f + i) * candidate
        y[t] = h @ p["W_out"].T if "W_out" in p else h
    return y, h


def _params(cell, h=3, n=5, seed=0):
    """Parameters with non-zero biases, so that the reference sees every term."""
    p = mingru.init(jax.random.key(seed), h, n, cell=cell)
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape).astype(np.float32) if k[0] == "b" else v)
            for k, v in p.items()}  # fmt: skip


FORMS = [  # (log_space, method)
    (False, "sequential"),
    (False, "associative"),
    (True, "associative"),
    (True, "cumsum"),
]


@pytest.mark.parametrize("cell", mingru.CELLS)
def test_forward_matches_the_papers_sequential_algorithm(cell):
    rng = np.random.default_rng(1)
    p = _params(cell)
    x = rng.normal(size=(11, 2, 3)).astype(np.float32)
    h0 = rng.uniform(0.1, 2.0, size=(2, 5)).astype(np.float32)  # > 0 for the log form
    for log_space, method in FORMS:
        for kwargs in ({}, {"h0": h0, "reverse": True}):
            y, h_last = mingru.forward(p, x, method=method, log_space=log_space, **kwargs)
            y_ref, h_ref = numpy_min_rnn(p, x, **kwargs)
            np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(np.asarray(h_last), h_ref, atol=2e-5, rtol=2e-5)
    # The paper's plain minGRU: h̃ = W_h x + b_h, signed (the plain form only).
    y, _ = mingru.forward(p, x, h0 - 1.0, activation="linear", method="sequential")
    np.testing.assert_allclose(
        np.asarray(y), numpy_min_rnn(p, x, h0 - 1.0, activation="linear")[0], atol=2e-5
    )


@pytest.mark.parametrize("cell", mingru.CELLS)
def test_plain_and_log_space_forms_have_the_same_gradients(cell):
    rng = np.random.default_rng(2)
    p = _params(cell, n=3)  # N = H: no output projection
    x = rng.normal(size=(9, 2, 3)).astype(np.float32)
    cotangent = rng.normal(size=(9, 2, 3)).astype(np.float32)

    def grads(log_space):
        def loss(p, x):
            return jnp.sum(cotangent * mingru.forward(p, x, log_space=log_space)[0])

        return jax.jit(jax.grad(loss, (0, 1)))(p, x)

    for got, want in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- the mingru-pytorch package


def _torch_weights(module, cell):
    """Our parameters from the package's module: its fused Linear rows are [h̃, gates...]."""
    fused = module.to_hidden_and_gate if cell == "mingru" else module.to_hidden_and_f_i_gate
    w = fused.weight.detach().numpy()
    n = w.shape[0] // (1 + len(mingru.GATES[cell]))
    p = {}
    for k, gate in enumerate(("h", *mingru.GATES[cell])):
        p[f"W_{gate}"] = w[k * n : (k + 1) * n]
        p[f"b_{gate}"] = np.zeros(n, np.float32)  # the package's Linear has no bias
    if hasattr(module.to_out, "weight"):
        p["W_out"] = module.to_out.weight.detach().numpy()
    return p


@pytest.mark.parametrize("cell,expansion", [("mingru", 1.0), ("minlstm", 1.5)])
def test_equal_to_mingru_pytorch_given_the_same_weights(cell, expansion):
    """The package's parallel (log-space) forward and its one-step form, outputs and
    gradients. Its minLSTM treats a given previous state as log g(h) in the parallel form (not
    log h, as its own step and its minGRU do), so minLSTM is compared from h0 = 0 there."""
    torch = pytest.importorskip("torch")
    package = pytest.importorskip("minGRU_pytorch")
    from minGRU_pytorch.minLSTM import minLSTM

    torch.manual_seed(0)
    module = (package.minGRU if cell == "mingru" else minLSTM)(4, expansion)
    p = _torch_weights(module, cell)
    x = torch.randn(3, 8, 4, requires_grad=True)  # batch-major, as the package
    n = p["W_h"].shape[0]
    h0 = torch.rand(3, 1, n) + 0.1
    cotangent = torch.randn(3, 8, 4)
    prev = h0 if cell == "mingru" else None
    (cotangent * module(x, prev)).sum().backward()

    def loss(p, x_tm, log_space):
        y, _ = mingru.forward(p, x_tm, None if prev is None else h0[:, 0].numpy(),
                              log_space=log_space)  # fmt: skip
        return jnp.sum(jnp.swapaxes(y, 0, 1) * cotangent.numpy()), y

    x_tm = x.detach().numpy().swapaxes(0, 1)
    y_ref = module(x, prev).detach().numpy()
    weight_grad = module.to_hidden_and_gate if cell == "mingru" else module.to_hidden_and_f_i_gate
    for log_space in (True, False):
        (g_p, g_x), y = jax.grad(loss, (0, 1), has_aux=True)(p, x_tm, log_space)
        np.testing.assert_allclose(np.asarray(y).swapaxes(0, 1), y_ref, atol=1e-5)
        fused = np.concatenate([g_p[f"W_{g}"] for g in ("h", *mingru.GATES[cell])])
        np.testing.assert_allclose(fused, weight_grad.weight.grad.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(g_x).swapaxes(0, 1), x.grad.numpy(), atol=1e-5)
        if "W_out" in p:
            np.testing.assert_allclose(g_p["W_out"], module.to_out.weight.grad, atol=1e-4)
    # One step with a previous state: the package's sequential branch.
    step_ref = module(x[:, :1], h0).detach().numpy()[:, 0]
    _, y_step = mingru.step(p, h0[:, 0].numpy(), x_tm[0])
    np.testing.assert_allclose(np.asarray(y_step), step_ref, atol=1e-5)


# ---------------------------------------------------------------- the Flax modules


def test_module_parameters_are_the_functional_init_of_its_key():
    x = jnp.ones((2, 5, 4))
    for layer, cell, names in (
        (lnn.MinGRU(d_state=4), "mingru", {"W_h", "b_h", "W_z", "b_z"}),
        (lnn.MinLSTM(d_state=6), "minlstm", {"W_h", "b_h", "W_f", "b_f", "W_i", "b_i", "W_out"}),
    ):
        key = jax.random.key(3)
        got = layer.init(key, x)["params"]
        want = mingru.init(first_params_key(key), 4, layer.d_state, cell=cell)
        assert set(got) == set(want) == names
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_chrono_initialisation_starts_the_gates_with_memories_up_to_t(cell):
    """With max_timescale T the decay at zero input is a = u/(1 + u), u ~ U(1, T − 1) (Tallec
    and Ollivier 2018): memories 1/(1 − a) = 1 + u spread over [2, T], in both forms; without
    it a = 1/2, the paper's zero biases; the weights are the same either way."""
    key, T = jax.random.key(6), 1000.0
    plain = mingru.init(key, 4, 2000, cell=cell)
    chrono = mingru.init(key, 4, 2000, cell=cell, max_timescale=T)
    zero = jnp.zeros((1, 4))
    np.testing.assert_allclose(np.asarray(mingru.terms(plain, zero)[0]), 0.5)
    a = np.asarray(mingru.terms(chrono, zero)[0][0], np.float64)
    np.testing.assert_allclose(np.exp(np.asarray(mingru.log_gates(chrono, zero)[0][0])), a, 1e-5)
    memory = 1.0 / (1.0 - a)
    assert 2.0 - 1e-3 <= memory.min() < 20 and T - 20 < memory.max() <= T * 1.001
    assert abs(memory.mean() - T / 2) < 0.05 * T  # u uniform: mean T/2
    for name in (n for n in plain if n.startswith("W")):
        np.testing.assert_array_equal(np.asarray(chrono[name]), np.asarray(plain[name]), name)
    layer = lnn.MinRNN(2000, cell=cell, max_timescale=T)
    got = layer.init(key, zero[None])["params"]
    want = mingru.init(first_params_key(key), 4, 2000, cell=cell, max_timescale=T)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


@pytest.mark.parametrize("layer", [lnn.MinGRU(5, log_space=True), lnn.MinLSTM(5)])
def test_module_steps_equal_the_full_call(layer):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    variables = layer.init(jax.random.key(1), x)
    h0 = rng.uniform(0.1, 1.0, size=(2, 5)).astype(np.float32)
    h_last, y = layer.apply(variables, x, initial_carry=h0, return_carry=True)
    h, step = h0, jax.jit(functools.partial(layer.apply, method="step"))  # compiled once
    for t in range(6):
        h, y_t = step(variables, h, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_last), atol=1e-5)
    carry = layer.initial_carry(2)
    assert carry.shape == (2, 5) and carry.dtype == jnp.float32


@pytest.mark.parametrize("log_space", [False, True])
def test_module_padding_reverse_and_resets(log_space):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 8, 3)).astype(np.float32)
    lengths = np.array([8, 5, 0])
    layer = lnn.MinLSTM(4, log_space=log_space, scan_method="sequential")
    variables = layer.init(jax.random.key(0), x)
    p = variables["params"]
    for reverse in (False, True):
        h_last, y = layer.apply(variables, x, lengths, return_carry=True, reverse=reverse)
        y = np.asarray(y)
        for b, n in enumerate(lengths):
            assert np.all(y[b, n:] == 0.0)
            if n == 0:
                np.testing.assert_array_equal(np.asarray(h_last[b]), 0.0)
                continue
            y_ref, h_ref = numpy_min_rnn(p, x[b : b + 1, :n].swapaxes(0, 1), reverse=reverse)
            np.testing.assert_allclose(y[b, :n], y_ref[:, 0], atol=2e-5)
            np.testing.assert_allclose(np.asarray(h_last[b]), h_ref[0], atol=2e-5)
    resets = np.zeros((3, 8), bool)
    resets[0, 3] = True
    y = np.asarray(layer.apply(variables, x, resets=resets))
    fresh, _ = numpy_min_rnn(p, x[:1, 3:].swapaxes(0, 1))  # sequence 0 starts over at step 3
    np.testing.assert_allclose(y[0, 3:], fresh[:, 0], atol=2e-5)
    np.testing.assert_allclose(y[1], numpy_min_rnn(p, x[1:2].swapaxes(0, 1))[0][:, 0], atol=2e-5)


def test_bad_input_is_named():
    x = jnp.ones((2, 5, 3))
    layer = lnn.MinGRU(3)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x: the parameters expect 3 features"):
        layer.apply(variables, jnp.ones((2, 5, 4)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match="seq_lengths: expected values in"):
        layer.apply(variables, x, jnp.array([5, 6]))
    with pytest.raises(ValueError, match="activation: expected 'g' with log_space=True"):
        lnn.MinGRU(3, log_space=True, activation="linear").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.MinGRU(3, log_space=True, scan_method="chunked").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="d_state: expected d_model=3 without proj_out"):
        lnn.MinGRU(4, proj_out=False).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="max_timescale: expected 0 .* or a number > 2"):
        lnn.MinGRU(3, max_timescale=1.5).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="max_timescale: expected 0"):
        mingru.init(jax.random.key(0), 3, max_timescale="long")
    p = variables["params"]
    with pytest.raises(ValueError, match="h0: expected a state >= 0 for the log-space form"):
        mingru.forward(p, jnp.ones((5, 2, 3)), -jnp.ones((2, 3)), log_space=True)


def test_mixers_from_the_config():
    """model.mingru / model.minlstm build the modules their options say; bad options are named
    by their config key."""
    config = config_lib.default_config()
    config.model.update({"mixer": "minlstm", "d_model": 4, "num_layers": 1})
    config.model.minlstm.update({"expansion": 1.5, "log_space": True, "scan_method": "cumsum"})
    spec = TaskSpec(name="t", kind="per_step", seq_len=5, num_outputs=7, vocab_size=7)
    model = config_lib.build_model(config.model, spec)
    x = np.zeros((2, 5), np.int32)
    variables = model.init(jax.random.key(0), x)
    mixer = variables["params"]["blocks_0"]["mixer"]
    assert mixer["W_f"].shape == (6, 4) and "W_out" in mixer
    config_lib.validate(config)
    config.model.minlstm.scan_method = "chunked"
    with pytest.raises(ValueError, match="config.model.minlstm.scan_method: expected one of"):
        config_lib.validate(config)
    config.model.minlstm.update({"scan_method": "auto", "activation": "linear"})
    with pytest.raises(ValueError, match="config.model.minlstm.activation: expected 'g'"):
        config_lib.validate(config)
    config.model.mingru.expansion = 0
    with pytest.raises(ValueError, match="config.model.mingru.expansion: expected a positive"):
        config_lib.validate(config)
    config.model.mingru.expansion = 1.0
    config.model.hgrn.max_timescale = 1.0
    with pytest.raises(ValueError, match="config.model.hgrn.max_timescale: expected 0 "):
        config_lib.validate(config)


def test_a_models_steps_equal_its_full_call():
    """SequenceModel's one-step path (what `generate` runs) through minGRU blocks."""
    model = models.SequenceModel(
        num_outputs=7, vocab_size=7, mixer="mingru", d_model=4, num_layers=2,
        mixer_options=tuple(sorted(config_lib.MIN_RNN_OPTIONS.items())),
    )  # fmt: skip
    tokens = np.array([[1, 2, 5, 6], [3, 4, 0, 2]], np.int32)
    variables = model.init(jax.random.key(0), tokens)
    logits = model.apply(variables, tokens)
    carry = model.apply(variables, 2, method="initial_carry")
    step = jax.jit(functools.partial(model.apply, method="step"))  # compiled once, not op by op
    for t in range(4):
        carry, step_logits = step(variables, carry, tokens[:, t])
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(logits[:, t]), atol=1e-5)
