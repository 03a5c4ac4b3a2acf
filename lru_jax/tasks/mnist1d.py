"""MNIST-1D (Greydanus & Kobak 2020): ten classes of 40-step 1-D signals, generated locally."""

from __future__ import annotations

import functools
import random

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import (
    TaskSpec,
    check_batch_args,
    check_split,
    epoch_batch_indices,
    sequential_indices,
)

SEQ_LEN = 40  # the package's final_seq_length
VALID_FRACTION = 0.1  # of the package's train split


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, data_seed: int) -> tuple[np.ndarray, ...]:
    """The package's own generator (`make_dataset`, never its download path) with its own
    digit templates; returns x_train float64 [n_train, 40], y_train [n_train], x_test, y_test.

    make_dataset seeds the global `random` and `np.random` generators, so their states are
    saved and restored around it to leave the caller's global randomness untouched.
    """
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.shuffle_seq = num_samples, data_seed, False
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(args, template=get_templates())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for a in arrays:
        a.flags.writeable = False  # shared through the cache
    return arrays


class MNIST1D:
    """Classify a 40-step signal into one of ten digit classes.

    The examples come from the `mnist1d` package's generator with its default arguments
    except `num_samples` and the seed: `data_seed=42` is the package default, the data set of
    the paper; `seed` drives batch order and the shuffled permutation. The package already
    standardises the whole data set to mean 0 and standard deviation 1 (one scalar affine
    map), which we keep. Splits: the package's 80/20 train/test split, and the last 10% of its
    train part (already in random order) becomes "valid"; so 5000 samples give
    3600/400/1000, disjoint.

    `shuffled=True` applies one fixed permutation of the 40 time steps (drawn from `seed`) to
    every example, destroying spatial structure (the MNIST-1D paper's shuffled variant).

    Train batches reshuffle every epoch (`epoch_batch_indices`); valid and test batches read
    the split in order, wrapping around.
    """

    def __init__(
        self, num_samples: int = 5000, shuffled: bool = False, seed: int = 0, data_seed: int = 42
    ):
        self.num_samples = _checks.integer("num_samples", num_samples, 100)
        _checks.boolean("shuffled", shuffled)
        self.shuffled = bool(shuffled)
        self.seed = _checks.integer("seed", seed, 0)
        self.data_seed = _checks.integer("data_seed", data_seed, 0)
        x_train, y_train, x_test, y_test = _generate(self.num_samples, self.data_seed)
        num_valid = int(round(VALID_FRACTION * len(y_train)))
        self.permutation = (
            np.random.default_rng([self.seed, 40]).permutation(SEQ_LEN)
            if self.shuffled
            else np.arange(SEQ_LEN)
        )
        self._data = {
            "train": self._prepare(x_train[:-num_valid], y_train[:-num_valid]),
            "valid": self._prepare(x_train[-num_valid:], y_train[-num_valid:]),
            "test": self._prepare(x_test, y_test),
        }
        self.spec = TaskSpec(
            name="mnist1d",
            kind="classification",
            seq_len=SEQ_LEN,
            num_outputs=10,
            input_dim=1,
            baseline=0.1,
            baseline_metric="accuracy",
        )

    def _prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [n, 40] -> float32 [n, 40, 1] with the time steps permuted; y -> int32 [n]."""
        return x[:, self.permutation, None].astype(np.float32), y.astype(np.int32)

    def num_examples(self, split: str) -> int:
        check_split(split)
        return len(self._data[split][1])

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs float32 [batch_size, 40, 1] and targets int32 [batch_size]."""
        check_split(split)
        index, batch_size = check_batch_args(index, batch_size)
        x, y = self._data[split]
        if split == "train":
            rows = epoch_batch_indices(len(y), self.seed, index, batch_size)
        else:
            rows = sequential_indices(len(y), index, batch_size)
        return {"inputs": x[rows], "targets": y[rows]}
