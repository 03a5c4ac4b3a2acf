"""The copy-memory task (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016)."""

from __future__ import annotations

import math

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import TaskSpec, check_batch_args, check_split, split_rng


class CopyMemory:
    """Remember a short string of symbols over a long delay, then write it out.

    Tokens: 0 blank, 1..num_categories data symbols, num_categories + 1 the delimiter
    (vocabulary num_categories + 2). With S = num_symbols and T = delay, a sequence has
    T + 2S steps:

        inputs:  s_1 .. s_S | 0 x (T - 1) | delimiter | 0 x S
        targets: 0 x (T + S)                          | s_1 .. s_S

    e.g. delay 3, S 2: inputs [a, b, 0, 0, D, 0, 0], targets [0, 0, 0, 0, 0, a, b].
    The loss counts every step (mask all ones). The memoryless predictor (blank until the
    delimiter, then uniform over the categories) scores S log(num_categories) / (T + 2S) nats
    per step: the baseline. Batches are drawn fresh from `split_rng`; splits are infinite.
    """

    def __init__(
        self, delay: int = 100, num_symbols: int = 10, num_categories: int = 8, seed: int = 0
    ):
        self.delay = _checks.integer("delay", delay, 1)
        self.num_symbols = _checks.integer("num_symbols", num_symbols, 1)
        self.num_categories = _checks.integer("num_categories", num_categories, 2)
        self.seed = _checks.integer("seed", seed, 0)
        length = self.delay + 2 * self.num_symbols
        self.spec = TaskSpec(
            name="copy",
            kind="per_step",
            seq_len=length,
            num_outputs=self.num_categories + 2,
            vocab_size=self.num_categories + 2,
            baseline=self.num_symbols * math.log(self.num_categories) / length,
            baseline_metric="loss",
        )

    @property
    def delimiter(self) -> int:
        return self.num_categories + 1

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs, targets int32 [batch_size, delay + 2 num_symbols] and mask float32
        of the same shape (all ones)."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        s, length = self.num_symbols, self.spec.seq_len
        symbols = rng.integers(1, self.num_categories + 1, (batch_size, s), dtype=np.int32)
        inputs = np.zeros((batch_size, length), np.int32)
        inputs[:, :s] = symbols
        inputs[:, s + self.delay - 1] = self.delimiter
        targets = np.zeros((batch_size, length), np.int32)
        targets[:, -s:] = symbols
        return {
            "inputs": inputs,
            "targets": targets,
            "mask": np.ones((batch_size, length), np.float32),
        }
