"""Composite Flax modules: SequenceBlock, Stack and Bidirectional, checked by hand-written
numpy references and by behaviour (padding, step-by-step equality, dropout placement)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import numpy_lru

from lru_jax import nn as lnn


def _gelu(x):  # flax.linen.gelu's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def numpy_block(params, x, prenorm=True, ffn="glu"):
    """SequenceBlock(LRU) by hand: x [batch, time, H] float64."""
    norm = params["norm_layer"]
    z = _layer_norm(x, norm) if prenorm else x
    z, _ = numpy_lru(params["mixer"], z.transpose(1, 0, 2))
    z = _gelu(z.transpose(1, 0, 2))
    z = z @ np.asarray(params["out"]["kernel"], np.float64) + np.asarray(params["out"]["bias"])
    if ffn == "glu":
        value, gate = np.split(z, 2, axis=-1)
        z = value / (1 + np.exp(-gate))
    x = x + z
    return x if prenorm else _layer_norm(x, norm)


@pytest.mark.parametrize("prenorm, ffn", [(True, "glu"), (False, "gelu")])
def test_sequence_block_matches_hand_computation(prenorm, ffn):
    x = np.random.default_rng(0).normal(size=(2, 7, 4)).astype(np.float32)
    block = lnn.SequenceBlock(4, lnn.LRU(6, r_min=0.5), prenorm=prenorm, ffn=ffn)
    variables = block.init(jax.random.key(0), x)
    # Perturb LayerNorm's scale and bias so that they matter.
    params = jax.tree.map(np.asarray, variables["params"])
    params["norm_layer"]["scale"] = params["norm_layer"]["scale"] * 1.5
    params["norm_layer"]["bias"] = params["norm_layer"]["bias"] + 0.3
    y = block.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), numpy_block(params, x, prenorm, ffn), atol=3e-5)


def test_sequence_block_padding_and_batch_norm_mask():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8, 4)).astype(np.float32)
    lengths = np.array([8, 3, 5])
    block = lnn.SequenceBlock(4, lnn.LSTM(4), norm="batch", dropout_rate=0.0)
    variables = block.init(jax.random.key(0), x, lengths)
    y, updates = block.apply(variables, x, lengths, deterministic=False, mutable=["batch_stats"])
    valid = np.arange(8)[None, :] < lengths[:, None]
    assert np.all(np.asarray(y)[~valid] == 0.0)
    # Batch statistics come from valid positions only (flax's running mean starts at 0,
    # momentum 0.9: new = 0.9 * 0 + 0.1 * batch mean).
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["norm_layer"]["mean"]),
        0.1 * x[valid].mean(0),
        atol=1e-6,
    )
    noisy = np.where(valid[..., None], x, 50.0).astype(np.float32)
    y2, _ = block.apply(variables, noisy, lengths, deterministic=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize(
    "module",
    [
        lnn.SequenceBlock(3, lnn.LRU(5)),
        lnn.SequenceBlock(3, lnn.GRU(3), prenorm=False, ffn="gelu"),
        lnn.Stack((lnn.LSTM(4), lnn.LRU(6), lnn.SimpleRNN(3, activation="relu"))),
    ],
    ids=["block-lru", "block-gru-postnorm", "stack"],
)
def test_step_by_step_equals_whole_sequence(module):
    x = np.random.default_rng(2).normal(size=(2, 6, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x)
    carry_ref, y = module.apply(variables, x, return_carry=True)
    carry = module.initial_carry(2)
    step = jax.jit(functools.partial(module.apply, method="step"))  # compiled once, not op by op
    for t in range(6):
        carry, y_t = step(variables, carry, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=1e-4)
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_ref), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_stack_dropout_only_between_layers():
    x = np.ones((2, 5, 3), np.float32)
    rngs = {"dropout": jax.random.key(3)}
    one = lnn.Stack((lnn.GRU(4),), dropout_rate=0.5)
    v1 = one.init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        np.asarray(one.apply(v1, x, deterministic=False, rngs=rngs)),
        np.asarray(one.apply(v1, x)),
    )
    two = lnn.Stack((lnn.GRU(4), lnn.GRU(4)), dropout_rate=0.5)
    v2 = two.init(jax.random.key(0), x)
    train = two.apply(v2, x, deterministic=False, rngs=rngs)
    assert not np.allclose(np.asarray(train), np.asarray(two.apply(v2, x)))
    # Evaluation equals the layers composed by hand.
    inner = lnn.GRU(4)
    by_hand = inner.apply(
        {"params": v2["params"]["layers_1"]},
        inner.apply({"params": v2["params"]["layers_0"]}, x),
    )
    np.testing.assert_allclose(np.asarray(two.apply(v2, x)), np.asarray(by_hand), atol=1e-6)


def test_stack_hands_each_layer_its_own_carry_and_returns_theirs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    lstm, lru_layer = lnn.LSTM(4), lnn.LRU(6)
    stack = lnn.Stack((lstm, lru_layer))
    v = stack.init(jax.random.key(0), x)
    c0 = (
        tuple(rng.normal(size=(2, 4)).astype(np.float32) for _ in range(2)),
        (rng.normal(size=(2, 6)) + 1j * rng.normal(size=(2, 6))).astype(np.complex64),
    )
    carries, y = stack.apply(v, x, initial_carry=c0, return_carry=True)
    c_a, h = lstm.apply({"params": v["params"]["layers_0"]}, x, initial_carry=c0[0],
                        return_carry=True)  # fmt: skip
    c_b, want = lru_layer.apply({"params": v["params"]["layers_1"]}, h, initial_carry=c0[1],
                                return_carry=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-6)
    for got, ref in zip(jax.tree.leaves(carries), jax.tree.leaves((c_a, c_b)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


def test_bidirectional_is_forward_and_per_sequence_reversal():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    lengths = np.array([6, 4])
    bi = lnn.Bidirectional(lnn.LSTM(4), lnn.LRU(5), merge="concat")
    variables = bi.init(jax.random.key(0), x, lengths)
    y = np.asarray(bi.apply(variables, x, lengths))
    fwd = lnn.LSTM(4).apply({"params": variables["params"]["forward_layer"]}, x, lengths)
    np.testing.assert_allclose(y[..., :4], np.asarray(fwd), atol=1e-6)
    # Backward half: reverse each sequence by hand, run forwards, reverse back.
    bwd_layer = lnn.LRU(5)
    bwd_vars = {"params": variables["params"]["backward_layer"]}
    for b, n in enumerate(lengths):
        flipped = x[b : b + 1, :n][:, ::-1]
        expect = np.asarray(bwd_layer.apply(bwd_vars, np.ascontiguousarray(flipped)))[:, ::-1]
        np.testing.assert_allclose(y[b, :n, 4:], expect[0], atol=2e-5)
        assert np.all(y[b, n:] == 0.0)
    summed = lnn.Bidirectional(lnn.GRU(4), lnn.GRU(4), merge="sum")
    sv = summed.init(jax.random.key(1), x)
    parts = [
        lnn.GRU(4).apply({"params": sv["params"][k]}, x, reverse=k == "backward_layer")
        for k in ("forward_layer", "backward_layer")
    ]
    np.testing.assert_allclose(
        np.asarray(summed.apply(sv, x)), np.asarray(parts[0] + parts[1]), atol=1e-6
    )


def test_bad_arguments_are_named():
    x = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="norm: expected one of"):
        lnn.SequenceBlock(3, lnn.LRU(4), norm="group").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x: the parameters expect 4 features \(d_model\)"):
        lnn.SequenceBlock(4, lnn.LRU(4)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="dropout_rate"):
        lnn.Stack((lnn.GRU(3),), dropout_rate=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="initial_carry: expected a tuple of 2"):
        stack = lnn.Stack((lnn.GRU(3), lnn.GRU(3)))
        stack.init(jax.random.key(0), x, initial_carry=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="carry: expected a tuple of 2 per-layer carries"):
        stack.apply(stack.init(jax.random.key(0), x), None, x[:, 0], method="step")
    with pytest.raises(ValueError, match="merge: expected one of"):
        lnn.Bidirectional(lnn.GRU(3), lnn.GRU(3), merge="avg").init(jax.random.key(0), x)


def test_inputs_without_features_are_refused_and_lists_converted():
    layer = lnn.GRU(3)
    with pytest.raises(
        ValueError, match=r"x: expected at least one feature .*got shape \(2, 5, 0\)"
    ):
        layer.init(jax.random.key(0), jnp.ones((2, 5, 0)))
    x = [[[1.0, -1.0], [0.5, 2.0]]]  # [batch 1, time 2, features 2]
    variables = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(layer.apply(variables, x), layer.apply(variables, jnp.asarray(x)))
