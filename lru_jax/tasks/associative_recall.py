"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology")."""

from __future__ import annotations

import math

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import TaskSpec, check_batch_args, check_split, split_rng


def _distinct(rng: np.random.Generator, batch: int, n: int, k: int) -> np.ndarray:
    """k distinct integers in [0, n) per row, in random order: int64 [batch, k]."""
    return rng.random((batch, n)).argsort(axis=1)[:, :k]


class AssociativeRecall:
    """Read key-value pairs, then answer queries for the values of some of the keys.

    Tokens: 0 filler, keys 1..num_keys, values num_keys + 1 .. num_keys + num_values
    (vocabulary 1 + num_keys + num_values; keys and values never share an id). With
    P = num_pairs and Q = num_queries a sequence of seq_len steps is laid out as

        steps 0 .. 2P - 1:      k_1 v_1 k_2 v_2 .. k_P v_P   (keys distinct, values random)
        steps 2P .. seq_len - 1: filler 0, except Q query steps at distinct random positions,
                                 each holding the key of a different pair (random order)

    At a query step holding k_i the target is v_i (its token id) and the mask is 1; the
    target is 0 and the mask 0 everywhere else. Zoology places the queries with power-law
    gaps; here they are uniform over the steps after the pairs. A model that cannot recall
    guesses uniformly among the values: log(num_values) nats, the baseline. Batches are drawn
    fresh from `split_rng`; splits are infinite.
    """

    def __init__(
        self,
        num_pairs: int = 8,
        num_queries: int = 8,
        seq_len: int = 64,
        num_keys: int = 32,
        num_values: int = 32,
        seed: int = 0,
    ):
        self.num_pairs = _checks.integer("num_pairs", num_pairs, 1)
        self.num_queries = _checks.integer("num_queries", num_queries, 1, self.num_pairs)
        self.seq_len = _checks.integer("seq_len", seq_len, 2 * self.num_pairs + self.num_queries)
        self.num_keys = _checks.integer("num_keys", num_keys, self.num_pairs)
        self.num_values = _checks.integer("num_values", num_values, 2)
        self.seed = _checks.integer("seed", seed, 0)
        vocab = 1 + self.num_keys + self.num_values
        self.spec = TaskSpec(
            name="associative_recall",
            kind="per_step",
            seq_len=self.seq_len,
            num_outputs=vocab,
            vocab_size=vocab,
            baseline=math.log(self.num_values),
            baseline_metric="loss",
        )

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs, targets int32 [batch_size, seq_len] and mask float32 [batch_size,
        seq_len] (1 at the query steps)."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        b, p, q = batch_size, self.num_pairs, self.num_queries
        keys = 1 + _distinct(rng, b, self.num_keys, p)
        values = 1 + self.num_keys + rng.integers(0, self.num_values, (b, p))
        asked = _distinct(rng, b, p, q)  # which pairs are queried, in query order
        steps = 2 * p + np.sort(_distinct(rng, b, self.seq_len - 2 * p, q), axis=1)

        inputs = np.zeros((b, self.seq_len), np.int32)
        inputs[:, 0 : 2 * p : 2] = keys
        inputs[:, 1 : 2 * p : 2] = values
        np.put_along_axis(inputs, steps, np.take_along_axis(keys, asked, axis=1), axis=1)
        targets = np.zeros((b, self.seq_len), np.int32)
        np.put_along_axis(targets, steps, np.take_along_axis(values, asked, axis=1), axis=1)
        mask = np.zeros((b, self.seq_len), np.float32)
        np.put_along_axis(mask, steps, 1.0, axis=1)
        return {"inputs": inputs, "targets": targets, "mask": mask}
