"""The argument checks of the whole package: layers, models, tasks and the training config.

They run on shapes and dtypes (static under jit) and, when a value is concrete, on values,
so that a user's mistake is named before JAX traces anything. Every message has one form,
"NAME: expected X, got Y"; a config key passes its qualified name ("config.model.d_model").
A bad type raises TypeError and a bad value ValueError, except where `error` says otherwise
(the config reports every mistake as a ValueError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np


def message(name: str, expected: str, got: str) -> str:
    return f"{name}: expected {expected}, got {got}"


def fail(name: str, expected: str, value, error: type[Exception] = ValueError) -> NoReturn:
    """Raises `error` naming the argument, what was expected and `value` (its repr)."""
    raise error(message(name, expected, repr(value)))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _numeric(name: str, x) -> np.ndarray:
    """A list, tuple or scalar as a numpy array, refused unless it is numbers (or bools)."""
    try:
        converted = np.asarray(x)
    except Exception as err:  # e.g. a ragged list
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from err
    if converted.dtype.kind not in "biufc":  # objects, strings, ragged nests
        raise TypeError(f"{name}: expected a numeric array, got {type(x).__name__}")
    return converted


def array(name: str, x):
    """`x` as an array: arrays (numpy, JAX, tracers) as they are; nested lists, tuples and
    scalars of numbers converted with `jnp.asarray`; anything else a TypeError naming `name`."""
    return x if _is_array(x) else jnp.asarray(_numeric(name, x))


def _shape_dtype(name: str, x):
    if not _is_array(x):
        x = _numeric(name, x)
    return tuple(x.shape), np.dtype(x.dtype)


def non_empty_axis(name: str, shape: tuple, axis: int, what: str, layout: str = "") -> None:
    """A ValueError unless axis `axis` of `shape` has at least one `what` (e.g. "feature");
    `layout` (e.g. "[batch, time, features]") goes into the message."""
    if shape[axis] == 0:
        where = f" (axis {axis} of {layout})" if layout else f" (axis {axis})"
        raise ValueError(message(name, f"at least one {what}{where}", f"shape {shape}"))


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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value, minimum=None, maximum=None, *, type_error=TypeError) -> int:
    """Returns `value` as an int after checking it is one in [minimum, maximum]."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = {0: "a non-negative int", 1: "a positive int"}.get(
            minimum, f"an int >= {minimum}"
        )
    else:
        expected = "an int"
    if not _is_int(value):
        fail(name, expected, value, type_error)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(name, expected, value)
    return int(value)


def positive_int(name: str, value, *, type_error=TypeError) -> int:
    return integer(name, value, 1, type_error=type_error)


def non_negative_int(name: str, value, *, type_error=TypeError) -> int:
    return integer(name, value, 0, type_error=type_error)


def features(name: str, x, expected: int):
    """A real float input `x` (converted by `array`) whose last axis has the `expected` size
    the parameters take; returns it."""
    x = array(name, x)
    floating(name, x, allow_complex=False)
    feature_size(name, x.shape[-1], expected)
    return x


def sequence(name: str, x, layout: str = "[batch, time, features]"):
    """A batch-major float sequence `x` (converted by `array`) of rank 3 with at least one
    feature; returns it."""
    x = array(name, x)
    rank(name, x, 3, layout)
    floating(name, x, allow_complex=False)
    non_empty_axis(name, tuple(x.shape), 2, "feature", layout)
    return x


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def number(
    name: str,
    value,
    low=-math.inf,
    high=math.inf,
    *,
    closed_high=True,
    expected=None,
    type_error=TypeError,
):
    """Returns `value` after checking it is a real number in [low, high] (or [low, high))."""
    if expected is None and low == 0 and high == math.inf:
        expected = "a non-negative number"
    elif expected is None:
        expected = f"a number in [{low}, {high}{']' if closed_high else ')'}"
    if not _is_real(value):
        fail(name, expected, value, type_error)
    if not (low <= value and (value <= high if closed_high else value < high)):
        fail(name, expected, value)
    return value


def rate(name: str, value, *, type_error=TypeError):
    """A dropout rate: a number in [0, 1)."""
    expected = "a rate in [0, 1)"
    return number(name, value, 0, 1, closed_high=False, expected=expected, type_error=type_error)


def positive_number(name: str, value, *, type_error=TypeError):
    if not _is_real(value):
        fail(name, "a positive number", value, type_error)
    if not value > 0:
        fail(name, "a positive number", value)
    return value


def boolean(name: str, value, *, type_error=TypeError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(name, "a bool", value, type_error)
    return bool(value)


def one_of(name: str, value, choices: Sequence):
    if value not in choices:
        fail(name, f"one of {list(choices)}", value)
    return value


# the dtypes a module may compute in or store its parameters in (mixed precision)
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def float_dtype(name: str, value, *, type_error=TypeError):
    """A real floating dtype (a name like "bfloat16", a numpy/JAX dtype or scalar type) as a
    numpy dtype; anything else refused by name."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or value is None or dtype.name not in FLOAT_DTYPES:
        fail(name, f"a floating dtype, one of {list(FLOAT_DTYPES)}", value, type_error)
    return dtype


def feature_size(name: str, got: int, expected: int, what: str = "features"):
    if got != expected:
        raise ValueError(
            f"{name}: the parameters expect {expected} {what} on the last axis, got {got}"
        )


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def seq_lengths(seq_lengths, batch: int, time: int):
    """Checks `seq_lengths: int [batch]` with values in [0, time]; returns it as an int32 array.

    Values are checked whenever they are concrete (always outside jit). Under `jax.jit` they
    are not known, and the returned lengths are clamped to [0, time]: a length below 0 acts as
    0 and one above `time` as `time`.
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
    return jnp.clip(jnp.asarray(seq_lengths, jnp.int32), 0, time)


def time_major(name: str, x, lengths, features: str = "H"):
    """Checks a time-major sequence x [time, ..., F] and, with `lengths`, that x is
    [time, batch, F] and the lengths fit it (`seq_lengths`); returns them as int32 or None."""
    shape, _ = _shape_dtype(name, x)
    if len(shape) < 2:
        raise ValueError(f"{name}: expected rank >= 2 [time, ..., {features}], got shape {shape}")
    if lengths is None:
        return None
    rank(name, x, 3, f"[time, batch, {features}] when seq_lengths is given")
    return seq_lengths(lengths, shape[1], shape[0])


def broadcastable(names: Sequence[str], shapes: Sequence[tuple]) -> tuple:
    """Returns the broadcast shape of `shapes`, or raises naming the arguments."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"{' and '.join(names)} must broadcast together, got {listed}") from None


def resets(resets, shape: tuple, layout: str = "[batch, time]"):
    """Checks `resets`: None or a bool array of exactly `shape` (document starts, e.g.
    [batch, time]); returns it as an array (a nested list converted) or None."""
    if resets is None:
        return None
    got_shape, dtype = _shape_dtype("resets", resets)
    if dtype != np.bool_:
        raise TypeError(f"resets: expected a bool array, got dtype {dtype}")
    if got_shape != tuple(shape):
        raise ValueError(message("resets", f"shape {tuple(shape)} {layout}", f"{got_shape}"))
    return array("resets", resets)
