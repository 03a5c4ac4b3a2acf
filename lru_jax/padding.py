"""Padding: sequences of different lengths in one time-major [time, batch, ...] array.

`seq_lengths` (int [batch]) gives each sequence's number of valid steps; the steps past it are
padding. Used by every layer that takes `seq_lengths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reverse_within_lengths(xs: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
    """Reverses each sequence of `xs: [time, batch, ...]` within its own length.

    Steps past a sequence's length stay where they are. The map is its own inverse.
    """
    if seq_lengths is None:
        return jnp.flip(xs, 0)
    time = xs.shape[0]
    t = jnp.arange(time)[:, None]
    index = jnp.where(t < seq_lengths[None, :], seq_lengths[None, :] - 1 - t, t)  # [time, batch]
    index = index.reshape(index.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, index, axis=0)


def step_mask(seq_lengths: jax.Array | None, time: int) -> jax.Array | None:
    """bool [time, batch]: whether step t is inside sequence b."""
    if seq_lengths is None:
        return None
    return jnp.arange(time)[:, None] < seq_lengths[None, :]


def last_valid(hs: jax.Array, seq_lengths: jax.Array, h0: jax.Array) -> jax.Array:
    """The state after each sequence's last valid step: hs [time, batch, ...] -> [batch, ...].

    `h0` [batch, ...] is returned for sequences of length 0.
    """
    index = jnp.maximum(seq_lengths - 1, 0).reshape((1, -1) + (1,) * (hs.ndim - 2))
    last = jnp.take_along_axis(hs, index, axis=0)[0]
    empty = (seq_lengths == 0).reshape((-1,) + (1,) * (hs.ndim - 2))
    return jnp.where(empty, h0, last)


def run_within_lengths(run, u, seq_lengths, h_empty, *, reverse=False, resets=None, final=False):
    """A recurrent layer's whole-sequence forward with `seq_lengths`, `reverse` and `resets`.

    `run(u, resets, reverse) -> (hs, y)` runs the layer's recurrence over u [time, batch, ...]
    from its initial state, returning every state hs [time, batch, ...state] and output
    y [time, batch, features]. With `seq_lengths` (int [batch], checked), each sequence is
    reversed within its own length instead of the whole time axis, outputs past a length are
    zero and the final state is the one after the last valid step (`h_empty` [batch, ...state]
    for a sequence of length 0). A state of several arrays (e.g. a recurrence and a
    convolution window) is a pytree: `hs` and `h_empty` then have the same structure.

    With `final`, for a layer whose every state would be too large to keep (Mamba's
    [time, batch, D, N]), `run(u, resets, reverse, seq_lengths) -> (h_last, y)` returns the
    state after each sequence's last valid step itself (`seq_lengths` None: after the last
    step; it is then never asked to reverse within lengths).

    Returns (y [time, batch, features], h_last [batch, ...state]).
    """
    if u.shape[0] == 0:  # no steps: the state stays the initial one
        hs, y = run(u, resets, reverse, None) if final else run(u, resets, reverse)
        return y, (hs if final else jnp.broadcast_to(h_empty, hs.shape[1:]))
    if seq_lengths is None:
        if final:
            h_last, y = run(u, resets, reverse, None)
            return y, h_last
        hs, y = run(u, resets, reverse)
        return y, jax.tree.map(lambda h: h[0] if reverse else h[-1], hs)
    if reverse:
        u = reverse_within_lengths(u, seq_lengths)
        resets = None if resets is None else reverse_within_lengths(resets, seq_lengths)
    if final:
        h_last, y = run(u, resets, False, seq_lengths)
    else:
        hs, y = run(u, resets, False)
        h_last = jax.tree.map(
            lambda h, empty: last_valid(h, seq_lengths, jnp.broadcast_to(empty, h.shape[1:])),
            hs,
            h_empty,
        )
    y = jnp.where(step_mask(seq_lengths, u.shape[0])[..., None], y, 0.0)
    if reverse:
        y = reverse_within_lengths(y, seq_lengths)
    return y, h_last
