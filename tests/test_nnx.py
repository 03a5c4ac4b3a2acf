"""The NNX layers against their Linen twins (lru_jax.nn): the same parameters give the same
outputs, carries and gradients, in float32 and in bfloat16 (mixed precision); variables move
both ways; steps equal the full call; bad input is named; a few nnx.Optimizer steps train a
model.

The suite's time goes to compiling, so a layer whose two forms share every operation is
compared by tracing both (the same program computes the same outputs, carries and gradients
at every input), and the blocks, whose norms differ in code between the APIs, by value in one
compiled program.
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
STEPS = 3  # the steps compared with the full call


def _x(seed=1, shape=(B, T, H)):
    return jax.random.normal(jax.random.key(seed), shape)


def _rngs(seed=0):
    return fnnx.Rngs(seed)


# name: (NNX module maker, its Linen twin, extra call keywords)
CASES = {
    "SimpleRNN": (lambda: nnx.SimpleRNN(H, 3, rngs=_rngs()), nn.SimpleRNN(3), {}),
    "LSTM": (lambda: nnx.LSTM(H, 3, rngs=_rngs()), nn.LSTM(3), {"reverse": True}),
    "GRU": (lambda: nnx.GRU(H, 3, rngs=_rngs()), nn.GRU(3), {"resets": True}),
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
        {"resets": True},
    ),
    "CausalSelfAttention-reverse": (  # one half of a Bidirectional pair
        lambda: nnx.CausalSelfAttention(H, num_heads=2, max_len=8, rngs=_rngs()),
        nn.CausalSelfAttention(H, num_heads=2, max_len=8),
        {"reverse": True},
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

BF16 = jnp.bfloat16
# Layers computing in bfloat16, as their Linen twins (Mamba and attention storing their
# parameters in bfloat16 too): x cast, parameters stored and cast, flax's Linear layers set,
# where the Linen twin does it.
BF16_CASES = {
    "LRU-bfloat16": (
        lambda: nnx.LRU(H, 6, dtype=BF16, rngs=_rngs()),
        nn.LRU(6, dtype=BF16),
        {"resets": True},
    ),
    "LSTM-bfloat16": (
        lambda: nnx.LSTM(H, 3, dtype=BF16, rngs=_rngs()),
        nn.LSTM(3, dtype=BF16),
        {"reverse": True},
    ),
    "Mamba-bfloat16": (
        lambda: nnx.Mamba(H, 8, d_state=3, dtype=BF16, param_dtype=BF16, rngs=_rngs()),
        nn.Mamba(8, d_state=3, dtype=BF16, param_dtype=BF16),
        {},
    ),
    "CausalSelfAttention-bfloat16": (
        lambda: nnx.CausalSelfAttention(
            H, num_heads=2, max_len=8, dtype=BF16, param_dtype=BF16, rngs=_rngs()
        ),
        nn.CausalSelfAttention(H, num_heads=2, max_len=8, dtype=BF16, param_dtype=BF16),
        {"resets": True},
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


def _shapes(flat):
    """{path: (shape, dtype)} of flat variables (arrays or ShapeDtypeStructs)."""
    return {path: (tuple(v.shape), jnp.dtype(v.dtype)) for path, v in flat.items()}


def _linen_shapes(linen, x, extra=()):
    """{path: (shape, dtype)} of the variables `linen.init` makes (traced, not run)."""
    init = functools.partial(linen.init, **_call_kwargs(extra))
    return _shapes(_flat(jax.eval_shape(init, jax.random.key(0), x)))


def _drawn(shapes, seed=0):
    """Linen variables of these {path: (shape, dtype)} drawn at random: magnitudes in [0.2,
    0.7] with either sign (positive for BatchNorm's variance), off any initialiser's special
    values."""
    draw, flat = np.random.default_rng(seed), {}
    for path, (shape, dtype) in shapes.items():
        value = draw.uniform(0.2, 0.7, shape) * draw.choice([-1.0, 1.0], shape)
        flat[path] = jnp.asarray(np.abs(value) if path[-1] == "var" else value, dtype)
    return traverse_util.unflatten_dict(flat)


def _linen_loss(linen, extra):
    def value_and_grad(variables, x):
        def loss(params):
            vs = {**variables, "params": params}
            carry, y = linen.apply(vs, x, LENGTHS, return_carry=True, **_call_kwargs(extra))
            return _loss(y, carry), (carry, y)

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    return value_and_grad


def _nnx_loss(make, extra):
    """The NNX form's (loss, (carry, y)) and gradients with respect to Linen variables."""

    def value_and_grad(variables, x):
        def loss(params):
            module = nnx.load_linen(fnnx.eval_shape(make), {**variables, "params": params})
            carry, y = module(x, LENGTHS, return_carry=True, **_call_kwargs(extra))
            return _loss(y, carry), (carry, y)

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    return value_and_grad


# Layers whose Linen and NNX forms share every operation; the blocks' norms are flax's own
# LayerNorm/BatchNorm in each API, written apart, so blocks are compared by value below.
SAME_PROGRAM = [name for name in CASES if name not in ("SequenceBlock", "Stack")]


@pytest.mark.parametrize("name", SAME_PROGRAM + list(BF16_CASES))
def test_a_layer_computes_the_same_program_as_its_linen_twin(name):
    """With `load_linen`'s parameters the NNX form's loss and gradients (and its step) are the
    Linen twin's program, operation for operation: so its outputs, carries and gradients are
    the Linen ones at every input. (Tracing both is cheap; compiling both would not be.)
    The bfloat16 cases: the same mixed-precision program, the parameters in the same dtype."""
    make, linen, extra = {**CASES, **BF16_CASES}[name]
    x = _x()
    module = fnnx.eval_shape(make)  # the parameters' shapes, nothing computed
    shapes = _linen_shapes(linen, x, extra)
    # the twin's names, shapes and storage dtypes
    assert _shapes(_flat(nnx.linen_variables(module))) == shapes
    variables = _drawn(shapes)
    nnx_program = jax.make_jaxpr(_nnx_loss(make, extra))(variables, x)
    linen_program = jax.make_jaxpr(_linen_loss(linen, extra))(variables, x)
    assert str(nnx_program) == str(linen_program)
    assert len(nnx_program.eqns) > 5  # a real program, not a constant
    assert ("bf16[" in str(nnx_program)) == (name in BF16_CASES)
    if name != "Bidirectional":  # a causal layer: its step is the twin's step too

        def nnx_step(variables, carry, x_t):
            return nnx.load_linen(fnnx.eval_shape(make), variables).step(carry, x_t)

        def linen_step(variables, carry, x_t):
            return linen.apply(variables, carry, x_t, method="step")

        carry = module.initial_carry(B)
        nnx_step = jax.make_jaxpr(nnx_step)(variables, carry, x[:, 0])
        assert str(nnx_step) == str(jax.make_jaxpr(linen_step)(variables, carry, x[:, 0]))


def test_blocks_in_a_stack_equal_their_linen_twins_and_step_as_they_run():
    """A stack of a post-norm BatchNorm block over an LRU (plain feed-forward) and a pre-norm
    LayerNorm GLU block over attention: outputs, carries and gradients against the Linen
    twin with the same variables (Linen -> NNX), in evaluation and in training (BatchNorm's
    statistics), and one step at a time against the full call."""

    def make():
        return nnx.Stack(
            [
                nnx.SequenceBlock(
                    H,
                    nnx.LRU(H, 6, rngs=_rngs()),
                    norm="batch",
                    prenorm=False,
                    ffn="gelu",
                    rngs=_rngs(),
                ),
                nnx.SequenceBlock(
                    H,
                    nnx.CausalSelfAttention(H, num_heads=2, max_len=8, rngs=_rngs()),
                    rngs=_rngs(),
                ),
            ],
        )

    linen = nn.Stack(
        [
            nn.SequenceBlock(H, nn.LRU(6), norm="batch", prenorm=False, ffn="gelu"),
            nn.SequenceBlock(H, nn.CausalSelfAttention(H, num_heads=2, max_len=8)),
        ]
    )
    x = _x()
    variables = _drawn(_linen_shapes(linen, x))
    module = nnx.load_linen(fnnx.eval_shape(make), variables)
    assert _shapes(_flat(nnx.linen_variables(module))) == _linen_shapes(linen, x)

    @fnnx.jit
    def run(module, variables, x):
        def nnx_loss(module):
            carry, y = module(x, LENGTHS, return_carry=True)
            return _loss(y, carry), (carry, y)

        (_, ours), grads = fnnx.value_and_grad(nnx_loss, has_aux=True)(module)
        (_, theirs), linen_grads = _linen_loss(linen, {})(variables, x)
        carry, ys = module.initial_carry(B), []
        for t in range(STEPS):
            carry, y_t = module.step(carry, x[:, t])
            ys.append(y_t)
        full = module(x[:, :STEPS], return_carry=True)
        grads = {nnx._linen_path(p): g.get_value() for p, g in fnnx.to_flat_state(grads)}
        # the BatchNorm block in training: it normalises by the batch and moves its averages
        # (a Stack's `deterministic` is the dropout between its layers', in both forms)
        block_variables = {c: variables[c]["layers_0"] for c in variables}
        linen_train = linen.layers[0].apply(
            block_variables, x, LENGTHS, deterministic=False, mutable=["batch_stats"]
        )
        nnx_train = module.layers[0](x, LENGTHS, deterministic=False)
        nnx_eval = module.layers[0](x, LENGTHS)
        stepped = (carry, jnp.stack(ys, 1))
        train = nnx_train, nnx_eval, linen_train
        return ours, theirs, grads, _flat(linen_grads), stepped, full, train

    ours, theirs, grads, linen_grads, stepped, full, train = run(module, variables, x)
    nnx_train, nnx_eval, linen_train = train
    _assert_trees_close(ours[1], theirs[1], "y")
    _assert_trees_close(ours[0], theirs[0], "carry")
    assert float(jnp.max(jnp.abs(ours[1][1, LENGTHS[1] :]))) == 0.0  # padding
    assert sorted(grads) == sorted(linen_grads)
    for path, g in grads.items():
        assert float(jnp.max(jnp.abs(g))) > 0.0, path
        _assert_trees_close(g, linen_grads[path], f"grad {path}")
    _assert_trees_close(stepped[1], full[1], "steps: y")
    _assert_trees_close(stepped[0], full[0], "steps: carry")
    _assert_trees_close(nnx_train, linen_train[0], "training: y")
    assert float(jnp.max(jnp.abs(nnx_train - nnx_eval))) > 1e-3  # the batch's statistics
    moved = nnx.linen_variables(module)["batch_stats"]["layers_0"]  # BatchStats, in place
    _assert_trees_close(moved, linen_train[1]["batch_stats"], "training: batch_stats")
    assert not np.allclose(
        moved["norm_layer"]["mean"],
        variables["batch_stats"]["layers_0"]["norm_layer"]["mean"],
    )


def test_bfloat16_blocks_in_a_stack_equal_their_linen_twins():
    """Blocks computing in bfloat16 over attention (a LayerNorm GLU block with float32
    parameters, a BatchNorm block storing them in bfloat16, both pre-norm so the residual
    stream's dtype reaches the output): the Linen twin's storage dtypes, outputs and caches
    in the same dtypes, the values within two bfloat16 steps (flax's NNX LayerNorm rounds
    its scale and bias to bfloat16, Linen's does not)."""
    low = {"dtype": BF16, "param_dtype": BF16}

    def make():
        def attention(**dtypes):
            return nnx.CausalSelfAttention(H, num_heads=2, max_len=8, **dtypes, rngs=_rngs())

        return nnx.Stack(
            [
                nnx.SequenceBlock(H, attention(dtype=BF16), dtype=BF16, rngs=_rngs()),
                nnx.SequenceBlock(H, attention(**low), norm="batch", **low, rngs=_rngs()),
            ]
        )

    linen = nn.Stack(
        [
            nn.SequenceBlock(H, nn.CausalSelfAttention(H, 2, 8, dtype=BF16), dtype=BF16),
            nn.SequenceBlock(H, nn.CausalSelfAttention(H, 2, 8, **low), norm="batch", **low),
        ]
    )
    x = _x()
    shapes = _linen_shapes(linen, x)
    assert {dtype for _, dtype in shapes.values()} == {jnp.dtype(jnp.float32), jnp.dtype(BF16)}
    variables = _drawn(shapes)
    module = nnx.load_linen(fnnx.eval_shape(make), variables)
    assert _shapes(_flat(nnx.linen_variables(module))) == shapes

    @fnnx.jit
    def run(module, variables, x):
        ours = module(x, LENGTHS, return_carry=True)
        return ours, linen.apply(variables, x, LENGTHS, return_carry=True)

    ours, theirs = run(module, variables, x)
    assert theirs[1].dtype == BF16
    assert [a.dtype for a in jax.tree.leaves(ours)] == [a.dtype for a in jax.tree.leaves(theirs)]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    bound = 2.0**-7 * float(jnp.max(jnp.abs(theirs[1].astype(jnp.float32))))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=bound)


def test_variables_come_back_from_an_nnx_module_unchanged():
    """NNX -> Linen: `linen_variables` returns what `load_linen` set, every collection."""
    x = _x()
    for name in ("LSTM", "SequenceBlock", "Stack", "Bidirectional"):
        make, linen, extra = CASES[name]
        made = _drawn(_linen_shapes(linen, x, extra), seed=5)
        back = nnx.linen_variables(nnx.load_linen(fnnx.eval_shape(make), made))
        assert sorted(back) == sorted(made), name  # params, and batch_stats where there are
        for collection in made:
            _assert_trees_close(_flat(back[collection]), _flat(made[collection]), name)


def test_parameters_are_the_functional_init_of_the_modules_first_key():
    """Traced, not run: the same program gives the same values."""

    def traced(f):
        return str(jax.make_jaxpr(f)())

    nnx_lru = traced(lambda: nnx.LRU(H, 6, r_min=0.5, rngs=_rngs(3)).params())
    assert nnx_lru == traced(lambda: lru.init(_rngs(3).params(), H, 6, 0.5))
    nnx_gru = traced(lambda: nnx.GRU(H, 3, rngs=_rngs(4)).params())
    assert nnx_gru == traced(lambda: cells.get("gru").init(_rngs(4).params(), H, 3))
    assert nnx_gru != traced(lambda: cells.get("gru").init(_rngs(5).params(), H, 3))


def test_bad_input_is_named():
    layer = fnnx.eval_shape(lambda: nnx.LRU(H, 6, rngs=_rngs()))  # refused before computing
    with pytest.raises(ValueError, match="x: the parameters expect 4 features"):
        layer(jnp.zeros((B, T, 3)))
    with pytest.raises(ValueError, match=r"x: expected .*\[batch, H\]"):
        layer.step(layer.initial_carry(B), jnp.zeros((B, T, H)))
    with pytest.raises(TypeError, match="d_state: expected a positive int"):
        nnx.LRU(H, 0.5, rngs=_rngs())
    attention = fnnx.eval_shape(CASES["CausalSelfAttention"][0])
    with pytest.raises(ValueError, match="reverse: self-attention reads backwards without"):
        attention(_x(), reverse=True, resets=jnp.zeros((B, T), bool))
    with pytest.raises(
        ValueError, match=r"x: the parameters expect 4 features \(d_model\) on the last axis, got 3"
    ):
        attention(jnp.zeros((B, T, 3)), reverse=True)
    variables = _drawn(_shapes(_flat(nnx.linen_variables(layer))))
    with pytest.raises(ValueError, match=r"variables\['params'\].*\('D',\) missing"):
        nnx.load_linen(
            layer, {"params": {k: v for k, v in variables["params"].items() if k != "D"}}
        )
    wrong = {"params": {**variables["params"], "D": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"params/D: expected \(4,\), got \(5,\)"):
        nnx.load_linen(layer, wrong)
    assert isinstance(layer.nu_log.get_value(), jax.ShapeDtypeStruct)  # nothing was set
    lstm = fnnx.eval_shape(lambda: nnx.LSTM(H, 3, rngs=_rngs()))
    with pytest.raises(ValueError, match=r"x: expected .*\[batch, features\]"):
        lstm.step(lstm.initial_carry(B), jnp.zeros((B,)))
    with pytest.raises(ValueError, match="cell: expected one of"):
        nnx.RecurrentLayer(H, 3, cell="rnn", rngs=_rngs())
    with pytest.raises(TypeError, match=r"^dtype: expected a floating dtype, one of \["):
        nnx.LRU(H, 6, dtype="int32", rngs=_rngs())
    with pytest.raises(TypeError, match=r"^param_dtype: expected a floating dtype"):
        nnx.CausalSelfAttention(H, num_heads=2, param_dtype="bf16", rngs=_rngs())
    block = fnnx.eval_shape(
        lambda: nnx.SequenceBlock(H, nnx.LSTM(H, H, rngs=_rngs()), rngs=_rngs())
    )
    with pytest.raises(ValueError, match=r"x: the parameters expect 4 features \(d_model\)"):
        block(jnp.zeros((B, T, 5)))
    with pytest.raises(TypeError, match="variables: expected a Linen variables dict"):
        nnx.load_linen(block, [1, 2])


def test_a_few_optimizer_steps_reduce_the_loss():
    """Predicting the previous step's input (a delay of one) with a block over an LRU, its
    dropout on."""

    class Model(fnnx.Module):
        def __init__(self, rngs):
            self.block = nnx.SequenceBlock(H, nnx.LRU(H, 8, rngs=rngs), dropout_rate=0.1, rngs=rngs)

        def __call__(self, x, deterministic=True):
            return self.block(x, deterministic=deterministic)

    model = Model(_rngs())
    # its LRU drew the first parameter key (computed eagerly, as the model was)
    _assert_trees_close(model.block.mixer.params(), lru.init(_rngs().params(), H, 8), "init")
    optimizer = fnnx.Optimizer(model, optax.adam(1e-2), wrt=fnnx.Param)
    x = _x(4, (8, 12, H))
    target = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))

    @fnnx.jit
    def train_step(model, optimizer, x, target):
        def loss_fn(model):
            return jnp.mean((model(x, deterministic=False) - target) ** 2)

        without_dropout = jnp.mean((model(x) - target) ** 2)
        loss, grads = fnnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, without_dropout

    results = [train_step(model, optimizer, x, target) for _ in range(30)]
    losses = [float(loss) for loss, _ in results]
    assert abs(losses[0] - float(results[0][1])) > 1e-4  # dropout draws, from the rngs
    assert abs(losses[1] - losses[0]) > 1e-4
    assert losses[-1] < 0.6 * losses[0], losses
