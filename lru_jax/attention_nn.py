"""Flax Linen attention modules over `lru_jax.attention`; re-exported by `lru_jax.nn`.

Batch-major: queries [batch, Tq, features], keys/values [batch, Tk, features]. Masks are
bool and broadcast to [batch, heads, Tq, Tk] (multi-head) or [batch, Tq, Tk] (single-head
modules); True means "may attend". `key_lengths`/`query_lengths` (int [batch]) add padding
masks. Every module sows its weights as `intermediates/attention_weights` (read them with
`apply(..., mutable=["intermediates"])`); soft-attention modules also return them with
`return_weights=True`.

`CausalSelfAttention` is a sequence mixer for `SequenceBlock` (the Transformer baseline): the
common call `layer(x, seq_lengths, initial_carry=..., return_carry=...)`, and `step` with a
key/value cache for generation.

Mixed precision (as in `lru_jax.nn`): every module takes `dtype` (computation: projections,
scores, outputs) and `param_dtype` (parameter storage), float32 by default; the softmax runs
in float32 whatever `dtype` (`attention.masked_softmax`), hard attention's scores too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lru_jax import _checks
from lru_jax import attention as att

HARD_ESTIMATORS = ("reinforce", "gumbel")


def compute_dtype(module: nn.Module):
    """The module's `dtype` (checked): the dtype it computes in."""
    return _checks.float_dtype("dtype", module.dtype)


def _dense_dtypes(module: nn.Module) -> dict:
    """The keyword arguments that make a Flax Dense compute and store as `module` does."""
    return {"dtype": compute_dtype(module), "param_dtype": module.param_dtype}


def _length_masks(q, kv, query_lengths, key_lengths):
    """Padding masks [batch, 1, Tq or 1, Tk or 1] from lengths (None where not given)."""
    key_mask = query_mask = None
    if key_lengths is not None:
        _checks.seq_lengths(key_lengths, kv.shape[0], kv.shape[1])
        key_mask = att.padding_mask(key_lengths, kv.shape[1])
    if query_lengths is not None:
        _checks.seq_lengths(query_lengths, q.shape[0], q.shape[1])
        query_mask = att.query_padding_mask(query_lengths, q.shape[1])
    return query_mask, key_mask


def _zero_padded_queries(out, query_mask):
    """Zeroes outputs [batch, Tq, ...] of padded queries (their bias would leak otherwise)."""
    if query_mask is None:
        return out
    valid = query_mask[:, 0, :, 0].reshape(out.shape[:2] + (1,) * (out.ndim - 2))
    return jnp.where(valid, out, 0.0)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), self or cross.

    Parameters match `flax.linen.MultiHeadDotProductAttention`: query/key/value
    DenseGeneral kernels [in, heads, head_dim], out kernel [heads, head_dim, out_features].

    Attributes:
      num_heads: attention heads.
      qkv_features: width of the projected queries/keys/values (default: the query width);
        divisible by num_heads.
      out_features: output width (default: the query width).
      causal: adds a causal mask (self-attention: query i sees keys j <= i).
      dropout_rate: dropout on the attention weights ("dropout" RNG stream).
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    causal: bool = False
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        inputs_q,
        inputs_kv=None,
        *,
        mask=None,
        query_lengths=None,
        key_lengths=None,
        deterministic: bool = True,
        return_weights: bool = False,
    ):
        """inputs_q [batch, Tq, F], inputs_kv [batch, Tk, F'] (default: inputs_q).

        Returns out [batch, Tq, out_features], or (out, weights [batch, heads, Tq, Tk]) with
        `return_weights`. Outputs of padded queries are zero.
        """
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        inputs_q = _checks.sequence("inputs_q", inputs_q)
        inputs_kv = _checks.sequence("inputs_kv", inputs_kv)
        _checks.rate("dropout_rate", self.dropout_rate)
        heads = _checks.positive_int("num_heads", self.num_heads)
        features = self.qkv_features or inputs_q.shape[-1]
        if features % heads:
            raise ValueError(
                f"qkv_features: expected a multiple of num_heads={heads}, got {features}"
            )
        if self.causal and inputs_q.shape[1] != inputs_kv.shape[1]:
            raise ValueError(
                f"causal: needs as many queries as keys, got {inputs_q.shape[1]} and "
                f"{inputs_kv.shape[1]}"
            )
        att.check_mask(mask, (inputs_q.shape[0], heads, inputs_q.shape[1], inputs_kv.shape[1]))
        query_mask, key_mask = _length_masks(inputs_q, inputs_kv, query_lengths, key_lengths)
        causal = att.causal_mask(inputs_q.shape[1]) if self.causal else None
        mask = att.combine_masks(mask, causal, query_mask, key_mask)

        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            (heads, features // heads), use_bias=self.use_bias, name=name, **_dense_dtypes(self)
        )
        q, k, v = dense("query")(inputs_q), dense("key")(inputs_kv), dense("value")(inputs_kv)
        rng = None
        if not deterministic and self.dropout_rate > 0.0:
            rng = self.make_rng("dropout")
        out, weights = att.dot_product_attention(
            q, k, v, mask=mask, dropout_rate=self.dropout_rate, dropout_rng=rng
        )
        self.sow("intermediates", "attention_weights", weights)
        out = nn.DenseGeneral(
            self.out_features or inputs_q.shape[-1],
            axis=(-2, -1),
            use_bias=self.use_bias,
            name="out",
            **_dense_dtypes(self),
        )(out)
        out = _zero_padded_queries(out, query_mask)
        return (out, weights) if return_weights else out


def _single_head_mask(mask, query, key):
    """Checks a bool mask broadcastable to [batch, Tq, Tk]; returns it as an array."""
    if mask is not None:
        mask = jnp.asarray(mask) if isinstance(mask, (list, tuple)) else mask
        att.check_mask(mask, (query.shape[0], query.shape[1], key.shape[1]), "[batch, Tq, Tk]")
    return mask


class _SingleHead(nn.Module):
    """Shared call of the single-head modules: masks, checks, value defaulting."""

    def _prepare(self, query, key, value, mask, query_lengths, key_lengths):
        value = key if value is None else value
        query, key, value = (
            _checks.sequence(name, x).astype(compute_dtype(self))
            for name, x in (("query", query), ("key", key), ("value", value))
        )
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"value: expected batch and time {key.shape[:2]} (key's), got {value.shape}"
            )
        mask = _single_head_mask(mask, query, key)
        if mask is not None:
            mask = jnp.expand_dims(mask, -3)  # a heads axis
        query_mask, key_mask = _length_masks(query, key, query_lengths, key_lengths)
        return query, key, value, query_mask, att.combine_masks(mask, query_mask, key_mask)

    def _finish(self, out, weights, query_mask, return_weights):
        weights = weights[:, 0]  # [batch, Tq, Tk]
        self.sow("intermediates", "attention_weights", weights)
        out = _zero_padded_queries(out[:, :, 0], query_mask)
        return (out, weights) if return_weights else out


class DotProductAttention(_SingleHead):
    """Luong et al. (2015) attention: score(q, k) = q.k ("dot"), q.W k ("general") or
    q.k / sqrt(D) ("scaled").

    query [batch, Tq, D], key [batch, Tk, Dk] (Dk = D unless "general"), value [batch, Tk,
    Dv] (default: key) -> out [batch, Tq, Dv] (and weights [batch, Tq, Tk]).
    """

    kind: str = "scaled"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        query,
        key,
        value=None,
        *,
        mask=None,
        query_lengths=None,
        key_lengths=None,
        deterministic=True,
        return_weights=False,
    ):
        _checks.one_of("kind", self.kind, att.LUONG_KINDS)
        _checks.rate("dropout_rate", self.dropout_rate)
        query, key, value, query_mask, mask = self._prepare(
            query, key, value, mask, query_lengths, key_lengths
        )
        if self.kind == "general":
            key = nn.Dense(query.shape[-1], use_bias=False, name="W_a", **_dense_dtypes(self))(key)
        elif query.shape[-1] != key.shape[-1]:
            raise ValueError(
                f"key: kind {self.kind!r} needs key features {query.shape[-1]} (query's), "
                f"got {key.shape[-1]}; use kind='general' to project"
            )
        rng = self.make_rng("dropout") if not deterministic and self.dropout_rate else None
        out, weights = att.dot_product_attention(
            query[:, :, None],
            key[:, :, None],
            value[:, :, None],
            mask=mask,
            scale=att.luong_scale(self.kind, query.shape[-1]),
            dropout_rate=self.dropout_rate,
            dropout_rng=rng,
        )
        return self._finish(out, weights, query_mask, return_weights)


class AdditiveAttention(_SingleHead):
    """Bahdanau et al. (2015) attention: score(q, k) = v . tanh(W_q q + W_k k).

    query [batch, Tq, Dq], key [batch, Tk, Dk], value [batch, Tk, Dv] (default: key) ->
    out [batch, Tq, Dv] (and weights [batch, Tq, Tk]). `hidden` is the width of tanh's input.
    """

    hidden: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        query,
        key,
        value=None,
        *,
        mask=None,
        query_lengths=None,
        key_lengths=None,
        deterministic=True,
        return_weights=False,
    ):
        hidden = _checks.positive_int("hidden", self.hidden)
        _checks.rate("dropout_rate", self.dropout_rate)
        query, key, value, query_mask, mask = self._prepare(
            query, key, value, mask, query_lengths, key_lengths
        )
        q = nn.Dense(hidden, use_bias=False, name="W_q", **_dense_dtypes(self))(query)
        k = nn.Dense(hidden, name="W_k", **_dense_dtypes(self))(key)
        # the score vector; its parameter keeps the name "v" that trained runs were saved with
        init = nn.initializers.lecun_normal()
        score_vector = self.param("v", init, (hidden, 1), self.param_dtype)[:, 0].astype(q.dtype)
        rng = self.make_rng("dropout") if not deterministic and self.dropout_rate else None
        out, weights = att.additive_attention(
            q[:, :, None],
            k[:, :, None],
            value[:, :, None],
            score_vector[None],
            mask=mask,
            dropout_rate=self.dropout_rate,
            dropout_rng=rng,
        )
        return self._finish(out, weights, query_mask, return_weights)


class AttentionPooling(nn.Module):
    """Pools a sequence with a learned query: weights = softmax_t(q . x_t / sqrt(F)).

    x [batch, time, F], seq_lengths int [batch] -> (pooled [batch, F], weights [batch,
    time]); padded steps get weight exactly 0. A sequence of length 0 pools to zeros.
    """

    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(self, x, seq_lengths=None):
        x = _checks.sequence("x", x).astype(compute_dtype(self))
        mask = None
        if seq_lengths is not None:
            _checks.seq_lengths(seq_lengths, x.shape[0], x.shape[1])
            mask = att.padding_mask(seq_lengths, x.shape[1])
        init = nn.initializers.normal(1.0)
        query = self.param("query", init, (x.shape[-1],), self.param_dtype)
        query = jnp.broadcast_to(query, (x.shape[0], 1, 1, x.shape[-1])).astype(x.dtype)
        out, weights = att.dot_product_attention(query, x[:, :, None], x[:, :, None], mask=mask)
        weights = weights[:, 0, 0]
        self.sow("intermediates", "attention_weights", weights)
        return out[:, 0, 0], weights


class HardAttentionOutput(NamedTuple):
    """What `HardAttention` returns.

    output: [batch, Tq, Dv], the mean of the values at the chosen positions.
    positions: int32 [batch, Tq, k], the chosen positions in draw order.
    log_prob: [batch, Tq], log-probability of the draw (for `attention.reinforce`).
    entropy: [batch, Tq], entropy of the attention distribution (for the entropy bonus).
    probs: [batch, Tq, Tk], the attention distribution the positions come from.
    """

    output: jax.Array
    positions: jax.Array
    log_prob: jax.Array
    entropy: jax.Array
    probs: jax.Array


class HardAttention(nn.Module):
    """Attends to k sampled positions instead of a weighted average (Xu et al. 2015).

    Scores are scaled dot products of projected queries with the keys. Training
    (`deterministic=False`) samples k positions without replacement from the softmax:
      "reinforce": the output does not depend differentiably on the scores; train them with
        `attention.reinforce(out.log_prob, reward, baseline, entropy=out.entropy, ...)`.
      "gumbel": straight-through Gumbel-softmax: the forward picks exactly those positions,
        gradients flow through softmax((scores + g) / temperature).
    Evaluation takes the top-k (argmax). Samples draw from the `rng_collection` stream.

    query [batch, Tq, Dq], key [batch, Tk, Dk], value [batch, Tk, Dv] (default: key).
    """

    k: int = 1
    estimator: str = "gumbel"
    temperature: float = 1.0
    rng_collection: str = "dropout"
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        query,
        key,
        value=None,
        *,
        mask=None,
        key_lengths=None,
        deterministic=True,
        temperature=None,
    ) -> HardAttentionOutput:
        """`temperature` (maybe traced, e.g. from `attention.anneal_temperature`) overrides
        the attribute. mask: bool broadcastable to [batch, Tq, Tk]."""
        _checks.one_of("estimator", self.estimator, HARD_ESTIMATORS)
        k = _checks.positive_int("k", self.k)
        value = key if value is None else value
        query, key, value = (
            _checks.sequence(name, x).astype(compute_dtype(self))
            for name, x in (("query", query), ("key", key), ("value", value))
        )
        if k > key.shape[1]:
            raise ValueError(f"k: expected at most {key.shape[1]} (the keys), got {k}")
        mask = _single_head_mask(mask, query, key)
        _, key_mask = _length_masks(query, key, None, key_lengths)
        mask = att.combine_masks(mask, None if key_mask is None else key_mask[:, 0])
        q = nn.Dense(key.shape[-1], use_bias=False, name="query", **_dense_dtypes(self))(query)
        scores = jnp.einsum("bqd,bkd->bqk", q, key) / jnp.sqrt(key.shape[-1])
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # sampled, logged
        temperature = self.temperature if temperature is None else temperature
        probs = att.masked_softmax(scores, mask)
        self.sow("intermediates", "attention_weights", probs)

        if deterministic:
            positions = att.argmax_positions(scores, k, mask=mask)
            picks = jax.nn.one_hot(positions, key.shape[1])  # [batch, Tq, k, Tk]
        elif self.estimator == "gumbel":
            rng = self.make_rng(self.rng_collection)
            picks = att.gumbel_top_k_straight_through(rng, scores, k, temperature, mask=mask)
            positions = jnp.argmax(picks, axis=-1).astype(jnp.int32)
        else:
            rng = self.make_rng(self.rng_collection)
            positions = att.sample_positions(rng, scores, k, mask=mask)
            picks = jax.nn.one_hot(positions, key.shape[1])
        self.sow("intermediates", "positions", positions)
        output = jnp.einsum("bqjk,bkd->bqd", picks.astype(value.dtype), value) / k
        return HardAttentionOutput(
            output=output,
            positions=positions,
            log_prob=att.sample_log_prob(scores, positions, mask=mask),
            entropy=att.categorical_entropy(scores, mask=mask),
            probs=probs,
        )


# The Transformer mixer.


class KVCache(NamedTuple):
    """The carry of `CausalSelfAttention`: rotated keys and values of the steps seen so far.

    key, value: [batch, max_len, heads, head_dim]; index: int32 [batch], how many steps of
    each sequence are stored (the position of its next step); start: int32 [batch], where
    the current document starts (the last reset seen), so later steps attend to the cached
    steps from there on only.
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array
    start: jax.Array


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention as a sequence mixer, with rotary positions.

    Called like every sequence layer, `layer(x, seq_lengths, initial_carry=..., return_carry=
    ...)`, on x [batch, time, d_model]; the carry is a `KVCache` of at most `max_len` steps,
    so `step` generates one token at a time, attending to the cache. With `initial_carry`
    (truncated BPTT, or a prompt then more text) the new steps also attend to the cached
    ones, at positions continuing from `initial_carry.index`.

    Positions: rotary embeddings (Su et al. 2021) on queries and keys, so attention is not
    order-blind, depends on relative positions, has no max-length parameter and works the
    same in the parallel and the cached form. head_dim = d_model / num_heads must be even.
    With `reverse=True` it reads each sequence backwards, from its last valid step (the
    backward half of an `nn.Bidirectional` pair; no carry).
    """

    d_model: int
    num_heads: int = 4
    max_len: int = 2048
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    def setup(self):
        check_self_attention(self.d_model, self.num_heads, self.max_len)
        shape = (self.num_heads, self.d_model // self.num_heads)
        dtypes = _dense_dtypes(self)
        self.query = nn.DenseGeneral(shape, **dtypes)
        self.key = nn.DenseGeneral(shape, **dtypes)
        self.value = nn.DenseGeneral(shape, **dtypes)
        self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), **dtypes)

    def _project(self, x, positions):
        return rotary_project(self.query, self.key, self.value, x, positions, self.rope_base)

    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x [batch, time, d_model] -> y [batch, time, d_model] (or (KVCache, y)).

        Outputs past each sequence's length are zero; the returned cache holds the valid
        steps only, with index = initial index + seq_lengths. `resets`, optional bool
        [batch, time], marks document starts: a query attends only to keys of its own
        document (`attention.document_mask`), cached steps included (KVCache.start).
        """
        cache, y = self_attention_forward(
            self._project,
            self.out,
            x,
            seq_lengths,
            initial_carry,
            reverse=reverse,
            d_model=self.d_model,
            num_heads=self.num_heads,
            max_len=self.max_len,
            return_carry=return_carry,
            resets=resets,
            dtype=compute_dtype(self),
        )
        return (cache, y) if return_carry else y

    def initial_carry(self, batch_size: int, dtype=None) -> KVCache:
        """An empty cache for `batch_size` sequences, in `dtype` (None: the compute dtype)."""
        dtype = compute_dtype(self) if dtype is None else dtype
        return empty_cache(batch_size, self.max_len, self.d_model, self.num_heads, dtype)

    def step(self, carry: KVCache, x):
        """One step: x [batch, d_model] -> (KVCache, y [batch, d_model]).

        Equal to the parallel form at position `carry.index`. Steps past max_len are not
        stored (the cache is full): keep prompt + generated length <= max_len.
        """
        return self_attention_step(
            self._project, self.out, carry, x, self.d_model, compute_dtype(self)
        )


# Causal self-attention given its projections; the Linen and the NNX `CausalSelfAttention`
# both run through these. `project(x, positions)` maps x [batch, time, d_model] and int
# positions [batch, time] to rotated queries and keys and the values [batch, time, heads, D];
# `out` maps [batch, time, heads, D] to [batch, time, d_model].


def check_self_attention(d_model: int, num_heads: int, max_len: int) -> None:
    d = _checks.positive_int("d_model", d_model)
    heads = _checks.positive_int("num_heads", num_heads)
    _checks.positive_int("max_len", max_len)
    if d % heads or (d // heads) % 2:
        raise ValueError(
            f"num_heads: d_model / num_heads must be an even integer (rotary positions "
            f"rotate feature pairs), got d_model={d}, num_heads={heads}"
        )


def rotary_project(query, key, value, x, positions, rope_base: float):
    """Queries and keys (`query(x)`, `key(x)`, [batch, time, heads, D]) rotated to their
    positions [batch, time], and the values `value(x)`."""
    rotate = lambda t: att.rotary_embedding(t, positions, base=rope_base)  # noqa: E731
    return rotate(query(x)), rotate(key(x)), value(x)


def empty_cache(batch_size: int, max_len: int, d_model: int, num_heads: int, dtype=jnp.float32):
    """An empty `KVCache` for `batch_size` sequences of at most `max_len` steps."""
    shape = (batch_size, max_len, num_heads, d_model // num_heads)
    zeros = jnp.zeros(shape, dtype)
    none = jnp.zeros((batch_size,), jnp.int32)
    return KVCache(zeros, zeros, none, none)


def self_attention_forward(
    project,
    out,
    x,
    seq_lengths,
    cache,
    *,
    reverse,
    d_model,
    num_heads,
    max_len,
    return_carry,
    resets=None,
    dtype=None,
):
    """x [batch, time, d_model] -> (KVCache or None where not `return_carry`, y [batch,
    time, d_model]); `cache`, a KVCache or None, holds earlier steps the new ones also see
    (those of their own document); `resets`, bool [batch, time] or None, marks where
    documents start: a query attends only to keys of its own document; x is cast to `dtype`
    (the compute dtype; None: as it is).

    `reverse`: each query attends to its own and the later valid steps, at positions counted
    from its sequence's last valid step: the forward layer over each sequence reversed within
    its length, as the recurrent layers' `reverse` (one half of a `Bidirectional` pair). It
    returns no carry (None) and takes neither `cache` nor `resets`."""
    x = _checks.sequence("x", x)
    x = x if dtype is None else x.astype(dtype)
    _checks.feature_size("x", x.shape[-1], d_model, "features (d_model)")
    batch, time = x.shape[:2]
    seq_lengths = _checks.seq_lengths(seq_lengths, batch, time)
    if cache is None and time > max_len:
        raise ValueError(f"x: expected at most max_len={max_len} steps, got {time}")
    if reverse:
        if cache is not None or resets is not None:
            raise ValueError(
                "reverse: self-attention reads backwards without initial_carry or resets"
            )
        return None, _reverse_self_attention(project, out, x, seq_lengths)
    resets = _checks.resets(resets, (batch, time))
    if cache is not None:
        _check_cache(cache, batch, time, d_model, num_heads, max_len)
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.index
    q, k, v = project(x, start[:, None] + jnp.arange(time))
    # Causality alone keeps valid queries off padded keys (they come later); padded
    # queries' outputs are zeroed below.
    mask, keys, values = att.causal_mask(time), k, v
    if resets is not None:
        mask = att.document_mask(resets)
    if cache is not None:  # the new steps also see the cached steps of their document
        slots = jnp.arange(max_len)[None, :]
        cached = (slots < cache.index[:, None]) & (slots >= cache.start[:, None])
        cached = jnp.broadcast_to(cached[:, None, None, :], (batch, 1, time, max_len))
        if resets is not None:  # ... until a new document starts
            fresh = jnp.cumsum(resets, axis=1) == 0  # [batch, time]
            cached = cached & fresh[:, None, :, None]
        mask = jnp.concatenate([cached, jnp.broadcast_to(mask, (batch, 1, time, time))], -1)
        keys = jnp.concatenate([cache.key, k], axis=1)
        values = jnp.concatenate([cache.value, v], axis=1)
    o, _ = att.dot_product_attention(q, keys, values, mask=mask)
    y = out(o)
    if seq_lengths is not None:
        y = _zero_padded_queries(y, att.query_padding_mask(seq_lengths, time))
    if not return_carry:
        return None, y
    if cache is None:
        cache = empty_cache(batch, max_len, d_model, num_heads, x.dtype)
    lengths = jnp.full((batch,), time, jnp.int32) if seq_lengths is None else seq_lengths
    return _write(cache, k, v, lengths, resets), y


def _reverse_self_attention(project, out, x, seq_lengths):
    """x [batch, time, d_model] (checked and cast), seq_lengths int [batch] or None -> y."""
    batch, time = x.shape[:2]
    lengths = jnp.full((batch,), time, jnp.int32) if seq_lengths is None else seq_lengths
    q, k, v = project(x, lengths[:, None] - 1 - jnp.arange(time))
    mask = att.causal_mask(time).T & att.padding_mask(lengths, time)  # later, valid keys
    o, _ = att.dot_product_attention(q, k, v, mask=mask)
    return _zero_padded_queries(out(o), att.query_padding_mask(lengths, time))


def _check_cache(cache, batch, time, d_model, num_heads, max_len):
    if not isinstance(cache, KVCache):
        raise TypeError(f"initial_carry: expected a KVCache, got {type(cache).__name__}")
    want = (batch, max_len, num_heads, d_model // num_heads)
    if cache.key.shape != want or cache.value.shape != want:
        raise ValueError(
            f"initial_carry: expected key/value caches of shape {want}, got "
            f"{cache.key.shape} and {cache.value.shape}"
        )
    if _checks.is_concrete(cache.index) and int(jnp.max(cache.index)) + time > max_len:
        raise ValueError(
            f"initial_carry: {int(jnp.max(cache.index))} cached + {time} new steps exceed "
            f"max_len={max_len}"
        )


def self_attention_step(project, out, carry: KVCache, x, d_model: int, dtype=None):
    """One step at position `carry.index`: x [batch, d_model] (cast to `dtype` unless None)
    -> (KVCache, y [batch, d_model])."""
    _checks.rank("x", x, 2, "[batch, d_model]")
    _checks.feature_size("x", x.shape[-1], d_model, "features (d_model)")
    x = jnp.asarray(x) if dtype is None else jnp.asarray(x).astype(dtype)
    q, k, v = project(x[:, None], carry.index[:, None])
    carry = _write(carry, k, v, jnp.ones_like(carry.index))
    slots = jnp.arange(carry.key.shape[1])[None, :]
    mask = (slots < carry.index[:, None]) & (slots >= carry.start[:, None])  # this step too
    o, _ = att.dot_product_attention(q, carry.key, carry.value, mask=mask[:, None, None, :])
    return carry, out(o)[:, 0]


def _write(cache: KVCache, k, v, lengths, resets=None) -> KVCache:
    """Stores the first lengths[b] steps of k, v [batch, time, heads, D] after cache.index;
    the document start moves to the last of those steps that `resets` [batch, time] marks."""
    batch, time = k.shape[:2]
    t = jnp.arange(time)[None, :]
    start = cache.start
    if resets is not None:
        marked = resets & (t < lengths[:, None])
        last = jnp.max(jnp.where(marked, t, -1), axis=1)  # -1: no reset in the valid steps
        start = jnp.where(last >= 0, cache.index + last, start)
    slot = jnp.where(t < lengths[:, None], cache.index[:, None] + t, cache.key.shape[1])
    rows = jnp.arange(batch)[:, None]
    key = cache.key.at[rows, slot].set(k.astype(cache.key.dtype), mode="drop")
    value = cache.value.at[rows, slot].set(v.astype(cache.value.dtype), mode="drop")
    return KVCache(key, value, cache.index + lengths, start)
