"""The RG-LRU and Griffin's recurrent block (De et al. 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention for Efficient Language Models"), as pure functions.

The RG-LRU (Real-Gated Linear Recurrent Unit) maps x [..., N] to h [..., N]; its output is
its state. With K heads (the gates' weights are block-diagonal, K blocks of N/K x N/K, as in
recurrentgemma):

    r_t = σ(W_r x_t + b_r)                      [N]  recurrence gate
    i_t = σ(W_i x_t + b_i)                      [N]  input gate
    log a_t = −c r_t softplus(−Λ)               [N]  a_t = σ(Λ)^(c r_t), c = 8
    h_t = a_t ⊙ h_{t-1} + sqrt(1 − a_t²) ⊙ (i_t ⊙ x_t)

The decay is formed from its logarithm, and the normaliser as sqrt(−expm1(2 log a_t)), which
keeps its precision where a_t is near 1 (1 − a_t² would cancel). As in recurrentgemma, the
square root's derivative is capped at 1000 (its argument floored at 1/(4·1000²) in the
backward pass), so that a_t → 1 gives no infinite gradient. A reset (recurrentgemma's
segment_pos == 0, the first position of a document) restarts the state, h_t = i_t ⊙ x_t: the
normaliser is 1 there. Without `resets` no step is a reset, the first one included; a
recurrentgemma call with segment_pos = arange(T) is ours with resets[0] = True.

Griffin's recurrent block maps u [..., H] to [..., H] through the RG-LRU at width N:

    g_t = GeLU(W_y u_t + b_y)                                     [N]  gate branch
    v_t = W_x u_t + b_x                                           [N]  recurrent branch
    x_t = Σ_{s=0}^{W-1} w_{W-1-s} ⊙ v_{t-s} + b_conv              [N]  causal depthwise Conv1D
    h_t = RG-LRU(x)_t;   y_t = W_out (h_t ⊙ g_t) + b_out          [H]

The convolution (width W = 4) carries the window of its last W − 1 inputs v across calls and
steps; at a reset it does not reach the inputs before it (recurrentgemma's document mask).
The block's state is a `BlockState` (h [..., N], window [..., W − 1, N]).

Parameters (float32, dense weights [out, in] as in `lru_jax.mingru`): Λ [N] with σ(Λ)² uniform
on [r_min², r_max²] (the LRU's ring, recurrentgemma's defaults r_min = 0.9, r_max = 0.999);
W_r, W_i [K, N/K, N/K] normal with variance 1/N (recurrentgemma's fan-in counts every block),
b_r, b_i [N] zero; the block's W_y, W_x [N, H] variance 1/H, W_out [H, N] variance 1/N,
conv_w [W, N] variance 0.01/W (conv_w[W-1] multiplies the current input), biases zero.
`from_recurrentgemma` converts that package's parameters to these.

The recurrence runs through `scan.linear_scan` with the time-varying decay a_t.

Precision: the matmuls and the convolution's output are in the input's dtype (`mingru.dense`,
`block_diagonal` cast the weights), the decay, the normaliser and the state in float32 whatever
that dtype (the convolution's window keeps its state's dtype); y comes back in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, lru, padding, scan
from lru_jax.mingru import dense

Params = dict[str, jax.Array]

C = 8.0  # the decay's exponent scale c: a_t = σ(Λ)^(c r_t)
# The square root's derivative cap (recurrentgemma's max_gradient): the backward pass floors
# its argument at 1/(4 MAX_SQRT_SLOPE²), where the slope 1/(2 sqrt(x)) reaches the cap.
MAX_SQRT_SLOPE = 1000.0
PARAM_NAMES = ("Lambda", "W_r", "b_r", "W_i", "b_i")
BLOCK_PARAM_NAMES = ("W_y", "b_y", "W_x", "b_x", "conv_w", "conv_b", *PARAM_NAMES, "W_out", "b_out")


class BlockState(NamedTuple):
    """The recurrent block's state: the RG-LRU's h [..., N] and the convolution's window of
    its last W − 1 inputs [..., W − 1, N] (oldest first)."""

    h: jax.Array
    window: jax.Array


# ---------------------------------------------------------------- settings and initialisation


def check_settings(width: int, num_heads: int, r_min: float, r_max: float) -> None:
    _checks.positive_int("width", width)
    _checks.positive_int("num_heads", num_heads)
    if width % num_heads:
        _checks.fail("num_heads", f"a divisor of the RG-LRU's width {width}", num_heads)
    lru.check_radii(r_min, r_max)


def init_lambda(key, width: int, r_min: float = 0.9, r_max: float = 0.999) -> jax.Array:
    """Λ [N] with the base decay σ(Λ) on the LRU's ring (uniform by area on [r_min, r_max]):
    −log σ(Λ) = softplus(−Λ) is the LRU's exp(ν_log), so Λ = −log(expm1(exp(ν_log)))."""
    nu = jnp.exp(lru.init_nu_log(key, width, r_min, r_max))
    return -jnp.log(jnp.expm1(nu))


def _normal(key, shape, variance: float) -> jax.Array:
    return lru.init_matrix(key, shape, 1, 1) * math.sqrt(variance)


def init(key, width: int, num_heads: int = 1, r_min: float = 0.9, r_max: float = 0.999) -> Params:
    """Fresh RG-LRU parameters for width N = `width` and `num_heads` gate blocks."""
    check_settings(width, num_heads, r_min, r_max)
    k = jax.random.split(key, 3)
    block = width // num_heads
    return {
        "Lambda": init_lambda(k[0], width, r_min, r_max),
        "W_r": _normal(k[1], (num_heads, block, block), 1.0 / width),
        "b_r": jnp.zeros((width,), jnp.float32),
        "W_i": _normal(k[2], (num_heads, block, block), 1.0 / width),
        "b_i": jnp.zeros((width,), jnp.float32),
    }


def check_block_settings(d_model: int, conv_width: int) -> None:
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("conv_width", conv_width)


def block_init(
    key,
    d_model: int,
    lru_width: int | None = None,
    num_heads: int = 1,
    conv_width: int = 4,
    r_min: float = 0.9,
    r_max: float = 0.999,
) -> Params:
    """Fresh recurrent-block parameters: width H = d_model, RG-LRU width N = lru_width
    (default H) in `num_heads` gate blocks, a convolution of `conv_width` steps."""
    lru_width = d_model if lru_width is None else lru_width
    check_block_settings(d_model, conv_width)
    h, n = d_model, lru_width
    k = jax.random.split(key, 5)
    params = {
        "W_y": _normal(k[0], (n, h), 1.0 / h),
        "b_y": jnp.zeros((n,), jnp.float32),
        "W_x": _normal(k[1], (n, h), 1.0 / h),
        "b_x": jnp.zeros((n,), jnp.float32),
        "conv_w": _normal(k[2], (conv_width, n), 0.01 / conv_width),
        "conv_b": jnp.zeros((n,), jnp.float32),
        **init(k[3], n, num_heads, r_min, r_max),
        "W_out": _normal(k[4], (h, n), 1.0 / n),
        "b_out": jnp.zeros((h,), jnp.float32),
    }
    return {name: params[name] for name in BLOCK_PARAM_NAMES}


# ---------------------------------------------------------------- the RG-LRU


def block_diagonal(x, w, b):
    """x [..., K·I] through K blocks w [K, O, I] (each [out, in]) plus b [K·O] -> [..., K·O].

    One batched matmul with the blocks as its leading batch axis, [K, M, I] x [K, O, I], the
    leading axes of x flattened to M: on XLA:CPU two to three times faster than the einsum
    over [..., K, I] (measured at M = 8192, K = 4, I = O = 16, forward and backward)."""
    heads, _, size_in = w.shape
    blocks = jnp.moveaxis(x.reshape(-1, heads, size_in), 1, 0)  # [K, M, I]
    dims = (((2,), (2,)), ((0,), (0,)))
    y = jax.lax.dot_general(blocks, w.astype(x.dtype), dims)  # [K, M, O], in x's dtype
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[:-1] + (-1,)) + b.astype(x.dtype)


@jax.custom_jvp
def _sqrt_capped_slope(x):
    return jnp.sqrt(x)


@_sqrt_capped_slope.defjvp
def _sqrt_capped_slope_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = 1.0 / (4.0 * MAX_SQRT_SLOPE**2)
    return jnp.sqrt(x), dx * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor))


def _reset_mask(resets, x):
    """resets bool [time, ...leading] with trailing axes of 1 to broadcast against x."""
    return resets.reshape(resets.shape + (1,) * (x.ndim - resets.ndim))


def log_decay(params: Params, x) -> jax.Array:
    """log a_t = −c r_t softplus(−Λ) [..., N] from x [..., N]."""
    gate = jax.nn.sigmoid(block_diagonal(x, params["W_r"], params["b_r"]).astype(jnp.float32))
    return -C * gate * jax.nn.softplus(-params["Lambda"])


def terms(params: Params, x, resets=None) -> tuple[jax.Array, jax.Array]:
    """(a, b) [..., N] of h_t = a_t h_{t-1} + b_t, b_t = sqrt(1 − a_t²) ⊙ i_t ⊙ x_t (the
    normaliser 1 where `resets` [time, ...leading] is true), from x [..., N]."""
    log_a = log_decay(params, x)
    normaliser = _sqrt_capped_slope(-jnp.expm1(2.0 * log_a))
    if resets is not None:
        normaliser = jnp.where(_reset_mask(resets, x), 1.0, normaliser)
    gated = jax.nn.sigmoid(block_diagonal(x, params["W_i"], params["b_i"])) * x
    return jnp.exp(log_a), normaliser * gated


def _states(params, x, h0, resets, reverse, method, scan_table):
    """Every state h [time, ..., N] of the RG-LRU over x [time, ..., N] from h0 [..., N]."""
    a, b = terms(params, x, resets)
    return scan.linear_scan(
        a, b, h0, method=method, reverse=reverse, resets=resets, scan_table=scan_table
    )


def check_input(params: Params, x, name: str = "x"):
    """x [..., N] as an array (a nested list is converted), checked against the parameters."""
    return _checks.features(name, x, params["Lambda"].shape[0])


def check_sequence(name: str, x, seq_lengths, resets, features: str):
    """Checks the input `name` x [time, ..., F], seq_lengths and resets (bool [time, ...]
    leading x's axes); returns the int32 lengths or None."""
    seq_lengths = _checks.time_major(name, x, seq_lengths, features)
    if resets is not None:
        shape, dtype = _checks._shape_dtype("resets", resets)
        if dtype != np.bool_:
            raise TypeError(f"resets: expected a bool array, got dtype {dtype}")
        if not shape or len(shape) >= x.ndim or shape != x.shape[: len(shape)]:
            expected = f"a bool [time, ...] leading the input's axes {x.shape[:-1]}"
            raise ValueError(_checks.message("resets", expected, f"shape {shape}"))
    return seq_lengths


def zero_state(batch_shape: tuple[int, ...], width: int) -> jax.Array:
    return jnp.zeros((*batch_shape, width), jnp.float32)


def forward(
    params: Params,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    resets: jax.Array | None = None,
    method: str = "auto",
    scan_table=None,
) -> tuple[jax.Array, jax.Array]:
    """The RG-LRU over a whole sequence, in parallel where `method` allows.

    Args:
      params: from `init`.
      x: [time, ..., N] real inputs, time-major; usually [time, batch, N].
      h0: optional [..., N] float32 state before the first step (zero if None).
      seq_lengths: optional int [batch] for x [time, batch, N]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: run from the last (valid) step to the first.
      resets: optional bool [time, ...]: document starts (recurrentgemma's segment_pos == 0):
        the state restarts and the normaliser is 1 there.
      method: a `linear_scan` method.
      scan_table: optional `ScanTable` that an "auto" `method` chooses from.

    Returns:
      (y [time, ..., N], h_last [..., N]): the outputs (every state) and the final state.
    """
    x = check_input(params, x)
    seq_lengths = check_sequence("x", x, seq_lengths, resets, "N")
    h_empty = zero_state(x.shape[1:-1], x.shape[-1]) if h0 is None else h0

    def run(u, resets, reverse):
        hs = _states(params, u, h_empty, resets, reverse, method, scan_table)
        return hs, hs.astype(u.dtype)

    return padding.run_within_lengths(run, x, seq_lengths, h_empty, reverse=reverse, resets=resets)


def step(params: Params, h, x) -> tuple[jax.Array, jax.Array]:
    """One step for generation (no reset): h [..., N], x [..., N] -> (h', y = h')."""
    a, b = terms(params, x)
    h = a * h + b
    return h, h.astype(x.dtype)


# ---------------------------------------------------------------- Griffin's recurrent block


def block_zero_state(batch_shape: tuple[int, ...], lru_width: int, conv_width: int) -> BlockState:
    return BlockState(
        zero_state(batch_shape, lru_width),
        jnp.zeros((*batch_shape, conv_width - 1, lru_width), jnp.float32),
    )


def causal_conv(params: Params, v, window, resets=None) -> tuple[jax.Array, jax.Array]:
    """The depthwise causal convolution over v [time, ..., N] after `window` [..., W-1, N]
    (the W − 1 inputs before v[0]); no output reaches back past a reset at or before its step.

    Returns (x [time, ..., N], every window [time, ..., W-1, N]: the last W − 1 inputs after
    each step, the block's convolution state)."""
    w = params["conv_w"]
    width, time = w.shape[0], v.shape[0]
    padded = jnp.concatenate([jnp.moveaxis(window, -2, 0), v], axis=0)  # [W-1+time, ..., N]
    out = w[width - 1] * v + params["conv_b"]
    keep = None  # whether v_{t-s} is in v_t's document: no reset at steps t-s+1 .. t
    for shift in range(1, width):
        earlier = padded[width - 1 - shift : width - 1 - shift + time]  # v_{t-shift}
        if resets is not None:
            mask = _reset_mask(resets, v)
            after = jnp.concatenate(  # a reset at step t-shift+1 cuts v_{t-shift} off
                [jnp.zeros_like(mask[: shift - 1]), mask[: max(time - shift + 1, 0)]], axis=0
            )
            keep = ~after if keep is None else keep & ~after
            earlier = jnp.where(keep, earlier, 0.0)
        out = out + w[width - 1 - shift] * earlier
    out = out.astype(v.dtype)
    if width == 1:
        return out, jnp.zeros((time, *window.shape), padded.dtype)
    windows = [padded[k + 1 : k + 1 + time] for k in range(width - 1)]
    return out, jnp.stack(windows, axis=-2)


def _block_gate(params: Params, u):
    """GeLU(W_y u + b_y) [..., N] (tanh-approximated GeLU, as recurrentgemma's jax.nn.gelu)."""
    return jax.nn.gelu(dense(u, params["W_y"], params["b_y"]))


def check_block_input(params: Params, u, name: str = "u"):
    """u [..., H] as an array (a nested list is converted), checked against the parameters."""
    return _checks.features(name, u, params["W_y"].shape[1])


def _check_block_state(params: Params, state, batch_shape) -> None:
    n, width = params["Lambda"].shape[0], params["conv_w"].shape[0]
    want = (batch_shape + (n,), batch_shape + (width - 1, n))
    shapes = None
    if isinstance(state, tuple) and len(state) == 2:
        shapes = tuple(tuple(np.shape(s)) for s in state)
    if shapes != want:
        expected = f"a BlockState (h {want[0]}, window {want[1]})"
        got = f"shapes {shapes}" if shapes else type(state).__name__
        raise ValueError(_checks.message("state0", expected, got))


def _flip_time(x):
    return None if x is None else jnp.flip(x, 0)


def block_forward(
    params: Params,
    u: jax.Array,
    state0: BlockState | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    resets: jax.Array | None = None,
    method: str = "auto",
    scan_table=None,
) -> tuple[jax.Array, BlockState]:
    """Griffin's recurrent block over a whole sequence.

    Args:
      params: from `block_init`.
      u: [time, ..., H] real inputs, time-major; usually [time, batch, H].
      state0: optional `BlockState` before the first step (zeros if None): h [..., N] and the
        convolution's window [..., W-1, N].
      seq_lengths: optional int [batch] for u [time, batch, H]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: the block over each sequence read backwards (within its length).
      resets: optional bool [time, ...]: document starts (see the module docstring).
      method, scan_table: the RG-LRU's `linear_scan` method and table.

    Returns:
      (y [time, ..., H], the final `BlockState`).
    """
    u = check_block_input(params, u)
    seq_lengths = check_sequence("u", u, seq_lengths, resets, "H")
    batch_shape = u.shape[1:-1]
    if state0 is None:
        state0 = block_zero_state(batch_shape, params["Lambda"].shape[0], params["conv_w"].shape[0])
    _check_block_state(params, state0, batch_shape)
    state0 = BlockState(*state0)

    def run(u, resets, reverse):
        if reverse:  # the causal convolution runs forwards over the reversed sequence
            hs, y = run(_flip_time(u), _flip_time(resets), False)
            return jax.tree.map(_flip_time, hs), _flip_time(y)
        x, windows = causal_conv(
            params, dense(u, params["W_x"], params["b_x"]), state0.window, resets
        )
        hs = _states(params, x, state0.h, resets, False, method, scan_table)
        y = dense(hs.astype(u.dtype) * _block_gate(params, u), params["W_out"], params["b_out"])
        return BlockState(hs, windows), y

    return padding.run_within_lengths(run, u, seq_lengths, state0, reverse=reverse, resets=resets)


def block_step(params: Params, state: BlockState, u) -> tuple[BlockState, jax.Array]:
    """One step for generation: state, u [..., H] -> (state', y [..., H])."""
    h, window = state
    x, window = conv_step(params, window, dense(u, params["W_x"], params["b_x"]))
    h, _ = step(params, h, x)
    y = dense(h.astype(u.dtype) * _block_gate(params, u), params["W_out"], params["b_out"])
    return BlockState(h, window), y


def conv_step(params: Params, window, v) -> tuple[jax.Array, jax.Array]:
    """One step of `causal_conv`: window [..., W-1, N] (oldest first), v [..., N] ->
    (x [..., N], the window after v)."""
    inputs = jnp.concatenate([window, v[..., None, :]], axis=-2)  # [..., W, N], oldest first
    x = jnp.sum(params["conv_w"] * inputs, axis=-2) + params["conv_b"]
    return x.astype(v.dtype), inputs[..., 1:, :]


# ---------------------------------------------------------------- recurrentgemma's layout


def _rg_lru_params(p: Mapping) -> Params:
    """recurrentgemma's RGLRU: a_param = −Λ; its gates' w [K, in, out], b [K, out]."""
    if "a_imag_param" in p:
        raise ValueError(
            _checks.message("params", "a real RG-LRU (only_real=True)", "an a_imag_param")
        )
    out = {"Lambda": -jnp.asarray(p["a_param"], jnp.float32)}
    for ours, theirs in (("r", "a_gate"), ("i", "input_gate")):
        out[f"W_{ours}"] = jnp.swapaxes(jnp.asarray(p[theirs]["w"], jnp.float32), 1, 2)
        out[f"b_{ours}"] = jnp.asarray(p[theirs]["b"], jnp.float32).reshape(-1)
    return out


def from_recurrentgemma(params: Mapping) -> Params:
    """Our parameters from recurrentgemma's (its Flax `variables["params"]`) of an `RGLRU`
    (a_param, a_gate, input_gate) or a `RecurrentBlock` (linear_y, linear_x, conv_1d, rg_lru,
    linear_out): the same functions, for `forward` or `block_forward`. Its Dense kernels are
    [in, out] and ours [out, in]; its a_param is −Λ."""
    keys = set(params)
    if {"a_param", "a_gate", "input_gate"} <= keys:
        return _rg_lru_params(params)
    block = {"linear_y", "linear_x", "conv_1d", "rg_lru", "linear_out"}
    if not block <= keys:
        expected = f"recurrentgemma's RGLRU or RecurrentBlock parameters (keys {sorted(block)})"
        raise ValueError(_checks.message("params", expected, f"keys {sorted(keys)}"))

    def linear(name):
        kernel = jnp.asarray(params[name]["kernel"], jnp.float32)
        return kernel.T, jnp.asarray(params[name]["bias"], jnp.float32)

    ours = _rg_lru_params(params["rg_lru"])
    ours["W_y"], ours["b_y"] = linear("linear_y")
    ours["W_x"], ours["b_x"] = linear("linear_x")
    ours["W_out"], ours["b_out"] = linear("linear_out")
    ours["conv_w"] = jnp.asarray(params["conv_1d"]["w"], jnp.float32)
    ours["conv_b"] = jnp.asarray(params["conv_1d"]["b"], jnp.float32)
    return {name: ours[name] for name in BLOCK_PARAM_NAMES}
