"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for
Long Sequences"), as pure functions.

With model width H and state size N:

    λ = exp(-exp(ν_log) + i exp(θ_log))                    [N]   stable: |λ| < 1 always
    γ = exp(γ_log), initialised to sqrt(1 - |λ|²)          [N]   keeps E|h|² ≈ E|Bu|² at init
    h_t = λ ⊙ h_{t-1} + γ ⊙ (B u_t),  B = B_re + i B_im     [N]   complex64
    y_t = Re(C h_t) + D ⊙ u_t,        C = C_re + i C_im     [H]

Ring initialisation: |λ| uniform on the ring r_min <= |λ| <= r_max (by area), phase uniform in
[0, max_phase]. B ~ N(0, 1/(2H)) per real part, C ~ N(0, 1/N) per real part, D ~ N(0, 1).

The recurrence runs through `lru_jax.scan.linear_scan` with λ time-invariant, so the parallel
forward and the one-step form (`step`) are the same computation in different orders.

Precision: the matmuls B u and C h run in u's dtype (the weights are cast to it: bfloat16
under mixed precision), λ, γ and the state h in complex64 / float32 whatever u's dtype (B u is
cast up before the scan, the state cast down for the readout); y comes back in u's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lru_jax import _checks, padding, scan

Params = dict[str, jax.Array]

PARAM_SHAPES = {
    "nu_log": ("N",),
    "theta_log": ("N",),
    "gamma_log": ("N",),
    "B_re": ("N", "H"),
    "B_im": ("N", "H"),
    "C_re": ("H", "N"),
    "C_im": ("H", "N"),
    "D": ("H",),
}


def check_radii(r_min: float, r_max: float) -> None:
    """The ring's radii: 0 <= r_min < r_max <= 1 (shared by the RG-LRU's decay ring)."""
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(
            _checks.message("r_min, r_max", "0 <= r_min < r_max <= 1", f"{r_min}, {r_max}")
        )


def check_ring(r_min: float, r_max: float, max_phase: float) -> None:
    check_radii(r_min, r_max)
    _checks.positive_number("max_phase", max_phase)


def init_nu_log(key, d_state: int, r_min: float = 0.0, r_max: float = 1.0) -> jax.Array:
    """ν_log [N] such that |λ| = exp(-exp(ν_log)) is uniform by area on [r_min, r_max]."""
    u = jax.random.uniform(key, (d_state,), jnp.float32, minval=1e-7)
    radius_sq = u * (r_max**2 - r_min**2) + r_min**2
    # |λ| = 1 (u near 1 with r_max = 1) would give ν_log = -inf: keep |λ| a hair inside.
    radius_sq = jnp.minimum(radius_sq, 1.0 - 1e-7)
    return jnp.log(-0.5 * jnp.log(radius_sq))


def init_theta_log(key, d_state: int, max_phase: float = 2 * math.pi) -> jax.Array:
    """θ_log [N] with the phase exp(θ_log) uniform on [0, max_phase]."""
    u = jax.random.uniform(key, (d_state,), jnp.float32, minval=1e-7)
    return jnp.log(max_phase * u)


def gamma_log_for(nu_log: jax.Array) -> jax.Array:
    """γ_log [N] = log sqrt(1 - |λ|²), the normalisation for the initial eigenvalues."""
    radius_sq = jnp.exp(-2.0 * jnp.exp(nu_log))
    return 0.5 * jnp.log1p(-radius_sq)


def init_matrix(key, shape: tuple[int, int], fan_in: int, complex_parts: int) -> jax.Array:
    """Gaussian with variance 1/(complex_parts * fan_in): 1/(2H) for B, 1/N for C."""
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(complex_parts * fan_in)


def init(
    key,
    d_model: int,
    d_state: int,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
) -> Params:
    """Fresh LRU parameters for width H = d_model and state size N = d_state."""
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_state", d_state)
    check_ring(r_min, r_max, max_phase)
    k = jax.random.split(key, 7)
    h, n = d_model, d_state
    nu_log = init_nu_log(k[0], n, r_min, r_max)
    return {
        "nu_log": nu_log,
        "theta_log": init_theta_log(k[1], n, max_phase),
        "gamma_log": gamma_log_for(nu_log),
        "B_re": init_matrix(k[2], (n, h), h, 2),
        "B_im": init_matrix(k[3], (n, h), h, 2),
        "C_re": init_matrix(k[4], (h, n), n, 1),
        "C_im": init_matrix(k[5], (h, n), n, 1),
        "D": jax.random.normal(k[6], (h,), jnp.float32),
    }


def eigenvalues(params: Params) -> jax.Array:
    """λ [N] complex64."""
    return jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))


def complex_input(u: jax.Array, w_re: jax.Array, w_im: jax.Array) -> jax.Array:
    """(w_re + i w_im) u: u [..., H] real, w_re and w_im [N, H] -> [..., N] complex64, by two
    real matmuls in u's dtype (the weights cast to it), the products cast up to float32
    (also the S5's B̄ u).

    The leading axes are flattened first: XLA:CPU ran these matmuls (and their gradients) about
    twice as fast on [M, H] as on [time, batch, H] (docs/benchmarks.md).
    """
    flat = u.reshape(-1, u.shape[-1])
    w_re, w_im = w_re.astype(u.dtype), w_im.astype(u.dtype)
    h = jax.lax.complex((flat @ w_re.T).astype(jnp.float32), (flat @ w_im.T).astype(jnp.float32))
    return h.reshape(u.shape[:-1] + (h.shape[-1],))


def input_term(params: Params, u: jax.Array) -> jax.Array:
    """γ ⊙ (B u): u [..., H] real -> [..., N] complex64."""
    gamma = jnp.exp(params["gamma_log"])[:, None]
    return complex_input(u, params["B_re"] * gamma, params["B_im"] * gamma)


def readout(params: Params, h: jax.Array, u: jax.Array) -> jax.Array:
    """Re(C h) + D ⊙ u: h [..., N] complex, u [..., H] -> [..., H] real (also the S5's), in
    u's dtype (the state and the weights cast to it).

    One matmul of [Re h, Im h] [M, 2N] with [C_re, -C_im], leading axes flattened.
    """
    flat = h.reshape(-1, h.shape[-1])
    c = jnp.concatenate([params["C_re"], -params["C_im"]], 1).astype(u.dtype)  # [H, 2N]
    y = jnp.concatenate([flat.real, flat.imag], -1).astype(u.dtype) @ c.T
    return y.reshape(h.shape[:-1] + (y.shape[-1],)) + params["D"].astype(u.dtype) * u


def check_input(params: Params, u, name: str = "u"):
    """u [..., features] as an array (a nested list is converted), checked against the
    parameters' input size."""
    return _checks.features(name, u, params["D"].shape[0])


def zero_state(batch_shape: tuple[int, ...], d_state: int) -> jax.Array:
    return jnp.zeros((*batch_shape, d_state), jnp.complex64)


def forward(
    params: Params,
    u: jax.Array,
    h0: jax.Array | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    resets: jax.Array | None = None,
    method: str = "auto",
    sequence_axis: str | None = None,
    scan_table=None,
) -> tuple[jax.Array, jax.Array]:
    """The LRU over a whole sequence, in parallel where `method` allows.

    Args:
      params: LRU parameters (see `init`).
      u: [time, ..., H] real inputs, time-major; usually [time, batch, H].
      h0: optional [..., N] complex initial state.
      seq_lengths: optional int [batch] for u [time, batch, H]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: run from the last (valid) step to the first.
      resets: optional bool [time, ...]: restart the state from zero at these steps.
      method: a `linear_scan` method.
      sequence_axis: optional mesh axis to split time over (`linear_scan`'s sequence
        parallelism; needs `jax.set_mesh`).
      scan_table: optional `lru_jax.scan_table.ScanTable` that an "auto" `method` chooses from.

    Returns:
      (y [time, ..., H], h_last [..., N]): outputs and the final state.
    """
    u = check_input(params, u)
    seq_lengths = _checks.time_major("u", u, seq_lengths)
    if h0 is None:
        h0 = zero_state(u.shape[1:-1], params["nu_log"].shape[0])

    def run(u, resets, reverse):
        hs = scan.linear_scan(
            eigenvalues(params),
            input_term(params, u),
            h0,
            method=method,
            reverse=reverse,
            sequence_axis=sequence_axis,
            resets=resets,
            scan_table=scan_table,
        )
        return hs, readout(params, hs, u)

    return padding.run_within_lengths(run, u, seq_lengths, h0, reverse=reverse, resets=resets)


def step(params: Params, h: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step for generation: h [..., N] complex, u [..., H] -> (h', y [..., H])."""
    h = eigenvalues(params) * h + input_term(params, u)
    return h, readout(params, h, u)
