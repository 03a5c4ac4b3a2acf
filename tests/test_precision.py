"""Mixed precision: modules computing in bfloat16 with float32 parameters, the scans
accumulating in float32 / complex64, and a bfloat16 training run close to a float32 one."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend import core as jax_core
from tiny_configs import tiny_config

from lru_jax import models, scan
from lru_jax import nn as lnn
from lru_jax.training import config as config_lib
from lru_jax.training import loop

BF16 = jnp.bfloat16
# bfloat16 keeps 8 significant bits (relative spacing 2^-8 = 0.4%): through a block or two of
# matmuls the outputs differ from float32 by about 1% of their largest value; 4% is the bound
RELATIVE_TOLERANCE = 0.04
X = jax.random.normal(jax.random.key(0), (2, 10, 8))


def _matmul_dtypes(jaxpr, found):
    """The operand dtypes of every dot_general in `jaxpr` and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.dtype.name for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    _matmul_dtypes(sub.jaxpr, found)
                elif isinstance(sub, jax_core.Jaxpr):
                    _matmul_dtypes(sub, found)
    return found


def _check_against_float32(make, x=X):
    """make(dtype) -> a module; its bfloat16 form (the float32 form's parameters) must give
    bfloat16 outputs within RELATIVE_TOLERANCE of float32's, keep float32 parameters, and run
    every matmul of its forward and backward pass in bfloat16."""
    # jitted: run eagerly, op by op, init and apply compile every operation on its own
    variables = jax.jit(make(jnp.float32).init)(jax.random.key(1), x)
    low = make(BF16)
    params = jax.eval_shape(low.init, jax.random.key(1), x)["params"]  # shapes, not values
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    want = jax.jit(make(jnp.float32).apply)(variables, x)
    got = jax.jit(low.apply)(variables, x)
    assert got.dtype == BF16
    error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    assert 0.0 < error <= RELATIVE_TOLERANCE * float(jnp.max(jnp.abs(want)))

    def loss(p):
        return jnp.sum(low.apply({**variables, "params": p}, x).astype(jnp.float32) ** 2)

    dtypes = _matmul_dtypes(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr, [])
    assert dtypes and set(dtypes) == {("bfloat16", "bfloat16")}


@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: lnn.LRU(6, dtype=dtype),
        lambda dtype: lnn.LSTM(8, dtype=dtype),
        lambda dtype: lnn.GRU(8, dtype=dtype),
        lambda dtype: lnn.CausalSelfAttention(8, num_heads=2, max_len=16, dtype=dtype),
    ],
    ids=["lru", "lstm", "gru", "attention"],
)
def test_a_bfloat16_mixer_is_close_to_float32_with_float32_parameters(make):
    _check_against_float32(make)


@pytest.mark.parametrize("mixer", ["mingru", "minlstm", "hgrn", "rglru", "s5", "mamba"])
def test_a_bfloat16_sequence_model_of_each_diagonal_recurrence_is_close_to_float32(mixer):
    model = config_lib.default_config().model
    model.mixer, model.s5.d_state = mixer, 8
    options = config_lib._mixer_options(model)

    def make(dtype):
        return models.SequenceModel(
            num_outputs=3, mixer=mixer, d_model=8, num_layers=1, mixer_options=options, dtype=dtype
        )

    _check_against_float32(make)


def test_the_scans_accumulate_in_float32_whatever_the_input_dtype():
    k = jax.random.split(jax.random.key(2), 5)
    a = jax.random.uniform(k[0], (9, 2, 3), minval=0.5, maxval=1.0).astype(BF16)
    b = jax.random.normal(k[1], (9, 2, 3)).astype(BF16)
    h = scan.linear_scan(a, b, method="sequential")
    assert h.dtype == jnp.float32  # the inputs cast up at the boundary, then scanned
    np.testing.assert_array_equal(
        h, scan.linear_scan(a.astype(jnp.float32), b.astype(jnp.float32), method="sequential")
    )
    lam = jnp.full((3,), 0.9 + 0.1j, jnp.complex64)
    assert scan.linear_scan(lam, b).dtype == jnp.complex64
    assert scan.log_linear_scan(jnp.log(a), b).dtype == jnp.float32
    x, delta = b, jax.nn.softplus(b)
    A = -jnp.ones((3, 4), BF16)
    B, C = (jax.random.normal(key, (9, 2, 4)).astype(BF16) for key in k[2:4])
    y, h_last = scan.selective_scan(x, delta, A, B, C, method="sequential")
    assert (y.dtype, h_last.dtype) == (jnp.float32, jnp.float32)


@pytest.mark.parametrize(
    "layer, state_dtype",
    [(lnn.LRU(6, dtype=BF16), jnp.complex64), (lnn.MinGRU(8, dtype=BF16), jnp.float32)],
    ids=["lru", "mingru"],
)
def test_the_recurrent_state_keeps_its_dtype_under_bfloat16_compute(layer, state_dtype):
    variables = layer.init(jax.random.key(1), X)
    carry, y = layer.apply(variables, X, return_carry=True)
    assert (carry.dtype, y.dtype) == (state_dtype, BF16)
    assert layer.apply(variables, 2, method="initial_carry").dtype == state_dtype
    # a step from that carry keeps it (a generation loop's carry has a fixed type)
    step_carry, y_t = layer.apply(variables, carry, X[:, 0], method="step")
    assert (step_carry.dtype, y_t.dtype) == (state_dtype, BF16)


def test_dtypes_are_checked_by_name():
    with pytest.raises(TypeError, match=r"^dtype: expected a floating dtype, one of \["):
        lnn.LRU(4, dtype="int32").init(jax.random.key(0), X)
    with pytest.raises(TypeError, match=r"^param_dtype: expected a floating dtype"):
        lnn.MinGRU(4, param_dtype="bf16").init(jax.random.key(0), X)


def test_the_config_names_a_bad_dtype_and_an_older_config_loads_as_float32():
    config = tiny_config()
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match=r"^config.model.dtype: expected one of \['float32', "):
        config_lib.validate(config)
    saved = json.loads(tiny_config().to_json())
    del saved["model"]["dtype"]  # a run saved before the key existed
    upgraded = config_lib.upgrade(ml_collections.ConfigDict(saved))
    config_lib.validate(upgraded)
    assert upgraded.model.dtype == "float32"


def test_a_short_bfloat16_training_run_ends_close_to_the_float32_one(tmp_path):
    """200 steps of the tiny LRU language model (d_model 16, 24 characters, batch 4) in each
    dtype, the same seed and data: the final validation losses agree within 1% (measured:
    2.8714 in float32, 2.8718 in bfloat16, from 6.0 at the start)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(num_steps=200, eval_every=200, checkpoint_every=200, log_every=100)
        config.model.dtype = dtype
        config.model.dropout_rate = 0.0
        model = config_lib.build_model(config.model, loop.build_task(config).spec)
        assert jnp.dtype(model.dtype) == jnp.dtype(dtype)
        result = loop.train_and_evaluate(config, str(tmp_path / dtype))
        losses[dtype] = result["valid"]["loss"]
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.01 * losses["float32"]
