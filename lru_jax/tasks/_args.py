"""Argument checks for task constructors: each error names the argument, what was expected and
what came."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """Returns `value` as an int after checking it is an integer in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
    return int(value)


def check_choice(name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_batch_args(index, batch_size) -> tuple[int, int]:
    """Checks the common arguments of `batch`: index >= 0 and batch_size >= 1."""
    return check_int("index", index, 0), check_int("batch_size", batch_size, 1)


def sequential_indices(n: int, index: int, batch_size: int) -> np.ndarray:
    """Example indices [batch_size] of batch `index` when a finite split of n examples is read
    in order, wrapping around (evaluation batches)."""
    return (index * batch_size + np.arange(batch_size)) % n
