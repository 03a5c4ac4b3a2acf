"""Input checks shared by every public entry point.

They run on shapes and dtypes (static under jit) and, when a value is concrete, on values,
so that a user's mistake is named before JAX traces anything. Each error names the argument,
what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _shape_dtype(name: str, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as err:  # e.g. a ragged list
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from err
        if x.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got {type(x).__name__}")
    return tuple(x.shape), np.dtype(x.dtype)


def floating(name: str, x, *, allow_complex: bool = True):
    """Checks that `x` is a real floating (or complex) array; returns its shape."""
    shape, dtype = _shape_dtype(name, x)
    ok = jnp.issubdtype(dtype, jnp.floating) or (
        allow_complex and jnp.issubdtype(dtype, jnp.complexfloating)
    )
    if not ok:
        kinds = "a floating or complex" if allow_complex else "a floating-point"
        raise TypeError(
            f"{name}: expected {kinds} dtype, got {dtype}; cast it first, e.g. "
            f"{name}.astype(jnp.float32)"
        )
    return shape


def rank(name: str, x, expected: int | Sequence[int], layout: str = ""):
    """Checks `x.ndim`; `layout` (e.g. "[batch, time, features]") goes into the message."""
    shape, _ = _shape_dtype(name, x)
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if len(shape) not in allowed:
        want = " or ".join(str(r) for r in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected rank {want}{hint}, got shape {shape}")
    return shape


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def one_of(name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def feature_size(name: str, got: int, expected: int, what: str = "features"):
    if got != expected:
        raise ValueError(
            f"{name}: the parameters expect {expected} {what} on the last axis, got {got}"
        )


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def seq_lengths(seq_lengths, batch: int, time: int):
    """Checks `seq_lengths: int [batch]` with values in [0, time]; returns it as an int32 array.

    Values are checked whenever they are concrete (always outside jit).
    """
    if seq_lengths is None:
        return None
    shape, dtype = _shape_dtype("seq_lengths", seq_lengths)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"seq_lengths: expected an integer dtype, got {dtype}")
    if shape != (batch,):
        raise ValueError(f"seq_lengths: expected shape ({batch},) [batch], got {shape}")
    if is_concrete(seq_lengths):
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > time):
            raise ValueError(
                f"seq_lengths: expected values in [0, {time}] (the time axis), "
                f"got min {values.min()} and max {values.max()}"
            )
    return jnp.asarray(seq_lengths, jnp.int32)


def broadcastable(names: Sequence[str], shapes: Sequence[tuple]) -> tuple:
    """Returns the broadcast shape of `shapes`, or raises naming the arguments."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"{' and '.join(names)} must broadcast together, got {listed}") from None
