"""The selective-copying task of the Mamba paper (Gu & Dao 2023, section 3.1)."""

from __future__ import annotations

import math

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import TaskSpec, check_batch_args, check_split, split_rng


class SelectiveCopy:
    """Copy the data tokens scattered among blanks, ignoring where they were.

    Tokens: 0 blank (noise), 1..num_categories data, num_categories + 1 the delimiter
    (vocabulary num_categories + 2). With K = num_tokens and N = seq_len, a sequence has
    N + 1 + K steps:

        inputs:  N steps, blank except K data tokens at distinct random positions
                 | delimiter | 0 x K
        targets: 0 x (N + 1) | the K data tokens in order of position
        mask:    0 x (N + 1) | 1 x K

    Unlike the copy task the spacing varies, so a time-invariant model cannot just count
    steps: it must select by content. The loss counts only the K answer steps; guessing
    uniformly among the categories scores log(num_categories) nats there: the baseline.
    Batches are drawn fresh from `split_rng`; splits are infinite.
    """

    def __init__(
        self, seq_len: int = 128, num_tokens: int = 8, num_categories: int = 8, seed: int = 0
    ):
        self.num_tokens = _checks.integer("num_tokens", num_tokens, 1)
        self.seq_len = _checks.integer("seq_len", seq_len, self.num_tokens)
        self.num_categories = _checks.integer("num_categories", num_categories, 2)
        self.seed = _checks.integer("seed", seed, 0)
        self.spec = TaskSpec(
            name="selective_copy",
            kind="per_step",
            seq_len=self.seq_len + 1 + self.num_tokens,
            num_outputs=self.num_categories + 2,
            vocab_size=self.num_categories + 2,
            baseline=math.log(self.num_categories),
            baseline_metric="loss",
        )

    @property
    def delimiter(self) -> int:
        return self.num_categories + 1

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs, targets int32 [batch_size, seq_len + 1 + num_tokens] and mask
        float32 of the same shape (1 at the answer steps)."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        n, k, length = self.seq_len, self.num_tokens, self.spec.seq_len
        # k distinct positions per row, kept in order so the answer is the tokens as read.
        positions = np.sort(rng.random((batch_size, n)).argsort(axis=1)[:, :k], axis=1)
        tokens = rng.integers(1, self.num_categories + 1, (batch_size, k), dtype=np.int32)
        inputs = np.zeros((batch_size, length), np.int32)
        np.put_along_axis(inputs, positions, tokens, axis=1)
        inputs[:, n] = self.delimiter
        targets = np.zeros((batch_size, length), np.int32)
        targets[:, -k:] = tokens
        mask = np.zeros((batch_size, length), np.float32)
        mask[:, -k:] = 1.0
        return {"inputs": inputs, "targets": targets, "mask": mask}
