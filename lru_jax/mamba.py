"""The Mamba block (Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"), as pure functions.

The block maps u [..., H] to [..., H] through E = d_inner channels, each with N = d_state
states, its step Δ, B and C computed from the input (the "selection"):

    x_t, z_t = split(W_in u_t)                                 [E], [E]
    x_t = SiLU(Σ_{s=0}^{W-1} w_{W-1-s} ⊙ x_{t-s} + b_conv)      [E]   causal depthwise conv
    δ_t, B_t, C_t = split(W_x x_t)                              [R], [N], [N]
    Δ_t = softplus(W_dt δ_t + b_dt)                              [E]
    A = −exp(A_log)                                             [E, N]
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ                  [E, N]  the selective scan
    y_t = h_t C_t + D ⊙ x_t                                     [E]
    out_t = W_out (y_t ⊙ SiLU(z_t))                             [H]

The selective scan is `scan.selective_scan`, which reads out y_t as it runs and never holds
every h_t ([time, batch, E, N]); the convolution is the recurrent block's
(`rglru.causal_conv`, width W = d_conv): it carries the window of its last W − 1 inputs
across calls and steps, and no output reaches back past a reset. The block's state is a
`State`: h [..., E, N] and the window [..., W − 1, E].

Parameters (float32, dense weights [out, in] as in `lru_jax.mingru`; no biases on the
projections, the paper's and mambapy's default): W_in [2E, H], conv_w [W, E] (conv_w[W-1]
multiplies the current input), conv_b [E], W_x [R + 2N, E], W_dt [E, R], b_dt [E],
A_log [E, N], D [E], W_out [H, E], with R = dt_rank (default ⌈H/16⌉). Initialisation as in
the paper's code: the projections and the convolution uniform in ±1/sqrt(fan-in) (PyTorch's
default for Linear and Conv1d); W_dt uniform in ±R^(-1/2); b_dt the inverse softplus of
Δ = exp(U[log dt_min, log dt_max]) floored at 1e-4, so that softplus(b_dt) starts in
[dt_min, dt_max]; S4D-real A: A_log[e, n] = log(n + 1), i.e. A = −(1, 2, ..., N) in every
channel; D = 1. `from_mambapy` converts that package's `MambaBlock` weights to these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, padding, rglru, scan
from lru_jax.mingru import dense

Params = dict[str, jax.Array]

PARAM_NAMES = ("W_in", "conv_w", "conv_b", "W_x", "W_dt", "b_dt", "A_log", "D", "W_out")
DT_FLOOR = 1e-4  # the smallest initial Δ (the paper's dt_init_floor)


class State(NamedTuple):
    """The block's state: the selective scan's h [..., E, N] and the convolution's window of
    its last W − 1 inputs [..., W − 1, E] (oldest first)."""

    h: jax.Array
    window: jax.Array


# ---------------------------------------------------------------- settings and initialisation


def default_dt_rank(d_model: int) -> int:
    """R = ⌈H/16⌉, the paper's rank of Δ's projection."""
    return math.ceil(d_model / 16)


def check_settings(
    d_inner: int, d_state: int, d_conv: int, dt_rank, dt_min: float, dt_max: float
) -> None:
    """The block's sizes (positive ints; dt_rank may be None, the default) and 0 < dt_min <=
    dt_max."""
    for name, value in (("d_inner", d_inner), ("d_state", d_state), ("d_conv", d_conv)):
        _checks.positive_int(name, value)
    if dt_rank is not None:
        _checks.positive_int("dt_rank", dt_rank)
    _checks.positive_number("dt_min", dt_min)
    _checks.positive_number("dt_max", dt_max)
    if dt_min > dt_max:
        _checks.fail("dt_min, dt_max", "0 < dt_min <= dt_max", (dt_min, dt_max))


def _uniform(key, shape, bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def inverse_softplus(y):
    """x with softplus(x) = y > 0: y + log(1 − exp(−y)), without cancellation at small y."""
    return y + jnp.log(-jnp.expm1(-y))


def init_dt_bias(key, d_inner: int, dt_min: float = 0.001, dt_max: float = 0.1) -> jax.Array:
    """b_dt [E] = softplus⁻¹(Δ), Δ log-uniform in [dt_min, dt_max], floored at DT_FLOOR."""
    log_dt = jax.random.uniform(key, (d_inner,), jnp.float32, math.log(dt_min), math.log(dt_max))
    return inverse_softplus(jnp.maximum(jnp.exp(log_dt), DT_FLOOR))


def s4d_real(d_inner: int, d_state: int) -> jax.Array:
    """A_log [E, N] of S4D-real, A = −(1, 2, ..., N) in every channel."""
    return jnp.log(
        jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
    )


def init(
    key,
    d_model: int,
    d_inner: int,
    d_state: int = 16,
    d_conv: int = 4,
    dt_rank: int | None = None,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
) -> Params:
    """Fresh block parameters: width H = d_model, E = d_inner channels of N = d_state states,
    a convolution of d_conv steps and Δ's projection of rank dt_rank (None: ⌈H/16⌉)."""
    _checks.positive_int("d_model", d_model)
    check_settings(d_inner, d_state, d_conv, dt_rank, dt_min, dt_max)
    h, e, n = d_model, d_inner, d_state
    r = default_dt_rank(h) if dt_rank is None else dt_rank
    k = jax.random.split(key, 7)
    return {
        "W_in": _uniform(k[0], (2 * e, h), 1 / math.sqrt(h)),
        "conv_w": _uniform(k[1], (d_conv, e), 1 / math.sqrt(d_conv)),
        "conv_b": _uniform(k[2], (e,), 1 / math.sqrt(d_conv)),
        "W_x": _uniform(k[3], (r + 2 * n, e), 1 / math.sqrt(e)),
        "W_dt": _uniform(k[4], (e, r), 1 / math.sqrt(r)),
        "b_dt": init_dt_bias(k[5], e, dt_min, dt_max),
        "A_log": s4d_real(e, n),
        "D": jnp.ones((e,), jnp.float32),
        "W_out": _uniform(k[6], (h, e), 1 / math.sqrt(e)),
    }


def zero_state(batch_shape: tuple[int, ...], d_inner: int, d_state: int, d_conv: int) -> State:
    return State(
        jnp.zeros((*batch_shape, d_inner, d_state), jnp.float32),
        jnp.zeros((*batch_shape, d_conv - 1, d_inner), jnp.float32),
    )


# ---------------------------------------------------------------- the block


def sizes(params: Params) -> tuple[int, int, int, int]:
    """(H, E, N, W) of the parameters."""
    d_inner, d_state = params["A_log"].shape
    return params["W_in"].shape[1], d_inner, d_state, params["conv_w"].shape[0]


def check_input(params: Params, u, name: str = "u"):
    """u [..., H] as an array (a nested list is converted), checked against the parameters."""
    return _checks.features(name, u, params["W_in"].shape[1])


def _check_state(params: Params, state, batch_shape) -> None:
    _, e, n, w = sizes(params)
    want = (batch_shape + (e, n), batch_shape + (w - 1, e))
    shapes = None
    if isinstance(state, tuple) and len(state) == 2:
        shapes = tuple(tuple(np.shape(s)) for s in state)
    if shapes != want:
        expected = f"a mamba.State (h {want[0]}, window {want[1]})"
        got = f"shapes {shapes}" if shapes else type(state).__name__
        raise ValueError(_checks.message("state0", expected, got))


def _branches(params: Params, u):
    """(x, z) [..., E] of the input projection."""
    return jnp.split(dense(u, params["W_in"]), 2, axis=-1)


def selection(params: Params, x):
    """(Δ [..., E], B [..., N], C [..., N]) from the convolved x [..., E]."""
    _, _, n, _ = sizes(params)
    rank = params["W_dt"].shape[1]
    low_rank, b, c = jnp.split(dense(x, params["W_x"]), [rank, rank + n], axis=-1)
    # Δ in float32 (it sets the decay exp(Δ A)); B and C in x's dtype, cast up by the scan
    dt = dense(low_rank, params["W_dt"], params["b_dt"]).astype(jnp.float32)
    return jax.nn.softplus(dt), b, c


def _output(params: Params, y, z):
    """W_out (y ⊙ SiLU(z)) in z's (the input's) dtype, y the scan's float32 readout."""
    return dense(y.astype(z.dtype) * jax.nn.silu(z), params["W_out"])


def forward(
    params: Params,
    u: jax.Array,
    state0: State | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    resets: jax.Array | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    scan_table=None,
) -> tuple[jax.Array, State]:
    """The Mamba block over whole sequences.

    Args:
      params: from `init` (or `from_mambapy`).
      u: [time, batch, H] real inputs, time-major.
      state0: optional `State` before the first step (zeros if None): h [batch, E, N] and the
        convolution's window [batch, W-1, E].
      seq_lengths: optional int [batch]: outputs past a length are zero and the returned
        state is the one after the last valid step.
      reverse: the block over each sequence read backwards (within its length).
      resets: optional bool [time, batch]: document starts; the state restarts there and the
        convolution does not reach the inputs before them.
      method, chunk_size, scan_table: the selective scan's (`scan.selective_scan`).

    Returns:
      (y [time, batch, H], the final `State`).
    """
    u = check_input(params, u)
    _checks.rank("u", u, 3, "[time, batch, H]")
    seq_lengths = rglru.check_sequence("u", u, seq_lengths, resets, "H")
    _, e, n, w = sizes(params)
    if state0 is None:
        state0 = zero_state(u.shape[1:2], e, n, w)
    _check_state(params, state0, u.shape[1:2])
    state0 = State(*state0)
    A = -jnp.exp(params["A_log"])

    def run(u, resets, reverse, lengths):
        if reverse:  # the causal convolution runs forwards over the reversed sequence
            state, y = run(
                jnp.flip(u, 0), None if resets is None else jnp.flip(resets, 0), False, None
            )
            return state, jnp.flip(y, 0)
        x, z = _branches(params, u)
        x, windows = rglru.causal_conv(params, x, state0.window, resets)
        x = jax.nn.silu(x)
        delta, b, c = selection(params, x)
        if lengths is None:
            window = windows[-1] if u.shape[0] else state0.window
        else:  # past a length Δ = 0: exp(0 A) = 1 and no input, so h stays the last valid one
            valid = padding.step_mask(lengths, u.shape[0])
            delta = jnp.where(valid[..., None], delta, 0.0)
            resets = None if resets is None else resets & valid
            window = padding.last_valid(windows, lengths, state0.window)
        y, h = scan.selective_scan(
            x, delta, A, b, c, params["D"], state0.h, resets=resets, method=method,
            chunk_size=chunk_size, scan_table=scan_table,
        )  # fmt: skip
        return State(h, window), _output(params, y, z)

    return padding.run_within_lengths(
        run, u, seq_lengths, state0, reverse=reverse, resets=resets, final=True
    )


def step(params: Params, state: State, u) -> tuple[State, jax.Array]:
    """One step for generation (no reset): state, u [..., H] -> (state', y [..., H])."""
    h, window = state
    x, z = _branches(params, u)
    x, window = rglru.conv_step(params, window, x)
    x = jax.nn.silu(x)
    delta, b, c = selection(params, x)
    h, y = scan.selective_step(h, x, delta, -jnp.exp(params["A_log"]), b, c, params["D"])
    return State(h, window), _output(params, y, z)


# ---------------------------------------------------------------- mambapy's layout

MAMBAPY_KEYS = (
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
    "dt_proj.bias", "A_log", "D", "out_proj.weight",
)  # fmt: skip


def from_mambapy(state_dict: Mapping) -> Params:
    """Our parameters from a mambapy `MambaBlock`'s `state_dict()` (its tensors as numpy
    arrays), a block made with bias=False and conv_bias=True (mambapy's defaults): its Linear
    weights are [out, in] like ours; its Conv1d weight [E, 1, W] is our conv_w transposed."""
    keys = set(state_dict)
    if not set(MAMBAPY_KEYS) <= keys or keys - set(MAMBAPY_KEYS):
        expected = f"a mambapy MambaBlock's state_dict with keys {sorted(MAMBAPY_KEYS)}"
        raise ValueError(_checks.message("state_dict", expected, f"keys {sorted(keys)}"))
    p = {k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in state_dict.items()}
    return {
        "W_in": p["in_proj.weight"],
        "conv_w": p["conv1d.weight"][:, 0, :].T,
        "conv_b": p["conv1d.bias"],
        "W_x": p["x_proj.weight"],
        "W_dt": p["dt_proj.weight"],
        "b_dt": p["dt_proj.bias"],
        "A_log": p["A_log"],
        "D": p["D"],
        "W_out": p["out_proj.weight"],
    }
