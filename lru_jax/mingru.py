"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"), as pure functions.

Gates depend on the input only, so both are diagonal linear recurrences. With model width H
and state size N:

    minGRU:   z_t = σ(W_z x_t + b_z)                                     [N]
              h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t
    minLSTM:  f_t = σ(W_f x_t + b_f),  i_t = σ(W_i x_t + b_i)            [N]
              f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)         (f' + i' = 1)
              h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t
    both:     h̃_t = act(W_h x_t + b_h)                                   [N]
              y_t = W_out h_t  if `proj_out` ([H, N]; the default when N != H), else h_t

`act` is "g", the paper's g(v) = v + 1/2 for v >= 0 and σ(v) for v < 0 (positive, so that the
state has a logarithm), or "linear", the paper's plain h̃_t = W_h x_t + b_h.

Each is h_t = a_t ⊙ h_{t-1} + b_t with a_t = 1 − z_t (f'_t) and b_t = z_t ⊙ h̃_t (i'_t ⊙ h̃_t),
computed in one of two forms that give the same h (tested):

- plain (`log_space=False`): a and b through `scan.linear_scan` (any of its methods);
- log space (`log_space=True`), the paper's parallel form (appendix B.3): log a_t = −softplus(k_t)
  for minGRU's gate pre-activation k_t, log f'_t = log f_t − logaddexp(log f_t, log i_t) for
  minLSTM, log b_t = log z_t (log i'_t) + log g(W_h x_t + b_h), through `scan.log_linear_scan`.
  It needs act "g" and h0 >= 0.

Parameters are float32: W_h, W_z (minGRU) or W_f, W_i (minLSTM) [N, H], uniform in ±1/sqrt(H)
(PyTorch's Linear); their biases b_* [N], zero (the paper's); W_out [H, N], uniform in
±1/sqrt(N). With `max_timescale` T the gate biases start instead with chrono initialisation
(Tallec and Ollivier 2018): unit n keeps its state with odds u_n ~ U(1, T − 1) at x = 0, a
memory of 1 + u_n steps, instead of the zero biases' two steps (`chrono_log_odds`).

Precision: the matmuls run in x's dtype (`dense` casts the weights), the gates, a, b and the
state in float32 whatever x's dtype; y comes back in x's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, padding, scan

Params = dict[str, jax.Array]

CELLS = ("mingru", "minlstm")
ACTIVATIONS = ("g", "linear")
# the gates of each cell, besides the candidate state h
GATES = {"mingru": ("z",), "minlstm": ("f", "i")}


def param_names(cell: str, proj_out: bool) -> list[str]:
    """The parameter names of `cell`, in `init`'s order."""
    names = [n for gate in ("h", *GATES[cell]) for n in (f"W_{gate}", f"b_{gate}")]
    return names + (["W_out"] if proj_out else [])


def check_cell(cell: str, d_model: int, d_state: int, proj_out: bool | None) -> bool:
    """Checks the settings; returns whether there is an output projection."""
    _checks.one_of("cell", cell, CELLS)
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_state", d_state)
    proj_out = d_state != d_model if proj_out is None else _checks.boolean("proj_out", proj_out)
    if not proj_out and d_state != d_model:
        raise ValueError(
            _checks.message("d_state", f"d_model={d_model} without proj_out", str(d_state))
        )
    return proj_out


def uniform(key, shape, fan_in):
    """PyTorch's Linear initialisation: uniform in ±1/sqrt(fan_in), float32."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def dense(x, w, b=None):
    """x [..., in] @ w.T (+ b), the leading axes flattened: XLA:CPU runs [M, in] matmuls
    faster than [time, batch, in] ones (see lru.input_term).

    Computed in x's dtype: w and b are cast to it (float32 parameters, bfloat16 activations:
    a bfloat16 matmul), as Flax's Dense casts its kernel to the compute dtype."""
    flat = x.reshape(-1, x.shape[-1]) @ w.T.astype(x.dtype)
    flat = flat if b is None else flat + b.astype(x.dtype)
    return flat.reshape(x.shape[:-1] + flat.shape[-1:])


def check_max_timescale(
    max_timescale, name: str = "max_timescale", *, type_error=TypeError
) -> float:
    """0 (the papers' zero gate biases) or a chrono initialisation's longest memory T > 2."""
    expected = "0 (zero gate biases) or a number > 2 (the chrono initialisation's T)"
    _checks.number(name, max_timescale, 0, expected=expected, type_error=type_error)
    if 0 < max_timescale <= 2:
        _checks.fail(name, expected, max_timescale)
    return max_timescale


def chrono_log_odds(init_key, size: int, max_timescale: float) -> jax.Array:
    """log u [size], u ~ U(1, T − 1): the log-odds of keeping the state that give a gated unit
    a memory of 1 + u steps at zero input (Tallec and Ollivier 2018, "Can recurrent neural
    networks warp time?"), so that gradients reach back up to T steps from the start.

    Drawn from a key folded out of the layer's `init_key`, never one of the keys its other
    parameters use: with or without chrono, the weights are those of the same key."""
    key = jax.random.fold_in(init_key, 1)
    u = jax.random.uniform(key, (size,), jnp.float32, 1.0, max_timescale - 1.0)
    return jnp.log(u)


def init(
    key,
    d_model: int,
    d_state: int | None = None,
    *,
    cell: str = "mingru",
    proj_out=None,
    max_timescale: float = 0.0,
) -> Params:
    """Fresh parameters of `cell` ("mingru" | "minlstm") for width H = d_model and state size
    N = d_state (default H); `proj_out` (default N != H) adds W_out; `max_timescale` T > 2
    starts the gate biases with chrono initialisation (see the module; 0: zero biases)."""
    d_state = d_model if d_state is None else d_state
    proj_out = check_cell(cell, d_model, d_state, proj_out)
    check_max_timescale(max_timescale)
    gates = ("h", *GATES[cell])
    keys = jax.random.split(key, len(gates) + 1)
    params = {}
    for k, gate in zip(keys, gates, strict=False):
        params[f"W_{gate}"] = uniform(k, (d_state, d_model), d_model)
        params[f"b_{gate}"] = jnp.zeros((d_state,), jnp.float32)
    if proj_out:
        params["W_out"] = uniform(keys[-1], (d_model, d_state), d_state)
    if max_timescale:
        log_odds = chrono_log_odds(key, d_state, max_timescale)
        if cell == "mingru":  # keep: 1 − z = σ(−b_z)
            params["b_z"] = -log_odds
        else:  # keep: f' = σ(b_f) / (σ(b_f) + σ(b_i)) = σ(b_f) when b_i = −b_f
            params["b_f"], params["b_i"] = log_odds, -log_odds
    return params


def cell_of(params: Params) -> str:
    """ "mingru" or "minlstm", from the parameters' names."""
    return "mingru" if "W_z" in params else "minlstm"


def g(v):
    """The paper's positive activation: v + 1/2 for v >= 0, σ(v) below."""
    return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


def log_g(v):
    """log g(v), without forming g(v) where that would lose precision (σ of very negative v)."""
    return jnp.where(v >= 0, jnp.log(jax.nn.relu(v) + 0.5), -jax.nn.softplus(-v))


def _linear(params, x, gate):
    """W_gate x + b_gate: x [..., H] -> [..., N], in x's dtype."""
    return dense(x, params[f"W_{gate}"], params[f"b_{gate}"])


def _gate(params, x, gate):
    """A gate's pre-activation W_gate x + b_gate [..., N] in float32: the matmul runs in x's
    dtype, the decay made from it in float32 (1 − z near 1 is not representable in bfloat16)."""
    return _linear(params, x, gate).astype(jnp.float32)


def log_gates(params: Params, x) -> tuple[jax.Array, jax.Array]:
    """(log a, log of the input gate) [..., N]: minGRU's (log(1 − z), log z), minLSTM's
    (log f', log i'), from x [..., H]."""
    if cell_of(params) == "mingru":
        k = _gate(params, x, "z")
        return -jax.nn.softplus(k), -jax.nn.softplus(-k)
    log_f = -jax.nn.softplus(-_gate(params, x, "f"))
    log_i = -jax.nn.softplus(-_gate(params, x, "i"))
    total = jnp.logaddexp(log_f, log_i)
    return log_f - total, log_i - total


def terms(params: Params, x, activation: str = "g") -> tuple[jax.Array, jax.Array]:
    """The plain form's (a, b) [..., N] of h_t = a_t h_{t-1} + b_t, from x [..., H]."""
    log_a, log_gate = log_gates(params, x)
    candidate = _linear(params, x, "h")
    candidate = g(candidate) if activation == "g" else candidate
    return jnp.exp(log_a), jnp.exp(log_gate) * candidate


def log_terms(params: Params, x) -> tuple[jax.Array, jax.Array]:
    """The log-space form's (log a, log b) [..., N], from x [..., H] (act "g")."""
    log_a, log_gate = log_gates(params, x)
    return log_a, log_gate + log_g(_gate(params, x, "h"))


def readout(params: Params, h):
    """y = W_out h (or h itself without W_out): h [..., N] -> [..., H], in h's dtype (the
    callers cast the float32 state to the input's dtype first)."""
    return dense(h, params["W_out"]) if "W_out" in params else h


def check_input(params: Params, x, name: str = "x"):
    """x [..., features] as an array (a nested list is converted), checked against the
    parameters' input size."""
    return _checks.features(name, x, params["W_h"].shape[1])


def check_form(log_space: bool, activation: str) -> None:
    _checks.boolean("log_space", log_space)
    _checks.one_of("activation", activation, ACTIVATIONS)
    if log_space and activation != "g":
        raise ValueError(
            _checks.message(
                "activation", "'g' with log_space=True (the log form needs h̃ > 0)", repr(activation)
            )
        )


def _log_state(h0):
    """log h0 for h0 >= 0: -inf where h0 = 0, with a zero (not nan) derivative there."""
    positive = h0 > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, h0, 1.0)), -jnp.inf)


def _check_log_h0(h0) -> None:
    if _checks.is_concrete(h0) and np.any(np.asarray(h0) < 0):
        raise ValueError(
            _checks.message(
                "h0", "a state >= 0 for the log-space form", f"min {np.min(np.asarray(h0))}"
            )
        )


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
    log_space: bool = False,
    activation: str = "g",
) -> tuple[jax.Array, jax.Array]:
    """minGRU or minLSTM (by `params`) over a whole sequence, in parallel where `method` allows.

    Args:
      params: from `init`.
      x: [time, ..., H] real inputs, time-major; usually [time, batch, H].
      h0: optional [..., N] float32 state before the first step (>= 0 for `log_space`).
      seq_lengths: optional int [batch] for x [time, batch, H]: outputs past a length are zero
        and the returned state is the one after the last valid step.
      reverse: run from the last (valid) step to the first.
      resets: optional bool [time, ...]: restart the state from zero at these steps.
      method: a `linear_scan` method (plain form) or a `log_linear_scan` one (log space).
      scan_table: optional `ScanTable` that the plain form's "auto" chooses from.
      log_space: the paper's log-space form instead of the plain one (see the module).
      activation: "g" | "linear", the candidate state's (see the module).

    Returns:
      (y [time, ..., H], h_last [..., N]): outputs and the final state.
    """
    x = check_input(params, x)
    check_form(log_space, activation)
    seq_lengths = _checks.time_major("x", x, seq_lengths)
    if h0 is not None and log_space:
        _check_log_h0(h0)

    def run(u, resets, reverse):
        if log_space:
            log_a, log_b = log_terms(params, u)
            log_h0 = None if h0 is None else _log_state(h0)
            hs = scan.log_linear_scan(
                log_a, log_b, log_h0, method=method, reverse=reverse, resets=resets
            )
        else:
            a, b = terms(params, u, activation)
            hs = scan.linear_scan(
                a, b, h0, method=method, reverse=reverse, resets=resets, scan_table=scan_table
            )
        return hs, readout(params, hs.astype(u.dtype))

    h_empty = jnp.zeros(x.shape[1:-1] + (params["W_h"].shape[0],), jnp.float32)
    h_empty = h_empty if h0 is None else h0
    return padding.run_within_lengths(run, x, seq_lengths, h_empty, reverse=reverse, resets=resets)


def step(params: Params, h, x, activation: str = "g") -> tuple[jax.Array, jax.Array]:
    """One step for generation: h [..., N], x [..., H] -> (h', y [..., H]); the same h' for
    either form."""
    a, b = terms(params, x, activation)
    h = a * h + b
    return h, readout(params, h.astype(x.dtype))
