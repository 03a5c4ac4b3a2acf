"""Losses and the jit-compiled train and eval steps, with full or truncated BPTT.

Losses are carried as sums with a count (`loss_sum / count`), so that truncated BPTT can add
per-segment gradients of `segment_loss_sum / total_count` and get exactly the full-sequence
gradient when one segment covers the sequence.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lru_jax.tasks.base import TaskSpec
from lru_jax.training.optim import group_norms

LN2 = math.log(2.0)


def loss_sums(spec: TaskSpec, outputs, batch) -> dict[str, jax.Array]:
    """Summed loss, example/step count and summed correct predictions for one batch.

    outputs: [batch, num_outputs] (classification, regression) or [batch, time, vocab].
    """
    targets = batch["targets"]
    if spec.kind == "regression":
        per_example = jnp.mean((outputs - targets) ** 2, axis=-1)
        return {"loss_sum": jnp.sum(per_example), "count": jnp.asarray(per_example.size, "f4")}
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
    correct = (jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32)
    if spec.kind == "classification":
        return {
            "loss_sum": jnp.sum(ce),
            "count": jnp.asarray(ce.size, "f4"),
            "correct": correct.sum(),
        }
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(ce * mask),
        "count": jnp.sum(mask),
        "correct": jnp.sum(correct * mask),
    }
    if spec.kind == "seq2seq":
        # Every target step right under teacher forcing <=> greedy decoding returns the target.
        wrong = jnp.sum((1.0 - correct) * mask, axis=1)
        sums["sequences_correct"] = jnp.sum(wrong == 0).astype(jnp.float32)
        sums["sequences"] = jnp.asarray(wrong.size, jnp.float32)
    return sums


def summarise(spec: TaskSpec, sums) -> dict[str, jax.Array]:
    """Per-batch (or accumulated) sums -> the metrics we report."""
    count = jnp.maximum(sums["count"], 1.0)
    loss = sums["loss_sum"] / count
    metrics = {"loss": loss}
    if spec.kind == "regression":
        metrics["mse"] = loss
    else:
        metrics["accuracy"] = sums["correct"] / count
    if spec.is_language_model:
        metrics["bits_per_char"] = loss / LN2
    if spec.kind == "seq2seq":
        metrics["sequence_accuracy"] = sums["sequences_correct"] / jnp.maximum(sums["sequences"], 1)
    return metrics


def model_inputs(batch) -> tuple:
    """The model's positional inputs: (inputs, lengths), plus decoder_inputs for seq2seq."""
    if "decoder_inputs" in batch:
        return batch["inputs"], batch.get("lengths"), batch["decoder_inputs"]
    return batch["inputs"], batch.get("lengths")


def _apply(model, params, batch_stats, inputs, lengths, carry, key, train, *extra):
    """Runs the model on (inputs, lengths, *extra); returns (carry, outputs, new batch_stats)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    kwargs = dict(initial_carry=carry, return_carry=True, deterministic=not train)
    if train and batch_stats:
        (carry, out), updates = model.apply(
            variables,
            inputs,
            lengths,
            *extra,
            rngs={"dropout": key},
            mutable=["batch_stats"],
            **kwargs,
        )
        return carry, out, updates["batch_stats"]
    carry, out = model.apply(variables, inputs, lengths, *extra, rngs={"dropout": key}, **kwargs)
    return carry, out, batch_stats


def _full_bptt(model, spec, state, batch, key):
    def loss_fn(params):
        inputs, lengths, *extra = model_inputs(batch)
        _, out, batch_stats = _apply(
            model, params, state.batch_stats, inputs, lengths, None, key, True, *extra
        )
        sums = loss_sums(spec, out, batch)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), (sums, batch_stats)

    (_, (sums, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, sums, batch_stats


def _segments(x, k: int, n: int):
    """[batch, time, ...] -> [n, batch, k, ...], zero-padded at the end of time."""
    pad = n * k - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], n, k) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _truncated_bptt(model, spec, state, batch, key, k: int):
    """Cuts time into segments of k steps; scans over them carrying the (stopped) state.

    Each segment's gradient flows back only to its own start; gradients are summed. Memory
    holds one segment's activations at a time.
    """
    inputs = batch["inputs"]
    batch_size, time = inputs.shape[:2]
    n = -(-time // k)
    seg = {name: _segments(batch[name], k, n) for name in ("inputs", "targets", "mask")}
    lengths = batch.get("lengths")
    if lengths is not None:
        starts = jnp.arange(n)[:, None] * k
        seg["lengths"] = jnp.clip(lengths[None, :] - starts, 0, k).astype(jnp.int32)
    total = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    carry0 = model.apply({"params": state.params}, batch_size, method="initial_carry")

    def one_segment(acc, xs):
        carry, grads, sums, batch_stats = acc
        index, piece = xs

        def loss_fn(params):
            new_carry, out, new_stats = _apply(
                model,
                params,
                batch_stats,
                piece["inputs"],
                piece.get("lengths"),
                carry,
                jax.random.fold_in(key, index),
                True,
            )
            piece_sums = loss_sums(spec, out, piece)
            return piece_sums["loss_sum"] / total, (new_carry, piece_sums, new_stats)

        (_, (carry, piece_sums, batch_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grads = jax.tree.map(jnp.add, grads, g)
        sums = jax.tree.map(jnp.add, sums, piece_sums)
        return (jax.lax.stop_gradient(carry), grads, sums, batch_stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sums0 = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    sums0 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), sums0)
    acc = (carry0, zeros, sums0, state.batch_stats)
    (_, grads, sums, batch_stats), _ = jax.lax.scan(one_segment, acc, (jnp.arange(n), seg))
    return grads, sums, batch_stats


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_train_step(
    model,
    tx,
    spec: TaskSpec,
    *,
    seed: int,
    tbptt_length: int = 0,
    in_shardings=None,
    out_shardings=None,
):
    """A compiled `(state, batch) -> (state, metrics)`.

    Dropout keys are `fold_in(key(seed), step)`: a resumed run draws the same masks.
    `tbptt_length` > 0 switches to truncated BPTT with segments of that many steps.
    `in_shardings` / `out_shardings`: optional `jax.jit` shardings of (state, batch) and
    (state, metrics) (see lru_jax/training/sharding.py); default: follow the arguments.
    """
    dropout_root = jax.random.key(seed)

    def train_step(state, batch):
        key = jax.random.fold_in(dropout_root, state.step)
        if tbptt_length:
            grads, sums, batch_stats = _truncated_bptt(model, spec, state, batch, key, tbptt_length)
        else:
            grads, sums, batch_stats = _full_bptt(model, spec, state, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = summarise(spec, sums)
        metrics["grad_norm"] = global_norm(grads)
        metrics.update(group_norms(grads))  # grad_norm/recurrent, /no_decay, /default
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
        )
        return new_state, metrics

    shardings = {"in_shardings": in_shardings, "out_shardings": out_shardings}
    shardings = {k: v for k, v in shardings.items() if v is not None}
    return jax.jit(train_step, donate_argnums=0, **shardings)


def make_eval_step(model, spec: TaskSpec):
    """A compiled `(state, batch) -> sums` (add them up over batches, then `summarise`)."""

    def eval_step(state, batch):
        out = model.apply(state.variables(), *model_inputs(batch))
        return loss_sums(spec, out, batch)

    return jax.jit(eval_step)
