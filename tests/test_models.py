"""SequenceModel heads, remat, and generation through the one-step path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import lru, models, tasks
from lru_jax.training import config as config_lib


def _lm(mixer="lru", remat=False):
    return models.SequenceModel(
        num_outputs=11, vocab_size=11, mixer=mixer, d_model=8, num_layers=2, d_state=6, remat=remat
    )


@pytest.mark.parametrize("cell", ["lru", "lstm"])
def test_greedy_generation_equals_rerunning_the_prefix(cell):
    model = _lm(cell)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), prompt)  # one compile, not one per op
    fast = models.generate(model, variables, prompt, 6, temperature=0.0)
    # Reference: the whole sequence rerun for each prefix, prompt + fast[:, :i] for i < 6, the
    # argmax at its end the token after it. The 6 prefixes run as one padded batch (lengths
    # 3..8): one compiled forward, not one per prefix length.
    seq = np.concatenate([prompt, fast], 1)
    lengths = np.repeat(np.arange(3, 9), 2)  # [12]: prefix i of each prompt
    prefixes = np.where(np.arange(9) < lengths[:, None], np.tile(seq, (6, 1)), 0)
    logits = np.asarray(jax.jit(model.apply)(variables, prefixes, lengths))
    after = np.argmax(logits[np.arange(12), lengths - 1], -1).reshape(6, 2).T
    np.testing.assert_array_equal(fast, after)


def test_sampling_respects_top_k_and_seed():
    model = _lm()
    prompt = np.zeros((64, 1), np.int32)
    variables = jax.jit(model.init)(jax.random.key(1), prompt)  # one compile, not one per op
    logits = np.asarray(jax.jit(model.apply)(variables, prompt))[0, -1]
    top2 = set(np.argsort(logits)[-2:])
    first = models.generate(model, variables, prompt, 1, temperature=1.0, top_k=2, seed=3)
    assert set(first[:, 0]) <= top2
    again = models.generate(model, variables, prompt, 5, temperature=1.0, top_k=2, seed=3)
    np.testing.assert_array_equal(again[:, :1], first)
    other = models.generate(model, variables, prompt, 5, temperature=1.0, top_k=2, seed=4)
    assert not np.array_equal(other, again)


def test_pooling_last_and_mean_with_lengths():
    x = np.random.default_rng(0).normal(size=(3, 7, 2)).astype(np.float32)
    lengths = np.array([7, 3, 1])
    kw = dict(num_outputs=4, mixer="gru", d_model=8, num_layers=1)
    per_step = models.SequenceModel(pooling="none", **kw)
    variables = jax.jit(per_step.init)(jax.random.key(0), x, lengths)  # one compile, not per op
    # The head is affine, so pooling its per-step outputs equals the head of pooled features.
    steps = np.asarray(per_step.apply(variables, x, lengths))
    last = models.SequenceModel(pooling="last", **kw).apply(variables, x, lengths)
    mean = models.SequenceModel(pooling="mean", **kw).apply(variables, x, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(last[b]), steps[b, n - 1], atol=1e-5)
        np.testing.assert_allclose(np.asarray(mean[b]), steps[b, :n].mean(0), atol=1e-5)


@pytest.mark.parametrize("cell,pooling", [("lru", "none"), ("gru", "mean")])
def test_remat_gives_the_same_outputs_and_gradients(cell, pooling):
    """Chunks of 4 over 9 steps (a padded last chunk), ragged lengths and an initial carry."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 11, size=(3, 9)).astype(np.int32)
    lengths = np.array([9, 5, 1], np.int32)
    kw = dict(num_outputs=3, vocab_size=11, mixer=cell, d_model=8, num_layers=2, d_state=6)
    plain = models.SequenceModel(pooling=pooling, **kw)
    remat = models.SequenceModel(pooling=pooling, remat=True, remat_chunk=4, **kw)
    variables = jax.jit(plain.init)(jax.random.key(2), tokens, lengths)
    carry = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), c.dtype),
        plain.apply(variables, 3, method="initial_carry"),
    )

    def loss(model, params):
        carries, out = model.apply(
            {"params": params}, tokens, lengths, initial_carry=carry, return_carry=True
        )
        carry_part = sum(jnp.sum(jnp.abs(c) ** 2) for c in jax.tree.leaves(carries))
        return jnp.mean(out**2) + 0.1 * carry_part, out

    def value_and_grad(model):  # compiled: op by op it takes several times longer
        return jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))

    (want, want_out), want_grads = value_and_grad(plain)(variables["params"])
    (got, got_out), got_grads = value_and_grad(remat)(variables["params"])
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_remat_shrinks_the_compiled_memory_plan():
    """XLA's buffer plan of the gradient (a compile-time fact, not a timing)."""
    x = np.zeros((1, 512, 1), np.float32)
    kw = dict(num_outputs=1, mixer="lru", d_model=16, num_layers=2, d_state=16)
    planned = []
    for model in (
        models.SequenceModel(**kw),
        models.SequenceModel(remat=True, remat_chunk=16, **kw),
    ):
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # shapes suffice
        grad = jax.grad(lambda p, model=model: jnp.mean(model.apply({"params": p}, x) ** 2))
        planned.append(jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes)
    assert planned[1] < planned[0] / 3, planned  # (the benchmark measures the real sizes)


def test_bad_inputs():
    model = _lm()
    variables = model.init(jax.random.key(0), np.zeros((1, 3), np.int32))
    with pytest.raises(TypeError, match="inputs: expected integer token ids"):
        model.apply(variables, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="prompt: expected rank 2"):
        models.generate(model, variables, np.zeros(3, np.int32), 4)
    with pytest.raises(ValueError, match="top_k"):
        models.generate(model, variables, np.zeros((1, 3), np.int32), 4, top_k=50)
    with pytest.raises(ValueError, match="mixer: expected one of"):
        models.SequenceModel(num_outputs=2, mixer="transformer").init(
            jax.random.key(0), np.zeros((1, 3, 2), np.float32)
        )


def test_config_grad_chunk_zero_selects_autodiff_with_the_same_gradient():
    task = tasks.get_task("adding", seq_len=6)
    config = config_lib.default_config()
    config.model.update(mixer="lstm", d_model=8, num_layers=1, pooling="last", dropout_rate=0.0)
    chunked = config_lib.build_model(config.model, task.spec)
    config.model.rnn.grad_chunk = 0
    autodiff = config_lib.build_model(config.model, task.spec)
    assert (chunked.grad_chunk, autodiff.grad_chunk) == (16, None)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 2)), jnp.float32)
    variables = jax.jit(chunked.init)(jax.random.key(0), x)

    def loss(model):
        return lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)

    got = jax.jit(jax.grad(loss(chunked)))(variables["params"])
    want = jax.jit(jax.grad(loss(autodiff)))(variables["params"])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Forward mode needs the autodiff loop: a custom VJP has no JVP rule.
    tangent = jax.tree.map(jnp.ones_like, variables["params"])
    jax.jvp(loss(autodiff), (variables["params"],), (tangent,))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(loss(chunked), (variables["params"],), (tangent,))


def test_layer_rings_and_bias_free_options_shape_the_parameters():
    rings = ((0.0, 0.5, 6.0), (0.99, 0.999, 0.01))
    model = models.SequenceModel(
        num_outputs=1, d_model=8, d_state=16, num_layers=2, pooling="last",
        layer_rings=rings, norm_bias=False, encoder_bias=False,
    )  # fmt: skip
    params = model.init(jax.random.key(0), jnp.ones((2, 5, 3)))["params"]
    assert "bias" not in params["encoder"]
    for layer, (r_min, r_max, max_phase) in enumerate(rings):
        block = params[f"blocks_{layer}"]
        assert "bias" not in block["norm_layer"]
        lam = np.asarray(lru.eigenvalues(block["mixer"]))
        assert np.all((np.abs(lam) >= r_min - 1e-6) & (np.abs(lam) <= r_max + 1e-6))
        assert np.all(np.exp(block["mixer"]["theta_log"]) <= max_phase + 1e-6)
    assert "bias" in params["final_norm"]  # after the recurrences: kept
    with pytest.raises(ValueError, match=r"layer_rings: expected \(\) or 2 .* got \(\(0.0, 0.5"):
        models.SequenceModel(num_outputs=1, num_layers=2, layer_rings=rings[:1]).init(
            jax.random.key(0), jnp.ones((1, 3, 2))
        )
    bad = models.SequenceModel(num_outputs=1, num_layers=2, layer_rings=(rings[0], (0.9, 0.5, 1)))
    with pytest.raises(ValueError, match=r"layer_rings\[1\]: r_min, r_max: expected 0 <= r_min"):
        bad.init(jax.random.key(0), jnp.ones((1, 3, 2)))


@pytest.mark.parametrize("mixer", ["lru", "attention"])
def test_a_bidirectional_model_read_backwards_with_its_directions_swapped_is_unchanged(mixer):
    """Reversing each sequence within its length and swapping every block's forward and
    backward mixers (and the rows of the Dense that reads their concatenated outputs) mirrors
    every step's output, so the mean-pooled logits stay the same; tokens past the lengths are
    noise that must not reach either direction."""
    model = models.SequenceModel(
        num_outputs=3, vocab_size=9, mixer=mixer, d_model=8, num_layers=2, d_state=4,
        num_heads=2, pooling="mean", bidirectional=True,
    )  # fmt: skip
    lengths = np.array([7, 4, 1], np.int32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, (3, 7)).astype(np.int32)
    reversed_tokens = rng.integers(1, 9, (3, 7)).astype(np.int32)  # noise past each length
    for row, n in enumerate(lengths):
        reversed_tokens[row, :n] = tokens[row, n - 1 :: -1][:n]
    variables = jax.jit(model.init)(jax.random.key(0), tokens, lengths)

    def swapped(block):
        mixer_params = block["mixer"]
        kernel = block["out"]["kernel"]
        rows = np.concatenate([kernel[8:], kernel[:8]])
        mixer_params = {
            "forward_layer": mixer_params["backward_layer"],
            "backward_layer": mixer_params["forward_layer"],
        }
        return {**block, "mixer": mixer_params, "out": {**block["out"], "kernel": rows}}

    params = variables["params"]
    mirror = {**params, **{k: swapped(v) for k, v in params.items() if k.startswith("blocks_")}}
    apply = jax.jit(model.apply)
    expected = apply(variables, tokens, lengths)
    got = apply({**variables, "params": mirror}, reversed_tokens, lengths)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.std(np.asarray(expected)[:, 0]) > 1e-3  # the rows differ: not a constant
    with pytest.raises(ValueError, match="bidirectional: needs a pooled model"):
        models.SequenceModel(num_outputs=3, vocab_size=9, bidirectional=True).init(
            jax.random.key(0), tokens
        )
