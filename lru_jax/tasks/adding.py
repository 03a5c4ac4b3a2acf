"""The adding problem (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016)."""

from __future__ import annotations

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import TaskSpec, check_batch_args, check_split, split_rng


class AddingProblem:
    """Sum the two marked numbers of a sequence of random numbers.

    Each step carries two features: channel 0 a value drawn from U(0, 1), channel 1 a marker
    that is 1 at exactly two steps, one uniformly in the first half [0, seq_len // 2) and one
    in the second half [seq_len // 2, seq_len), and 0 elsewhere. The target is the sum of the
    two marked values. Predicting the mean, 1, scores MSE = Var(u1 + u2) = 2/12 = 1/6: the
    baseline a model must beat to show it remembers anything.

    Every batch is drawn fresh from `split_rng(seed, split, index)`; splits are infinite.
    """

    def __init__(self, seq_len: int = 100, seed: int = 0):
        self.seq_len = _checks.integer("seq_len", seq_len, 2)
        self.seed = _checks.integer("seed", seed, 0)
        self.spec = TaskSpec(
            name="adding",
            kind="regression",
            seq_len=self.seq_len,
            num_outputs=1,
            input_dim=2,
            baseline=1.0 / 6.0,
            baseline_metric="mse",
        )

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs float32 [batch_size, seq_len, 2] and targets float32 [batch_size, 1]."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        half = self.seq_len // 2
        values = rng.random((batch_size, self.seq_len), dtype=np.float32)
        first = rng.integers(0, half, batch_size)
        second = rng.integers(half, self.seq_len, batch_size)
        rows = np.arange(batch_size)
        markers = np.zeros((batch_size, self.seq_len), np.float32)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        targets = values[rows, first] + values[rows, second]
        return {
            "inputs": np.stack([values, markers], axis=-1),
            "targets": targets[:, None].astype(np.float32),
        }
