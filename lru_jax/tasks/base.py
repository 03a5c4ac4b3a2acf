"""What every task is: a description (`TaskSpec`) and a stateless batch function.

A task never keeps an iterator: `batch(split, index, batch_size)` returns the same numpy arrays
for the same arguments in any process. Training at step s asks for index s, so a resumed run
sees exactly the data an uninterrupted one would have seen.

Batches are dicts of numpy arrays, batch-major:
    "inputs":  int32 [batch, time] token ids, or float32 [batch, time, input_dim]
    "targets": int32 [batch] (classification), float32 [batch, output_dim] (regression),
               or int32 [batch, time] (per-step prediction, e.g. language modelling)
    "lengths": int32 [batch], optional: valid steps per sequence (padding after them)
    "mask":    float32 [batch, time], only for per-step targets: which steps count in the loss

Sequence-to-sequence tasks (kind "seq2seq", see `tasks.seq2seq`) add "decoder_inputs" and
give targets and mask [batch, target_len].
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import numpy as np

from lru_jax import _checks

SPLITS = ("train", "valid", "test")
KINDS = ("classification", "regression", "per_step", "seq2seq")


class SpecialTokens(NamedTuple):
    """The token ids a seq2seq decoder needs: padding, beginning and end of sequence."""

    pad: int
    bos: int
    eos: int


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task is, for building models, losses and reports.

    Attributes:
      name: the task's registry name.
      kind: "classification" (one class per sequence), "regression" (one vector per
        sequence), "per_step" (a class at every step, e.g. next-token prediction) or
        "seq2seq" (an output sequence decoded from the input; see `tasks.seq2seq`).
      seq_len: the (maximum) number of time steps of "inputs".
      target_len: seq2seq only: the number of decoder steps (targets' time axis).
      num_outputs: classes, regression dimensions, or the per-step vocabulary size.
      vocab_size: token vocabulary of the inputs, or None for float inputs.
      input_dim: features per step for float inputs, or None for token inputs.
      baseline: the loss (or metric, see baseline_metric) of the trivial, memoryless predictor.
      baseline_metric: the metric `baseline` is measured in, e.g. "mse", "loss", "accuracy".
      is_language_model: per-step next-token prediction over text, with generation.
      special_tokens: seq2seq only: the PAD, BOS and EOS ids (what decoding starts and stops
        with, e.g. `models.greedy_decode(..., **spec.special_tokens._asdict())`).
    """

    name: str
    kind: str
    seq_len: int
    num_outputs: int
    vocab_size: int | None = None
    input_dim: int | None = None
    baseline: float | None = None
    baseline_metric: str = "loss"
    is_language_model: bool = False
    target_len: int | None = None
    special_tokens: SpecialTokens | None = None

    def __post_init__(self):
        _checks.one_of("kind", self.kind, KINDS)
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError("exactly one of vocab_size (token inputs) and input_dim is set")
        if (self.kind == "seq2seq") != (self.target_len is not None):
            raise ValueError("target_len: expected a value for seq2seq tasks only")
        if (self.kind == "seq2seq") != (self.special_tokens is not None):
            raise ValueError("special_tokens: expected SpecialTokens for seq2seq tasks only")


class Task(Protocol):
    spec: TaskSpec

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """The `index`-th batch of `split` ("train", "valid", "test"); deterministic."""

    def num_examples(self, split: str) -> int | None:
        """Examples in a finite split, or None for generated-on-demand splits."""


def check_split(split: str) -> None:
    _checks.one_of("split", split, SPLITS)


def check_batch_args(index, batch_size) -> tuple[int, int]:
    """Checks the common arguments of `batch`: index >= 0 and batch_size >= 1."""
    return _checks.non_negative_int("index", index), _checks.positive_int("batch_size", batch_size)


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """A generator for batch `index` of `split`, independent across all three."""
    check_split(split)
    return np.random.default_rng([seed, SPLITS.index(split), index])


def epoch_batch_indices(n: int, seed: int, index: int, batch_size: int) -> np.ndarray:
    """Example indices of batch `index` when a finite split of n examples is shuffled anew
    every epoch (epoch e uses the permutation drawn from (seed, e)). Batches may straddle
    epochs; every example is seen once per epoch."""
    start = index * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, 1_000_003, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def sequential_indices(n: int, index: int, batch_size: int) -> np.ndarray:
    """Example indices [batch_size] of batch `index` when a finite split of n examples is read
    in order, wrapping around (evaluation batches)."""
    return (index * batch_size + np.arange(batch_size)) % n
