"""Attention: soft attention against numpy and flax.linen, masks, causality, the cached
mixer and generation, and hard attention's estimators against exact enumerated gradients."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import attention as att
from lru_jax import models, tasks
from lru_jax import nn as lnn
from lru_jax.training import config as config_lib


def _normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _numpy_softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


# Soft attention: the pure functions.


def test_dot_product_attention_matches_numpy_and_masks_exactly():
    q, k, v = _normal(0, 2, 3, 2, 4), _normal(1, 2, 5, 2, 4), _normal(2, 2, 5, 2, 3)
    mask = np.random.default_rng(3).random((2, 2, 3, 5)) < 0.6
    mask[1, 0, 2] = False  # one query with nothing to attend to
    out, w = att.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
    out, w = np.asarray(out), np.asarray(w)

    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / 2.0
    w_ref = _numpy_softmax(scores, mask)
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", w_ref, v), atol=1e-5)
    assert np.all(w[~mask] == 0.0)  # exactly, not merely tiny
    rows = mask.any(-1)
    np.testing.assert_allclose(w.sum(-1)[rows], 1.0, atol=1e-6)
    assert np.all(out[1, 2, 0] == 0.0)  # the fully masked query

    # No NaN in gradients, even through the fully masked row.
    grads = jax.grad(lambda q: att.dot_product_attention(q, k, v, mask=mask)[0].sum())(q)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_additive_attention_matches_a_numpy_loop():
    q, k, v = _normal(0, 2, 3, 1, 4), _normal(1, 2, 5, 1, 4), _normal(2, 2, 5, 1, 3)
    w_vec = _normal(4, 1, 4)
    lengths = np.array([5, 2])
    mask = att.padding_mask(lengths, 5)
    out, w = att.additive_attention(q, k, v, w_vec, mask=mask)
    ref_w = np.zeros((2, 1, 3, 5))
    for b, i in itertools.product(range(2), range(3)):
        s = np.array([w_vec[0] @ np.tanh(q[b, i, 0] + k[b, j, 0]) for j in range(lengths[b])])
        e = np.exp(s - s.max())
        ref_w[b, 0, i, : lengths[b]] = e / e.sum()
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", ref_w, v), atol=1e-5)


def test_dropout_on_weights_keeps_the_expectation():
    q, k, v = _normal(0, 1, 2, 1, 4), _normal(1, 1, 6, 1, 4), _normal(2, 1, 6, 1, 3)
    keys = jax.random.split(jax.random.key(0), 4000)
    drop = jax.vmap(
        lambda r: att.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r)[0]
    )(keys)
    plain, w = att.dot_product_attention(q, k, v)
    # Inverted dropout is unbiased: the mean over 4000 draws is within ~4 standard errors.
    se = np.asarray(drop).std(0) / np.sqrt(4000)
    assert np.all(np.abs(np.asarray(drop).mean(0) - np.asarray(plain)) < 5 * se + 1e-6)
    assert not np.allclose(np.asarray(drop[0]), np.asarray(plain))


def test_rotary_scores_depend_only_on_relative_position():
    q, k = _normal(0, 1, 1, 1, 6), _normal(1, 1, 1, 1, 6)

    def score(i, j):
        qi = att.rotary_embedding(q, jnp.array([[i]]))
        kj = att.rotary_embedding(k, jnp.array([[j]]))
        return float(jnp.sum(qi * kj))

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert score(0, 0) == pytest.approx(float(np.sum(q * k)), abs=1e-6)


# Soft attention: the modules.


@pytest.fixture(scope="module")
def mha_setup():
    xq, xkv = _normal(0, 2, 4, 8), _normal(1, 2, 6, 8)
    ours = lnn.MultiHeadAttention(num_heads=2, qkv_features=8, out_features=5)
    params = ours.init(jax.random.key(0), xq, xkv)
    return ours, params, xq, xkv


def test_multi_head_attention_equals_flax(mha_setup):
    ours, variables, xq, xkv = mha_setup
    theirs = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=5)
    assert jax.tree.structure(theirs.init(jax.random.key(1), xq, xkv)) == jax.tree.structure(
        variables
    )
    mask = jnp.asarray(np.random.default_rng(2).random((2, 1, 4, 6)) < 0.7)
    ref = theirs.apply(variables, xq, xkv, mask=mask)
    out, w = ours.apply(variables, xq, xkv, mask=mask, return_weights=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] == 0.0)
    # The weights are also sown for inspection.
    _, state = ours.apply(variables, xq, xkv, mask=mask, mutable=["intermediates"])
    np.testing.assert_array_equal(state["intermediates"]["attention_weights"][0], w)


def test_multi_head_attention_padding_ignores_padded_keys(mha_setup):
    ours, variables, xq, xkv = mha_setup
    lengths = np.array([6, 3])
    noisy = xkv.copy()
    noisy[1, 3:] = 100.0  # anything in the padding
    a = ours.apply(variables, xq, xkv, key_lengths=lengths)
    b = ours.apply(variables, xq, noisy, key_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = ours.apply(variables, xq, xkv[:, :3])
    np.testing.assert_allclose(np.asarray(a)[1], np.asarray(c)[1], atol=1e-6)


def test_causality_by_perturbation():
    x = _normal(0, 2, 7, 8)
    later = x.copy()
    later[:, 4:] += _normal(1, 2, 3, 8)
    mha = lnn.MultiHeadAttention(num_heads=2, causal=True)
    mixer = lnn.CausalSelfAttention(d_model=8, num_heads=2, max_len=7)
    for layer in (mha, mixer):
        variables = layer.init(jax.random.key(0), x)
        a, b = np.asarray(layer.apply(variables, x)), np.asarray(layer.apply(variables, later))
        np.testing.assert_array_equal(a[:, :4], b[:, :4])
        assert not np.allclose(a[:, 4:], b[:, 4:])


def test_luong_and_bahdanau_modules_against_numpy():
    q, k = _normal(0, 2, 3, 4), _normal(1, 2, 5, 6)
    general = lnn.DotProductAttention(kind="general")
    variables = general.init(jax.random.key(0), q, k)
    out, w = general.apply(variables, q, k, return_weights=True)
    w_a = np.asarray(variables["params"]["W_a"]["kernel"], np.float64)  # [6, 4]
    ref_w = _numpy_softmax(np.einsum("bqd,bkd->bqk", q, k @ w_a), np.ones((1, 1, 5), bool))
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), ref_w @ k, atol=1e-5)

    for kind, scale in (("dot", 1.0), ("scaled", 0.5)):
        layer = lnn.DotProductAttention(kind=kind)
        w = layer.apply({}, q, q[:, :2], return_weights=True)[1]
        ref = _numpy_softmax(scale * np.einsum("bqd,bkd->bqk", q, q[:, :2]), np.ones(2, bool))
        np.testing.assert_allclose(np.asarray(w), ref, atol=1e-6)

    additive = lnn.AdditiveAttention(hidden=3)
    variables = additive.init(jax.random.key(1), q, k)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    mask = np.array([[True] * 5, [True, True, False, False, False]])
    w = additive.apply(variables, q, k, key_lengths=np.array([5, 2]), return_weights=True)[1]
    hq = q @ p["W_q"]["kernel"]
    hk = k @ p["W_k"]["kernel"] + p["W_k"]["bias"]
    s = np.tanh(hq[:, :, None] + hk[:, None]) @ p["v"][:, 0]
    np.testing.assert_allclose(np.asarray(w), _numpy_softmax(s, mask[:, None]), atol=1e-6)


def test_attention_pooling_matches_numpy_and_ignores_padding():
    x = _normal(0, 2, 5, 4)
    pool = lnn.AttentionPooling()
    variables = pool.init(jax.random.key(0), x)
    lengths = np.array([5, 2])
    pooled, w = pool.apply(variables, x, lengths)
    query = np.asarray(variables["params"]["query"], np.float64)
    valid = np.arange(5)[None] < lengths[:, None]
    ref_w = _numpy_softmax(x @ query / 2.0, valid)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled), np.einsum("bt,btf->bf", ref_w, x), atol=1e-5)
    assert np.all(np.asarray(w)[~valid] == 0.0)


# The Transformer mixer: cache, padding, generation.


@pytest.fixture(scope="module")
def mixer_setup():
    mixer = lnn.CausalSelfAttention(d_model=8, num_heads=2, max_len=9)
    x = _normal(0, 2, 7, 8)
    return mixer, jax.jit(mixer.init)(jax.random.key(0), x), x


def test_cached_steps_equal_full_causal_attention(mixer_setup):
    mixer, variables, x = mixer_setup
    full_carry, full = mixer.apply(variables, x, return_carry=True)
    step = jax.jit(functools.partial(mixer.apply, method="step"))
    carry = mixer.apply(variables, 2, method="initial_carry")
    ys = []
    for t in range(7):
        carry, y = step(variables, carry, x[:, t])
        ys.append(y)
    np.testing.assert_allclose(np.stack(ys, 1), np.asarray(full), atol=1e-5)
    np.testing.assert_allclose(np.asarray(carry.key), np.asarray(full_carry.key), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(carry.index), [7, 7])

    # A prefix in parallel, then the rest in parallel from its cache (as in truncated BPTT).
    head_carry, head = mixer.apply(variables, x[:, :3], return_carry=True)
    _, tail = mixer.apply(variables, x[:, 3:], initial_carry=head_carry, return_carry=True)
    np.testing.assert_allclose(np.concatenate([head, tail], 1), np.asarray(full), atol=1e-5)


def test_mixer_padding_zero_outputs_and_carry_at_the_last_valid_step(mixer_setup):
    mixer, variables, x = mixer_setup
    lengths = np.array([7, 4])
    noisy = x.copy()
    noisy[1, 4:] = 50.0
    carry, y = mixer.apply(variables, noisy, lengths, return_carry=True)
    short_carry, short = mixer.apply(variables, x[1:, :4], return_carry=True)
    y = np.asarray(y)
    np.testing.assert_allclose(y[1, :4], np.asarray(short)[0], atol=1e-6)
    assert np.all(y[1, 4:] == 0.0)
    np.testing.assert_array_equal(np.asarray(carry.index), [7, 4])
    np.testing.assert_allclose(np.asarray(carry.key)[1], np.asarray(short_carry.key)[0], atol=1e-6)


def test_generation_with_the_attention_mixer_equals_rerunning_the_prefix():
    model = models.SequenceModel(
        num_outputs=11, vocab_size=11, mixer="attention", d_model=8, num_layers=2, max_len=10
    )
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), prompt)  # one compile, not one per op
    fast = models.generate(model, variables, prompt, 6, temperature=0.0)
    # Reference: one parallel pass over prompt + continuation. The model is causal (tested
    # above), so its argmax after each prefix is the greedy token that prefix should produce.
    logits = jax.jit(model.apply)(variables, np.concatenate([prompt, fast], 1))
    np.testing.assert_array_equal(fast, np.argmax(np.asarray(logits)[:, 2:-1], -1))
    with pytest.raises(ValueError, match="length: prompt"):
        models.generate(model, variables, prompt, 8)


def test_attention_pooling_in_a_classifier():
    model = models.SequenceModel(
        num_outputs=3, mixer="attention", d_model=8, num_layers=1, pooling="attention", max_len=6
    )
    x = _normal(0, 2, 6, 3)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    lengths = np.array([6, 2])
    noisy = x.copy()
    noisy[1, 2:] = 9.0
    apply = jax.jit(model.apply)  # one compile for both inputs
    a = apply(variables, x, lengths)
    b = apply(variables, noisy, lengths)
    assert a.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# Hard attention.


REWARD = np.array([1.0, 0.0, 0.5, -1.0], np.float32)
LOGITS = np.array([0.5, -0.3, 0.1, 0.0], np.float32)


def _exact_gradient(k):
    """d/dlogits of E[reward], enumerating every ordered draw of k without replacement; the
    reward of a draw is the mean reward of its positions."""

    def expected(logits):
        p = jax.nn.softmax(logits)
        total = 0.0
        for draw in itertools.permutations(range(4), k):
            prob, left = 1.0, 1.0
            for j in draw:
                prob, left = prob * p[j] / left, left - p[j]
            total = total + prob * REWARD[list(draw)].mean()
        return total

    return np.asarray(jax.grad(expected)(jnp.asarray(LOGITS)))


@pytest.mark.parametrize("k", [1, 2])
def test_reinforce_mean_matches_the_exact_gradient(k):
    n = 40_000
    keys = jax.random.split(jax.random.key(k), n)
    baseline = att.update_baseline(att.init_baseline(), jnp.array(0.3))  # a non-zero baseline

    def surrogate(logits):
        positions = jax.vmap(lambda r: att.sample_positions(r, logits, k))(keys)  # [n, k]
        log_p = att.sample_log_prob(jnp.broadcast_to(logits, (n, 4)), positions)
        reward = jnp.asarray(REWARD)[positions].mean(-1)
        return att.reinforce(log_p, reward, baseline)[0]

    estimate = np.asarray(jax.jit(jax.grad(surrogate))(jnp.asarray(LOGITS)))
    exact = _exact_gradient(k)
    # Each sample's gradient (r - b)(d log p) has entries bounded by |r - b| * k <= 1.3 k, so
    # the mean of n = 40000 has standard error <= 1.3 k / 200 = 0.0065 k; allow ~4 of them.
    np.testing.assert_allclose(estimate, -exact, atol=0.026 * k)
    assert np.abs(exact).max() > 0.1  # the tolerance is well below the signal


def test_reinforce_baseline_and_entropy_bonus():
    state = att.init_baseline()
    assert float(att.baseline_value(state)) == 0.0
    state = att.update_baseline(state, jnp.array([1.0, 3.0]), decay=0.9)
    assert float(att.baseline_value(state, 0.9)) == pytest.approx(2.0)  # debiased
    state = att.update_baseline(state, jnp.array([4.0]), decay=0.9)
    assert float(att.baseline_value(state, 0.9)) == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / 0.19)

    logits = jnp.asarray(LOGITS)
    p = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert float(att.categorical_entropy(logits)) == pytest.approx(-(p * np.log(p)).sum(), 1e-6)

    def loss(logits, weight):
        ent = att.categorical_entropy(logits)
        return att.reinforce(
            jnp.zeros(()) * logits[0], 0.0, state, entropy=ent, entropy_weight=weight
        )[0]

    g = np.asarray(jax.grad(loss)(logits, 0.5))
    # d H / d logits_i = -p_i (log p_i + H)
    h = -(p * np.log(p)).sum()
    np.testing.assert_allclose(g, 0.5 * p * (np.log(p) + h), atol=1e-6)
    with pytest.raises(ValueError, match="entropy"):
        att.reinforce(logits, 1.0, state, entropy_weight=0.1)


def test_masked_reinforce_is_reinforce_on_the_samples_that_count():
    log_p = jnp.asarray(_normal(2, 2, 3))
    reward = jnp.asarray(_normal(3, 2, 3))
    entropy = jnp.asarray(np.abs(_normal(4, 2, 3)))
    mask = np.array([[True, False, True], [True, True, False]])
    state = att.update_baseline(att.init_baseline(), jnp.array(0.7), 0.8)
    kwargs = dict(decay=0.8, entropy_weight=0.2)
    loss, new = att.reinforce(log_p, reward, state, entropy=entropy, mask=mask, **kwargs)
    kept = [x[mask] for x in (log_p, reward, entropy)]
    want, want_new = att.reinforce(kept[0], kept[1], state, entropy=kept[2], **kwargs)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(new.mean) == pytest.approx(float(want_new.mean), rel=1e-6)
    # by hand: baseline 0.7 (debiased), means over the 4 valid samples
    lp, r, h = (np.asarray(x, np.float64) for x in kept)
    assert float(loss) == pytest.approx(-np.mean((r - 0.7) * lp) - 0.2 * h.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable"):
        att.reinforce(log_p, reward, state, mask=mask[:, :2])


def test_gumbel_straight_through_is_one_hot_with_soft_gradients():
    logits = jnp.asarray(_normal(0, 3, 5))
    key = jax.random.key(7)
    tau = 0.7
    y = np.asarray(att.gumbel_softmax_straight_through(key, logits, tau))
    assert set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(y.sum(-1), 1.0)

    g = np.asarray(jax.random.gumbel(key, logits.shape), np.float64)
    np.testing.assert_array_equal(y.argmax(-1), (np.asarray(logits) + g).argmax(-1))
    cot = _normal(1, 3, 5)
    grad = jax.grad(lambda z: jnp.sum(att.gumbel_softmax_straight_through(key, z, tau) * cot))
    s = np.exp((np.asarray(logits) + g) / tau)
    s /= s.sum(-1, keepdims=True)
    # Jacobian of softmax(z / tau): (diag(s) - s s^T) / tau.
    ref = (s * cot - s * (s * cot).sum(-1, keepdims=True)) / tau
    np.testing.assert_allclose(np.asarray(grad(logits)), ref, atol=1e-5)

    # Top-k: k one-hots, distinct, the same picks as sampling with the same key.
    picks = np.asarray(att.gumbel_top_k_straight_through(key, logits, 3, tau))
    np.testing.assert_array_equal(picks.sum(-1), 1.0)
    np.testing.assert_array_equal(picks.argmax(-1), att.sample_positions(key, logits, 3))


def test_temperature_schedule():
    assert float(att.anneal_temperature(0, initial=2.0, minimum=0.5, rate=0.1)) == 2.0
    assert float(att.anneal_temperature(5, initial=2.0, minimum=0.5, rate=0.1)) == pytest.approx(
        2.0 * np.exp(-0.5)
    )
    assert float(att.anneal_temperature(10**6, initial=2.0, minimum=0.5, rate=0.1)) == 0.5


@pytest.mark.parametrize("estimator", ["reinforce", "gumbel"])
def test_hard_attention_module(estimator):
    q, k = _normal(0, 2, 3, 4), _normal(1, 2, 6, 4)
    layer = lnn.HardAttention(k=2, estimator=estimator)
    variables = layer.init(jax.random.key(0), q, k)
    lengths = np.array([6, 3])
    evaluated = layer.apply(variables, q, k, key_lengths=lengths)
    w = np.asarray(variables["params"]["query"]["kernel"], np.float64)
    scores = np.einsum("bqd,bkd->bqk", q @ w, k) / 2.0
    scores[1, :, 3:] = -np.inf
    top2 = np.argsort(-scores, axis=-1)[..., :2]
    np.testing.assert_array_equal(np.asarray(evaluated.positions), top2)
    mean_of_picked = np.take_along_axis(k[:, None], top2[..., None], axis=2).mean(2)
    np.testing.assert_allclose(np.asarray(evaluated.output), mean_of_picked, atol=1e-6)

    rngs = {"dropout": jax.random.key(3)}
    sampled = layer.apply(variables, q, k, key_lengths=lengths, deterministic=False, rngs=rngs)
    positions = np.asarray(sampled.positions)
    assert np.all(positions[1] < 3) and np.all(positions[..., 0] != positions[..., 1])

    def output_sum(params):
        out = layer.apply({"params": params}, q, k, deterministic=False, rngs=rngs)
        return out.output.sum()

    grad = jax.grad(output_sum)(variables["params"])["query"]["kernel"]
    # Gumbel straight-through passes gradients to the scores; REINFORCE's output does not.
    assert (np.abs(np.asarray(grad)).max() > 0) == (estimator == "gumbel")


# Bad input is named.


def test_bad_inputs_are_named():
    q = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="query: expected rank 4"):
        att.dot_product_attention(q[0], q, q)
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable"):
        att.dot_product_attention(q, q, q, mask=jnp.ones((3, 3), bool))
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        att.dot_product_attention(q, q, q, mask=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="k: expected at most 4"):
        att.sample_positions(jax.random.key(0), jnp.zeros(4), 5)
    with pytest.raises(ValueError, match="temperature"):
        att.gumbel_softmax_straight_through(jax.random.key(0), jnp.zeros(4), 0.0)
    with pytest.raises(ValueError, match="lengths: expected values"):
        att.padding_mask(jnp.array([5]), 4)
    x = jnp.zeros((1, 3, 6))
    with pytest.raises(ValueError, match="num_heads"):
        lnn.CausalSelfAttention(d_model=6, num_heads=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"mask: expected a shape broadcastable to \(1, 3, 3\)"):
        lnn.DotProductAttention().init(jax.random.key(0), x, x, mask=jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"mask: expected a shape broadcastable to \(1, 2, 3, 3\)"):
        lnn.MultiHeadAttention(2).init(jax.random.key(0), x, mask=jnp.ones((2, 1, 1, 1), bool))
    with pytest.raises(ValueError, match="qkv_features"):
        lnn.MultiHeadAttention(num_heads=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x: expected at most max_len=2"):
        lnn.CausalSelfAttention(d_model=6, num_heads=1, max_len=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="estimator"):
        lnn.HardAttention(estimator="gradient").init(jax.random.key(0), x, x)


def test_config_checks_for_the_attention_mixer():
    config = config_lib.default_config()
    config.model.mixer = "attention"
    config.model.attention.num_heads = 3  # 128 / 3 is not an integer
    with pytest.raises(ValueError, match="config.model.attention.num_heads: expected a divisor"):
        config_lib.validate(config)
    config.model.attention.num_heads = 4
    config_lib.validate(config)
    config.model.attention.max_len = 10
    spec = tasks.get_task("text", corpus="jokes", seq_len=24).spec
    with pytest.raises(ValueError, match="config.model.attention.max_len: expected at least"):
        config_lib.check_against_task(config, spec)


def test_reinforce_without_a_baseline_yet_and_the_score_vector_by_name():
    """baseline=None is the fresh baseline (no rewards seen): the same loss and update."""
    log_p, reward = jnp.log(jnp.array([0.2, 0.5])), jnp.array([1.0, 3.0])
    loss, baseline = att.reinforce(log_p, reward, None)
    want_loss, want_baseline = att.reinforce(log_p, reward, att.init_baseline())
    assert float(loss) == float(want_loss) == pytest.approx(-np.mean(np.array(reward) * log_p))
    assert baseline == want_baseline
    with pytest.raises(TypeError, match="baseline: expected a Baseline"):
        att.reinforce(log_p, reward, 0.5)
    q, k, v = _normal(0, 1, 2, 1, 4), _normal(1, 1, 3, 1, 4), _normal(2, 1, 3, 1, 2)
    w = _normal(3, 1, 4)
    by_name = att.additive_attention(q, k, v, score_vector=w)
    np.testing.assert_array_equal(by_name[0], att.additive_attention(q, k, v, w)[0])
