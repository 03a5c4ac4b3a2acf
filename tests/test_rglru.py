"""The RG-LRU and Griffin's recurrent block against the `recurrentgemma` package's JAX layers
given the same weights (outputs, final states, gradients, resets, decoding steps); steps,
padding, the model mixer, the normaliser's precision and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import first_params_key

from lru_jax import nn as lnn
from lru_jax import rglru
from lru_jax.tasks.base import TaskSpec
from lru_jax.training import config as config_lib

B, T, H, N, HEADS = 3, 8, 6, 8, 2
# recurrentgemma's segment_pos: 0 marks a document start (our resets). Row 0 starts a document
# at t = 0; row 1 continues one (no reset at t = 0) and starts the next at t = 3; row 2 has
# resets one and two steps apart, so that the convolution's mask cuts every shift.
SEGMENT_POS = np.array([np.arange(T), [5, 6, 7, 0, 1, 2, 3, 4], [0, 1, 0, 0, 1, 2, 0, 1]])
RESETS = SEGMENT_POS == 0  # [batch, time]
# These programs are tiny: on CPU, XLA's backend optimisations cost more time than they save.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=_FAST if jax.default_backend() == "cpu" else None, **kwargs)


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("recurrentgemma.jax")


def _drawn(shapes, seed, decay_name):
    """Arrays of `shapes` (a pytree of ShapeDtypeStructs) that make every term count: N(0, 0.5²)
    weights and biases, and the decay parameter `decay_name` uniform in [−6, 0] (recurrentgemma's
    a_param = −Λ: base decays σ(Λ) from 0.5 to 0.998)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == decay_name:
            sign = -1.0 if decay_name == "Lambda" else 1.0
            return jnp.asarray(sign * rng.uniform(-6.0, 0.0, leaf.shape), jnp.float32)
        return jnp.asarray(0.5 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _reference_params(module, x, seed):
    """recurrentgemma's parameters of `module` in its own layout (its init's shapes, read
    without running it)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, jnp.zeros(x.shape[:2], jnp.int32))
    return _drawn(shapes["params"], seed, "a_param")


def _our_block_params(seed):
    shapes = jax.eval_shape(lambda k: rglru.block_init(k, H, N, HEADS), jax.random.key(0))
    return _drawn(shapes, seed, "Lambda")


def _assert_trees_close(got, want, atol):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-4, err_msg=path)


def _loss_and_grads(apply):
    """jit(value_and_grad) of Σ y·cy + Σ h·ch for apply(params, x) -> (y, h_last, extra)."""

    def loss(params, x, cy, ch):
        y, h, extra = apply(params, x)
        return jnp.sum(y * cy) + jnp.sum(h * ch), (y, h, extra)

    return _jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


# ---------------------------------------------------------------- recurrentgemma


def test_rg_lru_equals_recurrentgemma(rg):
    """Outputs, final state and gradients (parameters and inputs) from a given state, with
    resets (row 0's at t = 0 starts from zero) and without (row 1 continues the state)."""
    rng = np.random.default_rng(0)
    module = rg.RGLRU(width=N, num_heads=HEADS)
    layer = lnn.RGLRU(N, HEADS)
    x = jnp.asarray(rng.normal(size=(B, T, N)), jnp.float32)
    pos = jnp.asarray(SEGMENT_POS)
    theirs = _reference_params(module, x, 1)
    h0 = jnp.asarray(rng.normal(size=(B, N)), jnp.float32)
    cy = rng.normal(size=(B, T, N)).astype(np.float32)
    ch = rng.normal(size=(B, N)).astype(np.float32)

    def their_apply(p, x):
        return (*module.apply({"params": p}, x, pos, h0), None)

    def our_apply(p, x):
        h, y = layer.apply({"params": p}, x, initial_carry=h0, return_carry=True, resets=RESETS)
        return y, h, None

    (_, (y_ref, h_ref, _)), (gp_ref, gx_ref) = _loss_and_grads(their_apply)(theirs, x, cy, ch)
    ours = rglru.from_recurrentgemma(theirs)
    (_, (y, h, _)), (gp, gx) = _loss_and_grads(our_apply)(ours, x, cy, ch)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=2e-6)
    _assert_trees_close(gp, rglru.from_recurrentgemma(gp_ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), atol=2e-5)
    complex_lru = _reference_params(rg.RGLRU(width=N, num_heads=HEADS, only_real=False), x, 0)
    with pytest.raises(ValueError, match=r"params: expected a real RG-LRU \(only_real=True\)"):
        rglru.from_recurrentgemma(complex_lru)


def test_recurrent_block_equals_recurrentgemma(rg):
    """Outputs, the final state (RG-LRU state and convolution window) and gradients with resets
    inside the convolution's reach; then decoding steps from that state, as recurrentgemma's
    one-token calls with its cache."""
    rng = np.random.default_rng(3)
    module = rg.RecurrentBlock(width=H, num_heads=HEADS, lru_width=N)
    layer = lnn.RecurrentBlock(N, HEADS)
    u = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    pos = jnp.asarray(SEGMENT_POS)
    theirs = _reference_params(module, u, 2)
    cy = rng.normal(size=(B, T, H)).astype(np.float32)
    ch = rng.normal(size=(B, N)).astype(np.float32)

    def their_apply(p, u):
        y, cache = module.apply({"params": p}, u, pos)
        return y, cache.rg_lru_state, cache

    def our_apply(p, u):
        state, y = layer.apply({"params": p}, u, return_carry=True, resets=RESETS)
        return y, state.h, state

    (_, (y_ref, h_ref, cache)), (gp_ref, gu_ref) = _loss_and_grads(their_apply)(theirs, u, cy, ch)
    ours = rglru.from_recurrentgemma(theirs)
    (_, (y, h, state)), (gp, gu) = _loss_and_grads(our_apply)(ours, u, cy, ch)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.window), np.asarray(cache.conv1d_state), atol=2e-6)
    _assert_trees_close(gp, rglru.from_recurrentgemma(gp_ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(gu), np.asarray(gu_ref), atol=2e-5)

    their_step = _jit(lambda cache, u_t, pos_t: module.apply({"params": theirs}, u_t, pos_t, cache))
    for t in range(3):
        u_t = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
        y_ref, cache = their_step(cache, u_t[:, None], pos[:, -1:] + t + 1)
        state, y_t = _block_step(ours, state, u_t)
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y_ref[:, 0]), atol=2e-6)
        np.testing.assert_allclose(np.asarray(state.h), np.asarray(cache.rg_lru_state), atol=2e-6)
        np.testing.assert_allclose(
            np.asarray(state.window), np.asarray(cache.conv1d_state), atol=2e-6
        )


# ---------------------------------------------------------------- steps, padding, modules

# One compiled step for every test (the parameters are an argument, not a constant).
_block_step = _jit(rglru.block_step)


def _stepped(params, u, state):
    """The block one step at a time over u [batch, time, H] from `state`: (every output
    [batch, time, H], every state)."""
    ys, states = [], []
    for t in range(u.shape[1]):
        state, y = _block_step(params, state, jnp.asarray(u[:, t]))
        ys.append(np.asarray(y))
        states.append(state)
    return np.stack(ys, 1), states


def test_block_steps_equal_the_full_call_with_padding_and_reverse():
    """The module's full call against its steps from the same state: outputs and final state,
    forwards and backwards; with seq_lengths each sequence's valid steps only (backwards for
    `reverse`), zeros past them, and a sequence of length 0 keeps its initial state."""
    rng = np.random.default_rng(4)
    layer = lnn.RecurrentBlock(N, HEADS)
    u = rng.normal(size=(B, T, H)).astype(np.float32)
    p = _our_block_params(5)
    state0 = rglru.BlockState(*(rng.normal(size=s.shape).astype(np.float32)
                                for s in layer.initial_carry(B)))  # fmt: skip
    call = _jit(
        lambda u, lengths, reverse: layer.apply(
            {"params": p}, u, lengths, initial_carry=state0, return_carry=True, reverse=reverse
        ),
        static_argnums=2,
    )
    lengths = np.array([T, 5, 0])
    for reverse in (False, True):
        # each sequence reversed within its length (the padding stays where it is)
        order = [np.r_[n - 1 : -1 : -1, n:T] if reverse else np.arange(T) for n in lengths]
        ys, states = _stepped(p, np.stack([u[b, o] for b, o in enumerate(order)]), state0)
        state, y = call(u, lengths, reverse)
        y = np.asarray(y)
        for b, n in enumerate(lengths):
            assert np.all(y[b, n:] == 0.0)
            np.testing.assert_allclose(y[b, order[b][:n]], ys[b, :n], atol=2e-6)
            want = state0 if n == 0 else states[n - 1]
            for got, w in zip(state, want, strict=True):
                np.testing.assert_allclose(np.asarray(got[b]), np.asarray(w[b]), atol=2e-6)
        # without lengths: the whole sequence (row 0's order is the whole axis's)
        ys, states = _stepped(p, u[:, ::-1] if reverse else u, state0)
        state, y = call(u, None, reverse)
        np.testing.assert_allclose(np.asarray(y)[:, ::-1] if reverse else y, ys, atol=2e-6)
        for got, want in zip(state, states[-1], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_rg_lru_module_steps_equal_the_full_call():
    rng = np.random.default_rng(6)
    layer = lnn.RGLRU(N, HEADS)
    p = {name: _our_block_params(7)[name] for name in rglru.PARAM_NAMES}
    x = rng.normal(size=(B, T, N)).astype(np.float32)
    h0 = rng.normal(size=(B, N)).astype(np.float32)
    h_last, y = _jit(lambda x: layer.apply({"params": p}, x, initial_carry=h0, return_carry=True))(
        x
    )
    step = _jit(lambda h, x_t: layer.apply({"params": p}, h, x_t, method="step"))
    h = h0
    for t in range(T):
        h, y_t = step(h, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_last), atol=2e-6)
    carry = layer.initial_carry(B)
    assert carry.shape == (B, N) and carry.dtype == jnp.float32 and not np.any(carry)


def test_module_parameters_are_the_functional_init_of_their_key():
    """Each module's parameters are its functional init of the module's first key; the base
    decay σ(Λ) starts on the ring [r_min, r_max]."""
    cases = (
        (lnn.RGLRU(N, HEADS), jnp.ones((1, 2, N)), lambda k: rglru.init(k, N, HEADS)),
        (lnn.RecurrentBlock(N, HEADS, conv_width=3), jnp.ones((1, 2, H)),
         lambda k: rglru.block_init(k, H, N, HEADS, 3)),
    )  # fmt: skip

    def both(key):  # one compiled program for every case
        first = first_params_key(key)
        return [(layer.init(key, x)["params"], init(first)) for layer, x, init in cases]

    for got, want in _jit(both)(jax.random.key(7)):
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    assert got["W_r"].shape == (HEADS, N // HEADS, N // HEADS) and got["conv_w"].shape == (3, N)
    decay = np.asarray(jax.nn.sigmoid(rglru.init_lambda(jax.random.key(0), 4096, 0.5, 0.6)))
    assert 0.5 <= decay.min() < 0.51 and 0.59 < decay.max() <= 0.6


def test_the_normaliser_keeps_its_precision_near_one_and_its_slope_is_capped():
    """sqrt(1 − a²) from log a: right to float32 precision where a is within 1e-7 of 1 (where
    1 − a² in float32 is 0 or a fifth off), and its derivative in log a is −2 a² x 1000 (the
    square root's slope capped, recurrentgemma's bound) where 1 − a² < 1/(4 x 1000²)."""
    log_a = -np.array([1e-3, 1e-5, 1e-7, 1e-8], np.float32)
    zeros, no_weights = np.zeros(4, np.float32), np.zeros((1, 4, 4), np.float32)
    # W_r = 0: r = σ(0) = 1/2, so log a = −4 softplus(−Λ); b_i = 30: i = 1, so b = normaliser
    p = {"Lambda": -np.log(np.expm1(-log_a / 4.0)).astype(np.float32), "W_r": no_weights,
         "b_r": zeros, "W_i": no_weights, "b_i": zeros + 30.0}  # fmt: skip
    x = np.ones(4, np.float32)

    def normaliser(lam):
        return rglru.terms(dict(p, Lambda=lam), x)[1]

    got, slope = _jit(lambda lam: (normaliser(lam), jax.grad(lambda l: normaliser(l).sum())(lam)))(
        p["Lambda"]
    )
    want = np.sqrt(-np.expm1(2.0 * log_a.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    naive = np.sqrt(1.0 - np.exp(2.0 * log_a))
    assert np.all(np.abs(naive[2:] - want[2:]) > 0.05 * want[2:])
    d_normaliser = np.asarray(slope) / (4.0 / (1.0 + np.exp(p["Lambda"])))  # / (d log a / dΛ)
    floor = 1.0 / (4.0 * 1000.0**2)
    capped = -np.expm1(2.0 * log_a) < floor
    assert capped.tolist() == [False, False, True, True]
    exact = -np.exp(2.0 * log_a) / want
    np.testing.assert_allclose(
        d_normaliser, np.where(capped, -2.0 * np.exp(2.0 * log_a) * 1000.0, exact), rtol=1e-4
    )


# ---------------------------------------------------------------- the mixer and errors


def test_the_mixer_from_the_config_and_its_model_steps():
    """model.rglru builds the block its options say; a model's one-step path (what `generate`
    runs) equals its full call; bad options are named by their config key."""
    config = config_lib.default_config()
    config.model.update({"mixer": "rglru", "d_model": 4, "num_layers": 1})
    config.model.rglru.update({"expansion": 1.5, "num_heads": 3, "conv_width": 2})
    config_lib.validate(config)
    spec = TaskSpec(name="t", kind="per_step", seq_len=4, num_outputs=7, vocab_size=7)
    model = config_lib.build_model(config.model, spec)
    tokens = np.array([[1, 2, 5, 6], [3, 4, 0, 2]], np.int32)
    variables, logits = _jit(lambda key: (v := model.init(key, tokens), model.apply(v, tokens)))(
        jax.random.key(0)
    )
    mixer = variables["params"]["blocks_0"]["mixer"]
    assert mixer["W_x"].shape == (6, 4) and mixer["W_r"].shape == (3, 2, 2)
    assert mixer["conv_w"].shape == (2, 6)
    step = _jit(lambda carry, token: model.apply(variables, carry, token, method="step"))
    carry = model.apply(variables, 2, method="initial_carry")
    for t in range(4):
        carry, step_logits = step(carry, tokens[:, t])
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(logits[:, t]), atol=1e-5)

    for key, value, match in (
        ("num_heads", 4, "config.model.rglru.num_heads: expected a divisor of the RG-LRU width 6"),
        ("conv_width", 0, "config.model.rglru.conv_width: expected a positive int"),
        ("r_max", 0.8, r"config.model.rglru.r_min, r_max: expected 0 <= r_min < r_max <= 1"),
        ("scan_method", "cumsum", "config.model.rglru.scan_method: expected one of"),
        ("expansion", 0, "config.model.rglru.expansion: expected a positive number"),
    ):
        bad = config_lib.default_config()
        bad.model.update({"mixer": "rglru", "d_model": 4})
        bad.model.rglru.update({"expansion": 1.5, key: value})
        with pytest.raises(ValueError, match=match):
            config_lib.validate(bad)
    config.model.update({"mixer": "lru", "d_model": 5})  # the heads only matter for rglru
    config_lib.validate(config)


def test_bad_input_is_named():
    x = jnp.ones((2, 5, N))
    layer = lnn.RecurrentBlock(N, HEADS)
    variables = {"params": _our_block_params(0)}
    lru_params = {name: variables["params"][name] for name in rglru.PARAM_NAMES}
    with pytest.raises(ValueError, match=f"x: the parameters expect {H} features"):
        layer.apply(variables, jnp.ones((2, 5, H + 1)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, H), jnp.int32))
    with pytest.raises(ValueError, match=r"resets: expected rank 2 \[batch, time\]"):
        layer.apply(variables, jnp.ones((2, 5, H)), resets=jnp.zeros((5,), bool))
    with pytest.raises(TypeError, match="resets: expected a bool array"):
        rglru.forward(lru_params, x, resets=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"resets: expected a bool \[time, ...\] leading the"):
        rglru.forward(lru_params, x, resets=jnp.zeros((2, 4), bool))
    with pytest.raises(ValueError, match=r"state0: expected a BlockState \(h \(2, 8\)"):
        layer.apply(variables, jnp.ones((2, 5, H)), initial_carry=layer.initial_carry(3))
    with pytest.raises(ValueError, match="num_heads: expected a divisor of the RG-LRU's width 8"):
        lnn.RGLRU(N, num_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x: the parameters expect 8 features \(width\)"):
        lnn.RGLRU(N).init(jax.random.key(0), jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="conv_width: expected a positive int"):
        lnn.RecurrentBlock(N, conv_width=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="r_min, r_max: expected 0 <= r_min < r_max <= 1"):
        lnn.RGLRU(N, r_min=0.99, r_max=0.9).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.RGLRU(N, scan_method="cumsum").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="params: expected recurrentgemma's RGLRU or Recurrent"):
        rglru.from_recurrentgemma({"linear_y": {}})
