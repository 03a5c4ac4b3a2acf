"""Attention as pure functions: soft attention (dot-product, additive, multi-head masks,
rotary positions) and hard attention (sampled positions, REINFORCE, Gumbel straight-through).

Unlike the rest of the functional core, attention functions are **batch-major**, like
`flax.linen.dot_product_attention`, because attention has no time recursion to scan over:

    query [batch, Tq, heads, D], key [batch, Tk, heads, D], value [batch, Tk, heads, Dv]
    scores and weights [batch, heads, Tq, Tk]
    masks: bool, broadcastable to [batch, heads, Tq, Tk]; True means "may attend".

Masked weights are exactly 0 (set with `where`, not only by adding -inf), and a query with
no key to attend to (a fully masked row) gets all-zero weights and a zero output, never NaN.

Hard attention picks positions instead of averaging them. Positions are sampled with the
Gumbel-top-k trick (the top k of logits + Gumbel noise are k draws without replacement, in
order), scored by their Plackett-Luce log-probability for REINFORCE, or relaxed with
Gumbel-softmax straight-through (one-hot forwards, soft gradients backwards).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lru_jax import _checks

LUONG_KINDS = ("dot", "general", "scaled")
_HEADS_LAYOUT = "[batch, time, heads, head_dim]"


# Masks.


def causal_mask(time: int) -> jax.Array:
    """bool [time, time]: query i may attend key j iff j <= i (broadcasts over batch, heads)."""
    time = _checks.positive_int("time", time)
    return jnp.tril(jnp.ones((time, time), bool))


def document_mask(resets) -> jax.Array:
    """bool [batch, 1, time, time]: the causal mask within documents packed back to back.

    `resets`: bool [batch, time], true at the first step of each document. Query i may attend
    key j iff j <= i and no document starts in (j, i], so each document sees only itself.
    """
    _checks.rank("resets", resets, 2, "[batch, time]")
    resets = _checks.resets(resets, resets.shape)
    document = jnp.cumsum(resets, axis=1)  # [batch, time]: which document each step is in
    same = document[:, :, None] == document[:, None, :]
    return (same & causal_mask(resets.shape[1]))[:, None]


def padding_mask(lengths, time: int) -> jax.Array:
    """bool [batch, 1, 1, time]: key j of sequence b is valid iff j < lengths[b].

    `lengths`: int [batch] with values in [0, time].
    """
    time = _checks.positive_int("time", time)
    _checks.rank("lengths", lengths, 1, "[batch]")
    lengths = _checks.seq_lengths(lengths, lengths.shape[0], time)
    return (jnp.arange(time)[None, :] < lengths[:, None])[:, None, None, :]


def query_padding_mask(lengths, time: int) -> jax.Array:
    """bool [batch, 1, time, 1]: query i of sequence b is valid iff i < lengths[b]."""
    return jnp.swapaxes(padding_mask(lengths, time), -1, -2)


def combine_masks(*masks) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are)."""
    masks = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


# Scores and weights.


def _check_heads(name, x):
    _checks.rank(name, x, 4, _HEADS_LAYOUT)
    _checks.floating(name, x, allow_complex=False)


def _check_qk(query, key):
    _check_heads("query", query)
    _check_heads("key", key)
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key: expected the same batch and heads, got {query.shape} and {key.shape}"
        )


def check_mask(mask, shape, layout: str = "[batch, heads, Tq, Tk]") -> None:
    """Checks that `mask` is a bool array broadcastable to `shape` (described by `layout`)."""
    if mask is None:
        return
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"mask: expected a bool array, got {type(mask).__name__}")
    if mask.dtype != bool:
        raise TypeError(f"mask: expected dtype bool (True = attend), got {mask.dtype}")
    try:
        out = jnp.broadcast_shapes(mask.shape, tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"mask: expected a shape broadcastable to {tuple(shape)} {layout}, got {mask.shape}"
        )


def dot_product_scores(query, key, *, scale: float | None = None) -> jax.Array:
    """Scores [batch, heads, Tq, Tk] = scale * <query_i, key_j> per head.

    query [batch, Tq, heads, D], key [batch, Tk, heads, D]; `scale` defaults to 1/sqrt(D)
    (Vaswani et al.'s scaled dot product); scale=1 is Luong's "dot".
    """
    _check_qk(query, key)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"key: expected head_dim {query.shape[-1]} (query's), got shape {key.shape}"
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)


def additive_scores(query, key, score_vector) -> jax.Array:
    """Bahdanau's additive scores [batch, heads, Tq, Tk] = w_h . tanh(query_i + key_j).

    query [batch, Tq, heads, D] and key [batch, Tk, heads, D] are the already projected
    W_q q and W_k k; score_vector w [heads, D] turns each tanh into a score (Bahdanau's v_a,
    named apart from the values). Memory is O(batch Tq Tk heads D).
    """
    _check_qk(query, key)
    _checks.rank("score_vector", score_vector, 2, "[heads, head_dim]")
    w = score_vector
    if query.shape[-1] != key.shape[-1] or w.shape != (query.shape[2], query.shape[3]):
        raise ValueError(
            f"query, key and score_vector: expected head_dim to agree and score_vector of "
            f"shape {(query.shape[2], query.shape[3])}, got {query.shape}, {key.shape}, {w.shape}"
        )
    hidden = jnp.tanh(query[:, :, None] + key[:, None, :])  # [batch, Tq, Tk, heads, D]
    return jnp.einsum("bqkhd,hd->bhqk", hidden, w)


def masked_softmax(scores, mask=None) -> jax.Array:
    """Softmax over the last axis that is exactly 0 where `mask` is False.

    scores [..., Tk]; mask bool broadcastable to scores. Fully masked rows give all zeros.
    Computed in at least float32 (bfloat16 scores are cast up), returned in scores' dtype.
    """
    dtype = scores.dtype
    scores = scores.astype(jnp.promote_types(dtype, jnp.float32))
    if mask is None:
        return jax.nn.softmax(scores, axis=-1).astype(dtype)
    # A finite fill (not -inf) keeps fully masked rows NaN-free; `where` makes them exact 0.
    filled = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.where(mask, jax.nn.softmax(filled, axis=-1), 0.0).astype(dtype)


def attend(weights, value, *, dropout_rate: float = 0.0, dropout_rng=None) -> jax.Array:
    """Weighted values: weights [batch, heads, Tq, Tk], value [batch, Tk, heads, Dv] ->
    out [batch, Tq, heads, Dv]. With `dropout_rng`, weights are dropped at `dropout_rate`
    (kept ones scaled by 1/(1 - rate))."""
    weights = _dropout(weights, dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _dropout(weights, rate, rng):
    _checks.rate("dropout_rate", rate)
    if rate == 0.0 or rng is None:
        return weights
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def dot_product_weights(query, key, *, mask=None, scale: float | None = None) -> jax.Array:
    """Attention weights [batch, heads, Tq, Tk]: masked softmax of the scaled dot products."""
    scores = dot_product_scores(query, key, scale=scale)
    check_mask(mask, scores.shape)
    return masked_softmax(scores, mask)


def dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
):
    """Scaled dot-product attention, per head.

    Args:
      query: [batch, Tq, heads, D].
      key: [batch, Tk, heads, D].
      value: [batch, Tk, heads, Dv].
      mask: bool broadcastable to [batch, heads, Tq, Tk], True = may attend.
      scale: multiplies the dot products; default 1/sqrt(D).
      dropout_rate, dropout_rng: dropout on the weights (off when `dropout_rng` is None).

    Returns:
      (out [batch, Tq, heads, Dv], weights [batch, heads, Tq, Tk]); the weights are the ones
      before dropout, summing to 1 over unmasked keys and exactly 0 on masked ones.
    """
    _check_value(value, key)
    weights = dot_product_weights(query, key, mask=mask, scale=scale)
    return attend(weights, value, dropout_rate=dropout_rate, dropout_rng=dropout_rng), weights


def additive_attention(
    query, key, value, score_vector, *, mask=None, dropout_rate=0.0, dropout_rng=None
):
    """Bahdanau attention: `additive_scores`, masked softmax, weighted values.

    query [batch, Tq, heads, D] and key [batch, Tk, heads, D] already projected,
    score_vector [heads, D], value [batch, Tk, heads, Dv] -> (out [batch, Tq, heads, Dv],
    weights [batch, heads, Tq, Tk]).
    """
    _check_value(value, key)
    scores = additive_scores(query, key, score_vector)
    check_mask(mask, scores.shape)
    weights = masked_softmax(scores, mask)
    return attend(weights, value, dropout_rate=dropout_rate, dropout_rng=dropout_rng), weights


def _check_value(value, key):
    _check_heads("value", value)
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value: expected batch, time and heads {key.shape[:3]} (key's), got {value.shape}"
        )


def luong_scale(kind: str, head_dim: int) -> float:
    """The dot-product scale of Luong's score `kind`: "dot" and "general" 1, "scaled"
    1/sqrt(head_dim). ("general" also projects the key by a matrix W_a: a module's job.)"""
    _checks.one_of("kind", kind, LUONG_KINDS)
    return 1.0 / math.sqrt(head_dim) if kind == "scaled" else 1.0


# Positions.


def rotary_embedding(x, positions, *, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) of x [batch, time, heads, D] at integer
    positions [batch, time]; D must be even.

    Feature pairs (i, i + D/2) rotate by the angle position * base^(-2i/D), so the dot product
    of a rotated query and key depends on their positions only through their difference.
    """
    _check_heads("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x: rotary embedding needs an even head_dim, got {x.shape[-1]}")
    _checks.rank("positions", positions, 2, "[batch, time]")
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [batch, time, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x.dtype)


# Hard attention: sampling positions.


def _masked_logits(logits, mask):
    if mask is None:
        return logits
    return jnp.where(mask, logits, -jnp.inf)


def _check_logits(logits, k, mask):
    shape = _checks.floating("logits", logits, allow_complex=False)
    if not shape:
        raise ValueError("logits: expected rank >= 1 [..., positions], got a scalar")
    k = _checks.positive_int("k", k)
    if k > shape[-1]:
        raise ValueError(f"k: expected at most {shape[-1]} (the positions), got {k}")
    check_mask(mask, shape, "[..., positions]")
    return k


def gumbel_noise(key, shape) -> jax.Array:
    """Standard Gumbel noise, float32 `shape`."""
    return jax.random.gumbel(key, shape, jnp.float32)


def sample_positions(key, logits, k: int = 1, *, mask=None) -> jax.Array:
    """k positions drawn without replacement from softmax(logits), in draw order.

    logits [..., T]; mask bool broadcastable to logits (False positions are never drawn; keep
    at least k valid). Returns int32 [..., k]. Gumbel-top-k: the k largest logits + Gumbel
    noise are distributed as k sequential draws without replacement.
    """
    k = _check_logits(logits, k, mask)
    perturbed = _masked_logits(logits, mask) + gumbel_noise(key, logits.shape)
    return jax.lax.top_k(perturbed, k)[1].astype(jnp.int32)


def argmax_positions(logits, k: int = 1, *, mask=None) -> jax.Array:
    """The k most likely positions, int32 [..., k] (hard attention at evaluation)."""
    k = _check_logits(logits, k, mask)
    return jax.lax.top_k(_masked_logits(logits, mask), k)[1].astype(jnp.int32)


def sample_log_prob(logits, positions, *, mask=None) -> jax.Array:
    """log P(positions) [...] of an ordered draw without replacement (Plackett-Luce).

    logits [..., T], positions int [..., k]: the sum over draws i of log softmax(logits) at
    positions[i] with the earlier draws removed. For k = 1 this is log softmax at the position.
    """
    _checks.rank("positions", positions, logits.ndim, "[..., k]")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions: expected integer positions, got dtype {positions.dtype}")
    logits = _masked_logits(logits, mask)
    total = jnp.zeros(positions.shape[:-1], jnp.float32)
    for i in range(positions.shape[-1]):
        pick = positions[..., i : i + 1]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        total = total + jnp.take_along_axis(log_p, pick, axis=-1)[..., 0]
        chosen = jnp.arange(logits.shape[-1]) == pick
        logits = jnp.where(chosen, -jnp.inf, logits)
    return total


def categorical_entropy(logits, *, mask=None) -> jax.Array:
    """Entropy [...] of softmax(logits [..., T]) over the unmasked positions, in nats."""
    probs = masked_softmax(logits, mask)
    log_p = jax.nn.log_softmax(_masked_logits(logits, mask), axis=-1)
    return -jnp.sum(jnp.where(probs > 0, probs * log_p, 0.0), axis=-1)


# Hard attention: REINFORCE with a moving-average baseline.


class Baseline(NamedTuple):
    """Moving-average reward baseline: the state is explicit (a pytree), not hidden.

    mean: the exponential moving average of rewards (debiased by `count` like Adam's moments).
    count: how many updates it has seen.
    """

    mean: jax.Array
    count: jax.Array


def init_baseline() -> Baseline:
    return Baseline(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def baseline_value(state: Baseline, decay: float = 0.9) -> jax.Array:
    """The current baseline: the debiased moving average (0 before any update)."""
    correction = 1.0 - decay ** state.count.astype(jnp.float32)
    return jnp.where(state.count > 0, state.mean / jnp.maximum(correction, 1e-12), 0.0)


def update_baseline(state: Baseline, reward, decay: float = 0.9, *, mask=None) -> Baseline:
    """Moves the average towards the mean of `reward` (any shape; with `mask`, broadcastable
    to it, the mean of the rewards where it is True)."""
    _checks.number("decay", decay, 0, 1, closed_high=False)
    mean = decay * state.mean + (1.0 - decay) * _masked_mean(reward, mask)
    return Baseline(mean, state.count + 1)


def _masked_mean(x, mask):
    """The mean of x where `mask` (broadcastable to x) is True; the plain mean without one."""
    if mask is None:
        return jnp.mean(x)
    weight = jnp.broadcast_to(mask, jnp.shape(x)).astype(jnp.float32)
    return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def reinforce(
    log_prob,
    reward,
    baseline: Baseline | None,
    *,
    decay: float = 0.9,
    entropy=None,
    entropy_weight: float = 0.0,
    mask=None,
):
    """REINFORCE (Williams 1992) surrogate loss and the updated baseline.

    Args:
      log_prob: [...] log-probability of each sampled choice (differentiable in the logits).
      reward: [...] reward of each sample (treated as a constant).
      baseline: the `Baseline` state before this batch (so it is independent of the samples);
        None: no rewards seen yet, the same as `init_baseline()`.
      decay: moving-average decay of the baseline.
      entropy: optional [...] entropy of each sampling distribution, for the bonus.
      entropy_weight: the bonus's weight (encourages exploration).
      mask: optional bool, broadcastable to log_prob: the samples that count (e.g. the valid
        steps of padded sequences); means are over them, and only they move the baseline.

    Returns:
      (loss, new_baseline). The gradient of `loss` is an unbiased estimate of
      -d E[reward]/d params (minus the entropy bonus's gradient): minimise it.
    """
    _checks.floating("log_prob", log_prob, allow_complex=False)
    shape = _checks.broadcastable(("log_prob", "reward"), (jnp.shape(log_prob), jnp.shape(reward)))
    if mask is not None:
        check_mask(mask, shape, "like log_prob and reward")
    if entropy_weight and entropy is None:
        raise ValueError("entropy: needed when entropy_weight is non-zero, got None")
    if baseline is None:
        baseline = init_baseline()
    if not isinstance(baseline, Baseline):
        _checks.fail(
            "baseline", "a Baseline (attention.init_baseline()) or None", baseline, TypeError
        )
    reward = jax.lax.stop_gradient(jnp.broadcast_to(reward, shape))
    advantage = reward - baseline_value(baseline, decay)
    loss = -_masked_mean(advantage * log_prob, mask)
    if entropy is not None and entropy_weight:
        loss = loss - entropy_weight * _masked_mean(entropy, mask)
    return loss, update_baseline(baseline, reward, decay, mask=mask)


# Hard attention: Gumbel-softmax straight-through.


def straight_through(perturbed, temperature, *, mask=None) -> jax.Array:
    """One-hot of argmax(perturbed) forwards; gradient of softmax(perturbed / temperature).

    perturbed [..., T] are logits + Gumbel noise. The forward value is exactly one-hot.
    """
    soft = masked_softmax(perturbed / temperature, mask)
    hard = jax.nn.one_hot(jnp.argmax(_masked_logits(perturbed, mask), -1), perturbed.shape[-1])
    return hard + (soft - jax.lax.stop_gradient(soft))


def gumbel_softmax_straight_through(key, logits, temperature=1.0, *, mask=None) -> jax.Array:
    """A one-hot sample [..., T] from softmax(logits [..., T]) with Gumbel-softmax gradients.

    Forward: exactly one-hot at argmax(logits + g), g ~ Gumbel, i.e. a categorical sample.
    Backward: the gradient of softmax((logits + g) / temperature) (Jang et al. 2017;
    Maddison et al. 2017). Lower temperature: less biased, higher-variance gradients.
    """
    _check_logits(logits, 1, mask)
    _check_temperature(temperature)
    return straight_through(logits + gumbel_noise(key, logits.shape), temperature, mask=mask)


def gumbel_top_k_straight_through(key, logits, k: int, temperature=1.0, *, mask=None):
    """k one-hot draws without replacement [..., k, T], each straight-through.

    Draw i is the straight-through argmax of the same perturbed logits with draws < i
    removed, so the forward picks are exactly `sample_positions` with the same key.
    """
    k = _check_logits(logits, k, mask)
    _check_temperature(temperature)
    perturbed = logits + gumbel_noise(key, logits.shape)
    mask = jnp.ones(logits.shape, bool) if mask is None else jnp.broadcast_to(mask, logits.shape)
    draws = []
    for _ in range(k):
        one_hot = straight_through(perturbed, temperature, mask=mask)
        draws.append(one_hot)
        mask = mask & (jax.lax.stop_gradient(one_hot) == 0)
    return jnp.stack(draws, axis=-2)


def _check_temperature(temperature):
    if _checks.is_concrete(temperature) and not float(temperature) > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")


def anneal_temperature(step, *, initial: float = 1.0, minimum: float = 0.5, rate: float = 1e-4):
    """Gumbel-softmax temperature at `step`: max(minimum, initial * exp(-rate * step)).

    The exponential anneal to a floor of Jang et al. (2017); works on traced steps.
    """
    if not 0.0 < minimum <= initial or rate < 0:
        raise ValueError(
            f"initial, minimum, rate: expected 0 < minimum <= initial and rate >= 0, got "
            f"{initial}, {minimum}, {rate}"
        )
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(minimum, initial * jnp.exp(-rate * step))
