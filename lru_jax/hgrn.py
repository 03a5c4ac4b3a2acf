"""HGRN's token mixer, the HGRU (Qin, Yang and Zhong 2023, "Hierarchically Gated Recurrent
Neural Network for Sequence Modeling"), as pure functions.

With model width H and state size N:

    μ_t = σ(W_f x_t + b_f)                                   [N]  forget gate, from the input
    λ_t = γ + (1 − γ) ⊙ μ_t                                  [N]  lower-bounded: γ <= λ_t < 1
    c_t = SiLU(W_cr x_t + b_cr) + i SiLU(W_ci x_t + b_ci)    [N]  complex input
    h_t = λ_t e^{iθ} ⊙ h_{t-1} + (1 − λ_t) ⊙ c_t             [N]  complex64, θ learned
    o_t = LayerNorm([Re h_t, Im h_t]) ⊙ SiLU(W_g x_t + b_g)  [2N] output gate
    y_t = W_o o_t + b_o                                      [H]

The input gate is tied to the forget gate (1 − λ_t) and the phase θ does not depend on the
input, as in the paper. The lower bound γ = σ(β) [N] is the block's own learned parameter
`bound_logit` β, created when `init` is given `lower_bound` > 0 (its initial value); with
`lower_bound` = 0 there is none and λ_t = μ_t. The paper shares one parameter Γ over the L
layers (γ_k = cumsum(softmax(Γ))_k − its first entry, so γ_0 = 0 and γ_k = k/L at init); here
each block builds its own, so a model sets block k's `lower_bound` to k/L (the paper's initial
values) and the bounds then learn independently (docs/recurrences-min.md).

Parameters (float32): W_f [N, H], W_c [2N, H] (rows: real part, then imaginary), W_g [2N, H],
W_o [H, 2N], uniform in ±1/sqrt(fan in) (PyTorch's Linear); biases zero, except b_f with
`max_timescale` T (chrono initialisation, `mingru.chrono_log_odds`: μ starts at u/(1 + u),
u ~ U(1, T − 1), a memory of at least 1 + u steps); θ [N] = 10000^(-2k/N) (the authors' code);
LayerNorm scale [2N] one and bias [2N] zero (epsilon 1e-5).

The recurrence runs through `scan.linear_scan` with the time-varying complex decay λ_t e^{iθ}.

Precision: the matmuls run in x's dtype (`mingru.dense`), the gates, the complex64 state and
the norm's statistics in float32 whatever x's dtype; y comes back in x's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lru_jax import _checks, padding, scan
from lru_jax.mingru import check_max_timescale, chrono_log_odds, dense, uniform

Params = dict[str, jax.Array]

NORM_EPSILON = 1e-5
PARAM_NAMES = (
    "W_f", "b_f", "W_c", "b_c", "theta", "W_g", "b_g", "norm_scale", "norm_bias", "W_o", "b_o"
)  # fmt: skip


def param_names(lower_bound: float) -> list[str]:
    return [*PARAM_NAMES, *(["bound_logit"] if lower_bound > 0 else [])]


def check_lower_bound(lower_bound) -> float:
    return _checks.number("lower_bound", lower_bound, 0, 1, closed_high=False)


def init(
    key,
    d_model: int,
    d_state: int | None = None,
    lower_bound: float = 0.0,
    max_timescale: float = 0.0,
) -> Params:
    """Fresh HGRU parameters for width H = d_model, state size N = d_state (default H), a
    learned lower bound starting at `lower_bound` in [0, 1) (none if 0) and, with
    `max_timescale` T > 2, the forget gate's bias by chrono initialisation (0: zero)."""
    d_state = d_model if d_state is None else d_state
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_state", d_state)
    check_lower_bound(lower_bound)
    check_max_timescale(max_timescale)
    h, n = d_model, d_state
    k = jax.random.split(key, 4)
    params = {
        "W_f": uniform(k[0], (n, h), h),
        "b_f": jnp.zeros((n,), jnp.float32),
        "W_c": uniform(k[1], (2 * n, h), h),
        "b_c": jnp.zeros((2 * n,), jnp.float32),
        "theta": 10000.0 ** (-2.0 * jnp.arange(n, dtype=jnp.float32) / n),
        "W_g": uniform(k[2], (2 * n, h), h),
        "b_g": jnp.zeros((2 * n,), jnp.float32),
        "norm_scale": jnp.ones((2 * n,), jnp.float32),
        "norm_bias": jnp.zeros((2 * n,), jnp.float32),
        "W_o": uniform(k[3], (h, 2 * n), 2 * n),
        "b_o": jnp.zeros((h,), jnp.float32),
    }
    if lower_bound > 0:
        logit = math.log(lower_bound) - math.log1p(-lower_bound)
        params["bound_logit"] = jnp.full((n,), logit, jnp.float32)
    if max_timescale:
        params["b_f"] = chrono_log_odds(key, n, max_timescale)
    return params


def lower_bound(params: Params) -> jax.Array:
    """γ [N] (zero without a learned bound)."""
    if "bound_logit" not in params:
        return jnp.zeros_like(params["theta"])
    return jax.nn.sigmoid(params["bound_logit"])


def terms(params: Params, x) -> tuple[jax.Array, jax.Array]:
    """(a, b) [..., N] complex64 of h_t = a_t h_{t-1} + b_t: a = λ e^{iθ}, b = (1 − λ) c."""
    gamma = lower_bound(params)
    # the matmuls in x's dtype, the forget gate and the candidate in float32 (see the module)
    forget = dense(x, params["W_f"], params["b_f"]).astype(jnp.float32)
    lam = gamma + (1.0 - gamma) * jax.nn.sigmoid(forget)
    candidate = jax.nn.silu(dense(x, params["W_c"], params["b_c"]).astype(jnp.float32))
    c_re, c_im = jnp.split(candidate, 2, axis=-1)
    rotation = jnp.exp(1j * params["theta"])  # [N]: time-invariant, complex64
    return lam * rotation, (1.0 - lam) * jax.lax.complex(c_re, c_im)


def readout(params: Params, h, x):
    """y = W_o (LayerNorm([Re h, Im h]) ⊙ SiLU(W_g x + b_g)) + b_o: h [..., N], x [..., H];
    the norm's statistics in h's dtype (float32), its output and y in x's dtype."""
    feature = jnp.concatenate([h.real, h.imag], axis=-1)
    mean = jnp.mean(feature, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(feature - mean), axis=-1, keepdims=True)
    normed = (feature - mean) * jax.lax.rsqrt(var + NORM_EPSILON)
    normed = (normed * params["norm_scale"] + params["norm_bias"]).astype(x.dtype)
    gate = jax.nn.silu(dense(x, params["W_g"], params["b_g"]))
    return dense(normed * gate, params["W_o"], params["b_o"])


def check_input(params: Params, x, name: str = "x"):
    """x [..., features] as an array (a nested list is converted), checked against the
    parameters' input size."""
    return _checks.features(name, x, params["W_f"].shape[1])


def zero_state(batch_shape: tuple[int, ...], d_state: int) -> jax.Array:
    return jnp.zeros((*batch_shape, d_state), jnp.complex64)


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
    """The HGRU over a whole sequence, in parallel where `method` allows.

    Args:
      params: from `init`.
      x: [time, ..., H] real inputs, time-major; usually [time, batch, H].
      h0: optional [..., N] complex initial state.
      seq_lengths: optional int [batch] for x [time, batch, H]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: run from the last (valid) step to the first.
      resets: optional bool [time, ...]: restart the state from zero at these steps.
      method: a `linear_scan` method.
      scan_table: optional `ScanTable` that an "auto" `method` chooses from.

    Returns:
      (y [time, ..., H], h_last [..., N] complex64).
    """
    x = check_input(params, x)
    seq_lengths = _checks.time_major("x", x, seq_lengths)
    h_empty = zero_state(x.shape[1:-1], params["theta"].shape[0]) if h0 is None else h0

    def run(u, resets, reverse):
        a, b = terms(params, u)
        hs = scan.linear_scan(
            a, b, h_empty, method=method, reverse=reverse, resets=resets, scan_table=scan_table
        )
        return hs, readout(params, hs, u)

    return padding.run_within_lengths(run, x, seq_lengths, h_empty, reverse=reverse, resets=resets)


def step(params: Params, h, x) -> tuple[jax.Array, jax.Array]:
    """One step for generation: h [..., N] complex, x [..., H] -> (h', y [..., H])."""
    a, b = terms(params, x)
    h = a * h + b
    return h, readout(params, h, x)
