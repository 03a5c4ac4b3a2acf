"""Data sets and synthetic tasks: each a class with a `spec` (`TaskSpec`) and a stateless
`batch(split, index, batch_size)` returning numpy arrays (see `base`).

`get_task(name, **kwargs)` builds one from the registry `TASKS`.
"""

from __future__ import annotations

import inspect

from lru_jax import _checks
from lru_jax.tasks.adding import AddingProblem
from lru_jax.tasks.associative_recall import AssociativeRecall
from lru_jax.tasks.base import SPLITS, Task, TaskSpec, epoch_batch_indices, split_rng
from lru_jax.tasks.cocktail_party import CocktailParty
from lru_jax.tasks.copy_memory import CopyMemory
from lru_jax.tasks.listops import ListOps
from lru_jax.tasks.mnist1d import MNIST1D
from lru_jax.tasks.selective_copy import SelectiveCopy
from lru_jax.tasks.seq2seq import Reverse, SequenceTransduction, Sort
from lru_jax.tasks.text import CharText

TASKS = {
    "adding": AddingProblem,
    "copy": CopyMemory,
    "selective_copy": SelectiveCopy,
    "associative_recall": AssociativeRecall,
    "mnist1d": MNIST1D,
    "listops": ListOps,
    "text": CharText,
    "reverse": Reverse,
    "sort": Sort,
    "cocktail_party": CocktailParty,
}


def get_task(name: str, **kwargs) -> Task:
    """Builds task `name` with its keyword arguments; unknown names or arguments raise naming
    what is known, bad values raise from the task's own checks."""
    _checks.one_of("name", name, sorted(TASKS))
    cls = TASKS[name]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"get_task({name!r}): unknown argument(s) {unknown}; {cls.__name__} takes "
            f"{list(params)}"
        )
    return cls(**kwargs)


__all__ = [
    "SPLITS",
    "TASKS",
    "AddingProblem",
    "AssociativeRecall",
    "CharText",
    "CocktailParty",
    "CopyMemory",
    "ListOps",
    "MNIST1D",
    "Reverse",
    "SelectiveCopy",
    "SequenceTransduction",
    "Sort",
    "Task",
    "TaskSpec",
    "epoch_batch_indices",
    "get_task",
    "split_rng",
]
