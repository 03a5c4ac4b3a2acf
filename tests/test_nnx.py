"""The NNX layers against their Linen twins (lru_jax.nn): the same parameters give the same
outputs, carries and gradients; variables move both ways; steps equal the full call; bad
input is named; a few nnx.Optimizer steps train a model.

Each comparison runs every layer in one compiled program: the suite's time goes to compiling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx as fnnx
from flax import traverse_util

from lru_jax import cells, lru, nn, nnx

B, T, H = 2, 5, 4
LENGTHS = np.array([T, 3], np.int32)


def _x(seed=1, shape=(B, T, H)):
    return jax.random.normal(jax.random.key(seed), shape)


def _rngs(seed=0):
    return fnnx.Rngs(seed)


# name: (NNX module maker, its Linen twin, extra call keywords)
CASES = {
    "SimpleRNN": (lambda: nnx.SimpleRNN(H, 3, rngs=_rngs()), nn.SimpleRNN(3), {}),
    "LSTM": (lambda: nnx.LSTM(H, 3, rngs=_rngs()), nn.LSTM(3), {"reverse": True}),
    "GRU": (lambda: nnx.GRU(H, 3, rngs=_rngs()), nn.GRU(3), {}),
    "LRU": (lambda: nnx.LRU(H, 6, rngs=_rngs()), nn.LRU(6), {"resets": True}),
    "MinGRU": (lambda: nnx.MinGRU(H, 6, rngs=_rngs()), nn.MinGRU(6), {}),
    "MinLSTM": (
        lambda: nnx.MinLSTM(H, 6, log_space=True, rngs=_rngs()),
        nn.MinLSTM(6, log_space=True),
        {"reverse": True},
    ),
    "HGRN": (lambda: nnx.HGRN(H, 4, lower_bound=0.5, rngs=_rngs()), nn.HGRN(4, 0.5), {}),
    "S5": (lambda: nnx.S5(H, 4, rngs=_rngs()), nn.S5(4), {"resets": True}),
    "RGLRU": (lambda: nnx.RGLRU(H, num_heads=2, rngs=_rngs()), nn.RGLRU(H, num_heads=2), {}),
    "RecurrentBlock": (
        lambda: nnx.RecurrentBlock(H, 4, conv_width=2, rngs=_rngs()),
        nn.RecurrentBlock(4, conv_width=2),
        {},
    ),
    "Mamba": (lambda: nnx.Mamba(H, 8, d_state=3, rngs=_rngs()), nn.Mamba(8, d_state=3), {}),
    "CausalSelfAttention": (
        lambda: nnx.CausalSelfAttention(H, num_heads=2, max_len=8, rngs=_rngs()),
        nn.CausalSelfAttention(H, num_heads=2, max_len=8),
        {},
    ),
    "SequenceBlock": (  # batch norm after the residual, the plain feed-forward
        lambda: nnx.SequenceBlock(
            H, nnx.LRU(H, 6, rngs=_rngs()), norm="batch", prenorm=False, ffn="gelu", rngs=_rngs()
        ),
        nn.SequenceBlock(H, nn.LRU(6), norm="batch", prenorm=False, ffn="gelu"),
        {},
    ),
    "Stack": (  # of GLU blocks over attention and an LSTM, dropout between (off here)
        lambda: nnx.Stack(
            [
                nnx.SequenceBlock(H, nnx.LSTM(H, H, rngs=_rngs()), rngs=_rngs()),
                nnx.SequenceBlock(
                    H,
                    nnx.CausalSelfAttention(H, num_heads=1, max_len=8, rngs=_rngs()),
                    rngs=_rngs(),
                ),
            ],
            dropout_rate=0.3,
            rngs=_rngs(),
        ),
        nn.Stack(
            [
                nn.SequenceBlock(H, nn.LSTM(H)),
                nn.SequenceBlock(H, nn.CausalSelfAttention(H, num_heads=1, max_len=8)),
            ],
            dropout_rate=0.3,
        ),
        {},
    ),
    "Bidirectional": (
        lambda: nnx.Bidirectional(nnx.GRU(H, 3, rngs=_rngs()), nnx.LRU(H, 6, rngs=_rngs())),
        nn.Bidirectional(nn.GRU(3), nn.LRU(6), merge="concat"),
        {},
    ),
}

RESETS = np.zeros((B, T), bool)
RESETS[0, 2] = True


def _call_kwargs(extra):
    kw = dict(extra)
    if kw.pop("resets", False):
        kw["resets"] = RESETS
    return kw


def _loss(y, carry):
    """A scalar that every output and every floating carry entry reaches, unevenly."""
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    total = jnp.sum(y * weights)
    for leaf in jax.tree.leaves(carry):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            total = total + 0.1 * jnp.sum(jnp.abs(leaf) ** 2)
    return total


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def _assert_trees_close(got, want, what):
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=what)


@fnnx.jit
def _make_all():  # one program initialises them all
    return {name: make() for name, (make, _, _) in CASES.items()}


def _linen_shapes(linen, x, extra=()):
    """{path: shape} of the variables `linen.init` makes (traced, not run)."""
    init = functools.partial(linen.init, **_call_kwargs(extra))
    return jax.tree.map(jnp.shape, _flat(jax.eval_shape(init, jax.random.key(0), x)))


@fnnx.jit
def _both_forms(modules, variables, x):
    """Every case's (loss, carry, y, gradients) in its NNX and its Linen form."""
    out = {}
    for name, (_, linen, extra) in CASES.items():
        kw = _call_kwargs(extra)

        def nnx_loss(module, kw=kw):
            carry, y = module(x, LENGTHS, return_carry=True, **kw)
            return _loss(y, carry), (carry, y)

        def linen_loss(params, name=name, linen=linen, kw=kw):
            vs = {**variables[name], "params": params}
            carry, y = linen.apply(vs, x, LENGTHS, return_carry=True, **kw)
            return _loss(y, carry), (carry, y)

        (_, nnx_aux), nnx_grads = fnnx.value_and_grad(nnx_loss, has_aux=True)(modules[name])
        (_, linen_aux), linen_grads = jax.value_and_grad(linen_loss, has_aux=True)(
            variables[name]["params"]
        )
        grads = {nnx._linen_path(p): g[...] for p, g in fnnx.to_flat_state(nnx_grads)}
        out[name] = (nnx_aux, linen_aux, grads, _flat(linen_grads))
    return out


def test_every_layer_equals_its_linen_twin_in_outputs_carries_and_gradients():
    """NNX -> Linen: the Linen twin applied to `linen_variables` of a fresh NNX module."""
    modules = _make_all()
    variables = {name: nnx.linen_variables(m) for name, m in modules.items()}
    x = _x()
    for name, (_, linen, extra) in CASES.items():  # the names and shapes the Linen twin makes
        made = _linen_shapes(linen, x, extra)
        assert jax.tree.map(jnp.shape, _flat(variables[name])) == made, name
    results = _both_forms(modules, variables, x)
    for name, ((nnx_carry, nnx_y), (linen_carry, linen_y), grads, linen_grads) in results.items():
        _assert_trees_close(nnx_y, linen_y, f"{name}: y")
        _assert_trees_close(nnx_carry, linen_carry, f"{name}: carry")
        assert sorted(grads) == sorted(linen_grads), name
        for path, g in grads.items():
            assert float(jnp.max(jnp.abs(g))) > 0.0, (name, path)
            _assert_trees_close(g, linen_grads[path], f"{name}: grad {path}")
        assert float(jnp.max(jnp.abs(nnx_y[1, LENGTHS[1] :]))) == 0.0, name  # padding


def test_linen_variables_load_into_an_nnx_module_and_come_back_unchanged():
    """Linen -> NNX: `load_linen` sets every parameter and statistic; and back."""
    x, draw = _x(), np.random.default_rng(0)
    for name in ("LSTM", "SequenceBlock", "Stack"):
        make, linen, _ = CASES[name]
        made = {}
        for path, shape in _linen_shapes(linen, x).items():
            made[path] = draw.standard_normal(shape).astype(np.float32)
        made = traverse_util.unflatten_dict(made)
        module = nnx.load_linen(make(), made)
        back = nnx.linen_variables(module)
        assert sorted(back) == sorted(made), name  # params, and batch_stats where there are
        for collection in made:
            _assert_trees_close(_flat(back[collection]), _flat(made[collection]), name)


def test_parameters_are_the_functional_init_of_the_modules_first_key():
    got = nnx.LRU(H, 6, r_min=0.5, rngs=_rngs(3)).params()
    want = lru.init(_rngs(3).params(), H, 6, 0.5)
    _assert_trees_close(got, want, "LRU")
    got = nnx.GRU(H, 3, rngs=_rngs(3)).params()
    _assert_trees_close(got, cells.get("gru").init(_rngs(3).params(), H, 3), "GRU")


def test_steps_equal_the_full_call():
    """A stack of a block over an LSTM and a block over attention, one step at a time."""
    model = CASES["Stack"][0]()
    x = _x(2)

    @fnnx.jit
    def both(model, x):
        carry, y = model(x, return_carry=True)
        c, ys = model.initial_carry(B), []
        for t in range(T):
            c, y_t = model.step(c, x[:, t])
            ys.append(y_t)
        return (carry, y), (c, jnp.stack(ys, 1))

    (carry, y), (step_carry, step_y) = both(model, x)
    _assert_trees_close(step_y, y, "y")
    _assert_trees_close(step_carry, carry, "carry")


def test_training_mode_updates_batch_stats_as_linen_and_draws_dropout():
    """BatchNorm's averages are nnx.BatchStats moved as Linen's; dropout draws from rngs."""
    make = lambda: nnx.SequenceBlock(  # noqa: E731
        H, nnx.LRU(H, 6, rngs=_rngs()), norm="batch", dropout_rate=0.5, rngs=_rngs()
    )
    linen = nn.SequenceBlock(H, nn.LRU(6), norm="batch", dropout_rate=0.5)
    module, x = make(), _x(3)
    variables = nnx.linen_variables(module)
    assert sorted(_flat(variables["batch_stats"])) == [
        ("norm_layer", "mean"),
        ("norm_layer", "var"),
    ]

    @fnnx.jit
    def run(module, variables, x):
        y_train = module(x, LENGTHS, deterministic=False)
        y_again = module(x, LENGTHS, deterministic=False)
        y_eval = module(x, LENGTHS)
        _, updated = linen.apply(
            variables,
            x,
            LENGTHS,
            deterministic=False,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )
        return y_train, y_again, y_eval, updated

    y_train, y_again, y_eval, updated = run(module, variables, x)
    # two training calls, each moving the averages once; the Linen twin moved them once
    twice = nnx.linen_variables(module)["batch_stats"]["norm_layer"]
    once = updated["batch_stats"]["norm_layer"]
    start = variables["batch_stats"]["norm_layer"]
    for stat in ("mean", "var"):
        np.testing.assert_allclose(  # m2 = 0.9 m1 + 0.1 b and m1 = 0.9 m0 + 0.1 b
            twice[stat], 0.9 * once[stat] + 0.1 * (once[stat] - 0.9 * start[stat]) / 0.1, atol=1e-5
        )
    assert float(jnp.max(jnp.abs(y_train - y_again))) > 1e-3  # fresh dropout masks
    assert float(jnp.max(jnp.abs(y_train - y_eval))) > 1e-3
    assert float(jnp.max(jnp.abs(y_train[1, LENGTHS[1] :]))) == 0.0


def test_bad_input_is_named():
    layer = nnx.LRU(H, 6, rngs=_rngs())
    with pytest.raises(ValueError, match="x: the parameters expect 4 features"):
        layer(jnp.zeros((B, T, 3)))
    with pytest.raises(ValueError, match=r"x: expected .*\[batch, H\]"):
        layer.step(layer.initial_carry(B), jnp.zeros((B, T, H)))
    with pytest.raises(TypeError, match="d_state: expected a positive int"):
        nnx.LRU(H, 0.5, rngs=_rngs())
    with pytest.raises(ValueError, match="reverse: causal self-attention runs forwards only"):
        CASES["CausalSelfAttention"][0]()(_x(), reverse=True)
    variables = nnx.linen_variables(layer)
    with pytest.raises(ValueError, match=r"variables\['params'\].*\('D',\) missing"):
        nnx.load_linen(
            layer, {"params": {k: v for k, v in variables["params"].items() if k != "D"}}
        )
    wrong = {"params": {**variables["params"], "D": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"params/D: expected \(4,\), got \(5,\)"):
        nnx.load_linen(layer, wrong)


def test_a_few_optimizer_steps_reduce_the_loss():
    """Predicting the previous step's input (a delay of one) with a block over an LRU."""

    class Model(fnnx.Module):
        def __init__(self, rngs):
            self.block = nnx.SequenceBlock(H, nnx.LRU(H, 8, rngs=rngs), dropout_rate=0.1, rngs=rngs)

        def __call__(self, x, deterministic=True):
            return self.block(x, deterministic=deterministic)

    model = Model(_rngs())
    optimizer = fnnx.Optimizer(model, optax.adam(1e-2), wrt=fnnx.Param)
    x = _x(4, (8, 12, H))
    target = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))

    @fnnx.jit
    def train_step(model, optimizer, x, target):
        def loss_fn(model):
            return jnp.mean((model(x, deterministic=False) - target) ** 2)

        loss, grads = fnnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, target)) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
