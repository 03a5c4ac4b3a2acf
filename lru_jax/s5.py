"""The S5 layer (Smith, Warrington and Linderman 2023, "Simplified State Space Layers for
Sequence Modeling"), a diagonalised MIMO state space model, as pure functions.

With model width H and (the paper's) latent size P, the continuous system dx/dt = A x + B u,
y = C x + D u is written in the eigenbasis of A = V Λ V⁻¹, learned there, and discretised with a
learned timescale Δ_p per state:

    Λ = Λ_re + i Λ_im                                   [P']     diagonal state matrix
    B̃ = V⁻¹ B,  C̃ = C V                                 [P', H], [H, P']  complex
    Δ = exp(log_step)                                   [P']
    zoh:       Λ̄ = exp(ΛΔ),                  B̄ = (Λ̄ − 1)/Λ ⊙ B̃
    bilinear:  Λ̄ = (1 + ΔΛ/2)/(1 − ΔΛ/2),   B̄ = Δ/(1 − ΔΛ/2) ⊙ B̃
    x_t = Λ̄ ⊙ x_{t-1} + B̄ u_t                           [P']     complex64
    y_t = s · Re(C̃ x_t) + D ⊙ u_t                       [H]

Conjugate symmetry (`conj_sym`, the paper's default): A is real, so its eigenvalues come in
conjugate pairs and so do the modes of a real system; only one of each pair is kept (P' = P/2)
and s = 2. Without it P' = P and s = 1.

Initialisation: A is HiPPO-N, the normal part of HiPPO-LegS (A_LegS + p pᵀ, p_k = sqrt(k + 1/2)),
whose eigenvalues all have real part −1/2; with `blocks` = J it is block-diagonal, J copies of
HiPPO-N of size P/J (the paper's block initialisation), and V is block-diagonal too. B [P, H]
is real with variance 1/H and C [H, P] real with variance 1/P, so at initialisation the
conjugate-symmetric layer is exactly the real system (A, B, C, D) in its eigenbasis; D ~ N(0, 1);
log_step uniform in [log dt_min, log dt_max] (paper: 0.001, 0.1).

Parameters (float32): Lambda_re, Lambda_im [P'], B_re, B_im [P', H], C_re, C_im [H, P'],
D [H], log_step [P']. The recurrence runs through `scan.linear_scan` with Λ̄ time-invariant.

Precision: as the LRU's (`lru.complex_input`, `lru.readout`): the matmuls in u's dtype, Λ̄, B̄
and the complex64 state in float32 whatever u's dtype; y comes back in u's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, lru, padding, scan

Params = dict[str, jax.Array]

PARAM_NAMES = ("Lambda_re", "Lambda_im", "B_re", "B_im", "C_re", "C_im", "D", "log_step")
DISCRETIZATIONS = ("zoh", "bilinear")


def check_options(d_state, blocks, conj_sym, dt_min, dt_max, discretization) -> None:
    """The layer's settings: P = d_state split into `blocks` blocks of even size with conj_sym
    (each keeps one of its eigenvalues' conjugate pairs), 0 < dt_min <= dt_max."""
    _checks.positive_int("d_state", d_state)
    _checks.positive_int("blocks", blocks)
    _checks.boolean("conj_sym", conj_sym)
    if d_state % blocks:
        _checks.fail("blocks", f"a divisor of d_state {d_state}", blocks)
    if conj_sym and (d_state // blocks) % 2:
        expected = f"a multiple of 2 x blocks = {2 * blocks} with conj_sym (even blocks)"
        _checks.fail("d_state", expected, d_state)
    _checks.positive_number("dt_min", dt_min)
    _checks.positive_number("dt_max", dt_max)
    if dt_min > dt_max:
        _checks.fail("dt_min, dt_max", "0 < dt_min <= dt_max", (dt_min, dt_max))
    _checks.one_of("discretization", discretization, DISCRETIZATIONS)


def hippo_n(n: int) -> np.ndarray:
    """HiPPO-N [n, n] float64: HiPPO-LegS plus the rank-one term p pᵀ that makes it normal."""
    q = np.sqrt(2.0 * np.arange(n) + 1.0)
    legs = -(np.tril(np.outer(q, q), -1) + np.diag(np.arange(n) + 1.0))
    p = np.sqrt(np.arange(n) + 0.5)
    return legs + np.outer(p, p)


def hippo_n_eig(n: int, conj_sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """(Λ [m], V [n, m]) complex128 with hippo_n(n) V = V diag(Λ) and orthonormal columns V;
    m = n/2 with conj_sym (the eigenvalues of negative imaginary part), else n.

    HiPPO-N is −I/2 plus a skew-symmetric S, so −iS is Hermitian: `eigh` gives its real
    eigenvalues w and a unitary V, and Λ = −1/2 + i w with the real part exact (a general
    `eig` of the non-symmetric matrix gives neither).
    """
    skew = hippo_n(n) + 0.5 * np.eye(n)
    w, v = np.linalg.eigh(-1j * skew)  # ascending: the negative halves of the ± pairs first
    keep = n // 2 if conj_sym else n
    return -0.5 + 1j * w[:keep], v[:, :keep]


def eigenbasis(d_state: int, blocks: int = 1, conj_sym: bool = True):
    """(Λ [P'], V [P, P']) complex128 of the block-diagonal HiPPO-N with `blocks` equal blocks."""
    lam, v = hippo_n_eig(d_state // blocks, conj_sym)
    return np.tile(lam, blocks), np.kron(np.eye(blocks), v)


def init(
    key,
    d_model: int,
    d_state: int,
    blocks: int = 1,
    conj_sym: bool = True,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
) -> Params:
    """Fresh S5 parameters for width H = d_model and latent size P = d_state."""
    _checks.positive_int("d_model", d_model)
    check_options(d_state, blocks, conj_sym, dt_min, dt_max, "zoh")
    h, p = d_model, d_state
    lam, v = eigenbasis(p, blocks, conj_sym)
    v = jnp.asarray(v, jnp.complex64)
    k = jax.random.split(key, 4)
    b = jax.random.normal(k[0], (p, h), jnp.float32) / math.sqrt(h)
    c = jax.random.normal(k[1], (h, p), jnp.float32) / math.sqrt(p)
    b_tilde = v.conj().T @ b  # V⁻¹ = V^H: V's columns are orthonormal
    c_tilde = c @ v
    log_step = jax.random.uniform(
        k[3], (lam.size,), jnp.float32, math.log(dt_min), math.log(dt_max)
    )
    return {
        "Lambda_re": jnp.asarray(lam.real, jnp.float32),
        "Lambda_im": jnp.asarray(lam.imag, jnp.float32),
        "B_re": b_tilde.real,
        "B_im": b_tilde.imag,
        "C_re": c_tilde.real,
        "C_im": c_tilde.imag,
        "D": jax.random.normal(k[2], (h,), jnp.float32),
        "log_step": log_step,
    }


def discretize(params: Params, discretization: str = "zoh") -> tuple[jax.Array, jax.Array]:
    """(Λ̄ [P'], B̄ [P', H]) complex64 by zero-order hold or the bilinear transform."""
    lam = jax.lax.complex(params["Lambda_re"], params["Lambda_im"])
    delta = jnp.exp(params["log_step"])
    if discretization == "zoh":
        lam_bar = jnp.exp(lam * delta)
        gain = (lam_bar - 1.0) / lam
    else:
        shrink = 1.0 / (1.0 - 0.5 * delta * lam)
        lam_bar = shrink * (1.0 + 0.5 * delta * lam)
        gain = shrink * delta
    return lam_bar, gain[:, None] * jax.lax.complex(params["B_re"], params["B_im"])


def _terms(params: Params, u, discretization: str):
    """(Λ̄ [P'], B̄ u [..., P']) of x_t = Λ̄ x_{t-1} + B̄ u_t, u [..., H]."""
    lam_bar, b_bar = discretize(params, discretization)
    return lam_bar, lru.complex_input(u, b_bar.real, b_bar.imag)


def readout(params: Params, x, u, conj_sym: bool = True):
    """s Re(C̃ x) + D ⊙ u: x [..., P'] complex, u [..., H] -> [..., H]; s = 2 with conj_sym (the
    dropped conjugate modes' share), folded into C̃ rather than the [..., P'] states."""
    scale = 2.0 if conj_sym else 1.0
    c = {"C_re": scale * params["C_re"], "C_im": scale * params["C_im"], "D": params["D"]}
    return lru.readout(c, x, u)


def _check_form(conj_sym, discretization) -> None:
    _checks.boolean("conj_sym", conj_sym)
    _checks.one_of("discretization", discretization, DISCRETIZATIONS)


# the LRU's: real inputs whose width is D's; a complex64 zero state [..., P'] (P/2 with conj_sym)
check_input = lru.check_input
zero_state = lru.zero_state


def forward(
    params: Params,
    u: jax.Array,
    h0: jax.Array | None = None,
    *,
    conj_sym: bool = True,
    discretization: str = "zoh",
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    resets: jax.Array | None = None,
    method: str = "auto",
    scan_table=None,
) -> tuple[jax.Array, jax.Array]:
    """The S5 over a whole sequence, in parallel where `method` allows.

    Args:
      params: from `init`.
      u: [time, ..., H] real inputs, time-major; usually [time, batch, H].
      h0: optional [..., P'] complex initial state.
      conj_sym: the parameters keep one mode of each conjugate pair (y = 2 Re(C̃ x) + D u).
      discretization: "zoh" | "bilinear".
      seq_lengths: optional int [batch] for u [time, batch, H]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: run from the last (valid) step to the first.
      resets: optional bool [time, ...]: restart the state from zero at these steps.
      method: a `linear_scan` method.
      scan_table: optional `ScanTable` that an "auto" `method` chooses from.

    Returns:
      (y [time, ..., H], h_last [..., P'] complex64).
    """
    _check_form(conj_sym, discretization)
    u = check_input(params, u)
    seq_lengths = _checks.time_major("u", u, seq_lengths)
    h_empty = zero_state(u.shape[1:-1], params["log_step"].shape[0]) if h0 is None else h0

    def run(u, resets, reverse):
        lam_bar, bu = _terms(params, u, discretization)
        hs = scan.linear_scan(
            lam_bar, bu, h_empty, method=method, reverse=reverse, resets=resets,
            scan_table=scan_table,
        )  # fmt: skip
        return hs, readout(params, hs, u, conj_sym)

    return padding.run_within_lengths(run, u, seq_lengths, h_empty, reverse=reverse, resets=resets)


def step(
    params: Params, h, u, *, conj_sym: bool = True, discretization: str = "zoh"
) -> tuple[jax.Array, jax.Array]:
    """One step for generation: h [..., P'] complex, u [..., H] -> (h', y [..., H])."""
    _check_form(conj_sym, discretization)
    lam_bar, bu = _terms(params, u, discretization)
    h = lam_bar * h + bu
    return h, readout(params, h, u, conj_sym)
