"""Losses and the jit-compiled train and eval steps, with full or truncated BPTT.

The objective is the task's loss plus whatever the model's layers add (`nn.add_loss`, e.g.
REINFORCE's surrogate for hard attention); the model's state collections (`TrainState.
model_state`: BatchNorm's averages, a REINFORCE baseline) go into every training apply mutable
and come back updated. The step knows neither layer: only the collections.

Losses are carried as sums with a count (`loss_sum / count`), so that truncated BPTT can add
per-segment gradients of `segment_loss_sum / total_count` and get exactly the full-sequence
gradient when one segment covers the sequence.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from lru_jax import nn as lnn
from lru_jax.tasks.base import TaskSpec
from lru_jax.training.optim import group_norms

LN2 = math.log(2.0)


def loss_sums(spec: TaskSpec, outputs, batch) -> dict[str, jax.Array]:
    """Summed loss, example/step count and summed correct predictions for one batch.

    outputs: [batch, num_outputs] (classification, regression) or [batch, time, vocab], in
    any floating dtype (a bfloat16 model's): the loss is computed in at least float32.
    """
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
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


def model_keywords(batch) -> dict:
    """The model's keyword inputs from a batch, in training and evaluation: `resets` (bool
    [batch, time], the document starts of a packed text batch) where the batch has them."""
    return {"resets": batch["resets"]} if "resets" in batch else {}


def training_feedback(batch) -> dict:
    """Keyword arguments the model gets in training only: a seq2seq batch's targets and mask,
    for layers that learn from a reward (REINFORCE'd hard attention in `EncoderDecoder`)."""
    if "decoder_inputs" in batch:
        return {"targets": batch["targets"], "target_mask": batch["mask"]}
    return {}


class Gradients(NamedTuple):
    """What one batch's backward pass gives the train step.

    grads: of the objective (the task's mean loss plus the layers' `nn.LOSSES` terms).
    sums: the task's `loss_sums`.
    model_state: the model's state collections as the layers left them (`TrainState`).
    losses: {name: value} of the layers' loss terms, e.g. {"reinforce": ...}.
    """

    grads: Any
    sums: dict
    model_state: dict
    losses: dict


def _apply(model, params, model_state, inputs, lengths, carry, key, *extra, feedback=None):
    """Runs the model in training on (inputs, lengths, *extra) and the keywords `feedback`,
    its state collections and the layers' loss terms mutable. Returns (carry, outputs, new
    model_state, {name: loss term})."""
    variables = {"params": params, **model_state}
    (carry, out), updates = model.apply(
        variables,
        inputs,
        lengths,
        *extra,
        initial_carry=carry,
        return_carry=True,
        deterministic=False,
        rngs={"dropout": key},
        mutable=[*model_state, lnn.LOSSES],
        **(feedback or {}),
    )
    terms = flax.traverse_util.flatten_dict(updates.get(lnn.LOSSES, {}), sep="/")
    losses = {name: sum(values) for name, values in terms.items()}  # sow keeps a tuple
    return carry, out, {name: updates[name] for name in model_state}, losses


def gradients(model, spec: TaskSpec, state, batch, key) -> Gradients:
    """The gradient of the training objective on `batch` (full BPTT), the sampling and dropout
    drawn from `key`."""

    def objective(params):
        inputs, lengths, *extra = model_inputs(batch)
        _, out, model_state, losses = _apply(
            model,
            params,
            state.model_state,
            inputs,
            lengths,
            None,
            key,
            *extra,
            feedback={**training_feedback(batch), **model_keywords(batch)},
        )
        sums = loss_sums(spec, out, batch)
        loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0) + sum(losses.values())
        return loss, (sums, model_state, losses)

    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return Gradients(grads, *aux)


def _segments(x, k: int, n: int):
    """[batch, time, ...] -> [n, batch, k, ...], zero-padded at the end of time."""
    pad = n * k - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], n, k) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _truncated_bptt(model, spec, state, batch, key, k: int) -> Gradients:
    """Cuts time into segments of k steps; scans over them carrying the (stopped) state.

    Each segment's gradient flows back only to its own start; gradients are summed. Memory
    holds one segment's activations at a time. The layers' loss terms count as their mean over
    the segments; the model's state passes from segment to segment.
    """
    inputs = batch["inputs"]
    batch_size, time = inputs.shape[:2]
    n = -(-time // k)
    names = ("inputs", "targets", "mask", "resets")
    seg = {name: _segments(batch[name], k, n) for name in names if name in batch}
    lengths = batch.get("lengths")
    if lengths is not None:
        starts = jnp.arange(n)[:, None] * k
        seg["lengths"] = jnp.clip(lengths[None, :] - starts, 0, k).astype(jnp.int32)
    total = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    carry0 = model.apply({"params": state.params}, batch_size, method="initial_carry")

    def one_segment(acc, xs):
        carry, grads, sums, model_state = acc
        index, piece = xs

        def objective(params):
            new_carry, out, new_state, losses = _apply(
                model,
                params,
                model_state,
                piece["inputs"],
                piece.get("lengths"),
                carry,
                jax.random.fold_in(key, index),
                feedback=model_keywords(piece),
            )
            piece_sums = loss_sums(spec, out, piece)
            loss = piece_sums["loss_sum"] / total + sum(losses.values()) / n
            return loss, (new_carry, piece_sums, new_state, losses)

        (_, (carry, piece_sums, model_state, losses)), g = jax.value_and_grad(
            objective, has_aux=True
        )(state.params)
        grads = jax.tree.map(jnp.add, grads, g)
        sums = jax.tree.map(jnp.add, sums, piece_sums)
        return (jax.lax.stop_gradient(carry), grads, sums, model_state), losses

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sums0 = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    sums0 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), sums0)
    acc = (carry0, zeros, sums0, state.model_state)
    (_, grads, sums, model_state), losses = jax.lax.scan(one_segment, acc, (jnp.arange(n), seg))
    losses = {name: jnp.mean(values) for name, values in losses.items()}
    return Gradients(grads, sums, model_state, losses)


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
            result = _truncated_bptt(model, spec, state, batch, key, tbptt_length)
        else:
            result = gradients(model, spec, state, batch, key)
        grads = result.grads
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = summarise(spec, result.sums)
        metrics.update({f"losses/{name}": value for name, value in result.losses.items()})
        metrics["grad_norm"] = global_norm(grads)
        metrics.update(group_norms(grads))  # grad_norm/recurrent, /no_decay, /default
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=result.model_state,
        )
        return new_state, metrics

    shardings = {"in_shardings": in_shardings, "out_shardings": out_shardings}
    shardings = {k: v for k, v in shardings.items() if v is not None}
    return jax.jit(train_step, donate_argnums=0, **shardings)


def make_statistics_step(model, seed: int = 0):
    """A compiled `(state, batch) -> state` that runs the model forward in training mode on
    `batch` and keeps the state collections (BatchNorm's running averages) it leaves, the
    parameters untouched: `recalibrated` re-estimates BatchNorm's statistics with it for
    parameters they were not gathered under (a parameter average)."""
    root = jax.random.key(seed)

    def statistics_step(state, batch):
        inputs, lengths, *extra = model_inputs(batch)
        key = jax.random.fold_in(root, state.step)
        _, _, model_state, _ = _apply(
            model, state.params, state.model_state, inputs, lengths, None, key, *extra,
            feedback={**training_feedback(batch), **model_keywords(batch)},
        )  # fmt: skip
        return state.replace(model_state=model_state)

    return jax.jit(statistics_step)


def recalibrated(statistics_step, state, batches):
    """`state` with BatchNorm's averages replaced by the mean of `batches`' own statistics
    (an iterable of batches, each weighted equally, where the running average would weigh the
    last few most). Each batch's statistics come from a `statistics_step` that starts from
    zero averages, which leaves (1 - momentum) times them."""
    stats = state.model_state[lnn.BATCH_STATS]
    start = state.replace(
        model_state={**state.model_state, lnn.BATCH_STATS: jax.tree.map(jnp.zeros_like, stats)}
    )
    total, count = None, 0
    for batch in batches:
        moved = statistics_step(start, batch).model_state[lnn.BATCH_STATS]
        total = moved if total is None else jax.tree.map(jnp.add, total, moved)
        count += 1
    if total is None:
        return state
    scale = 1.0 / (count * (1.0 - lnn.BATCHNORM_MOMENTUM))
    mean = jax.tree.map(lambda t: t * scale, total)
    return state.replace(model_state={**state.model_state, lnn.BATCH_STATS: mean})


def make_eval_step(model, spec: TaskSpec):
    """A compiled `(state, batch) -> sums` (add them up over batches, then `summarise`)."""

    def eval_step(state, batch):
        out = model.apply(state.variables(), *model_inputs(batch), **model_keywords(batch))
        return loss_sums(spec, out, batch)

    return jax.jit(eval_step)
