"""Gradient flow made visible: vanishing and exploding gradients in recurrent models.

Backpropagation through n steps multiplies by the recurrent Jacobian n times. This module
measures the pieces of that product:

- `jacobian_norms` / `jacobian_products`: ‖∂h_T/∂h_t‖₂ against the distance T - t for any
  recurrent step function (a cell, the LRU, a hand-written linear RNN), as the product of
  per-step Jacobians accumulated backwards from T;
- `step_spectra`: spectral radius and norm of the one-step Jacobian ∂h_t/∂h_{t-1} at the
  states a batch visits; `lru_spectrum`: |λ| and phase of an LRU layer;
- `state_gradients` / `hidden_state_grads`: ∂L/∂h_t (and its norm) for the state of every
  recurrent layer at every step of a model, by adding a zero probe to the state after each
  step and differentiating with respect to it (a flax method interceptor swaps in the probed
  recurrence, so any model built from `lru_jax.nn` layers works unchanged);
- `model_diagnostics`: all of the above for a model and a batch, as a JSON-able dict.

Per-parameter-group gradient norms during training are `lru_jax.training.optim.group_norms`,
logged by the train step as `grad_norm/<group>`.

Step functions act on ONE sequence: `step(carry, x_t) -> carry`, with `carry` a pytree of
1-D real arrays (the LRU's complex state as a (real, imag) pair) and x_t [in]. Batches are
handled with `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lru_jax import _checks, cells, lru, scan
from lru_jax import nn as lnn

Step = Callable  # (carry, x [in]) -> carry


def cell_step(cell: cells.Cell, params) -> Step:
    """The carry update of a functional cell: (carry, x [in]) -> carry."""
    return lambda carry, x: cell.step(params, carry, x)[0]


def lru_step(params) -> Step:
    """The LRU's state update on a (real [N], imag [N]) pair: h' = λ ⊙ h + γ ⊙ (B u)."""

    def step(carry, u):
        h, _ = lru.step(params, jax.lax.complex(*carry), u)
        return h.real, h.imag

    return step


def step_jacobian(step: Step, carry, x) -> jax.Array:
    """∂carry'/∂carry [D, D] at (carry, x), D the carry's total size (leaves in tree order)."""
    flat, unravel = ravel_pytree(carry)
    return jax.jacfwd(lambda v: ravel_pytree(step(unravel(v), x))[0])(flat)


def _check_sequence(carry0, xs) -> None:
    _checks.floating("xs", xs, allow_complex=False)
    if np.ndim(xs) < 1 or np.shape(xs)[0] < 1:
        raise ValueError(f"xs: expected [time >= 1, ...] inputs, got shape {np.shape(xs)}")
    for leaf in jax.tree.leaves(carry0):
        _checks.floating("carry0", leaf, allow_complex=False)
        _checks.rank("carry0", leaf, 1, "[state] per leaf (one sequence; vmap for batches)")


def _states_before_each_step(step: Step, carry0, xs):
    """The carry entering each step: leaves [T, ...] (h_0 .. h_{T-1})."""

    def advance(carry, x):
        return step(carry, x), carry

    _, before = jax.lax.scan(advance, carry0, xs)
    return before


def _backward_products(step: Step, carry0, xs, reduce: Callable):
    """reduce(∂h_T/∂h_{T-d}) for d = 0..T, accumulating M ← M J_s from s = T down to 1."""
    before = _states_before_each_step(step, carry0, xs)
    size = ravel_pytree(carry0)[0].shape[0]
    eye = jnp.eye(size, dtype=ravel_pytree(carry0)[0].dtype)

    def back(m, inputs):
        carry, x = inputs
        m = m @ step_jacobian(step, carry, x)
        return m, reduce(m)

    _, out = jax.lax.scan(back, eye, (before, xs), reverse=True)
    out = jax.tree.map(lambda a: a[::-1], out)  # scan order s = 1..T is d = T..1
    return jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), reduce(eye), out)


def jacobian_products(step: Step, carry0, xs) -> jax.Array:
    """∂h_T/∂h_{T-d} for d = 0..T: [T + 1, D, D] (d = 0 is the identity).

    Args:
      step: (carry, x [in]) -> carry for one sequence (see `cell_step`, `lru_step`).
      carry0: the initial carry h_0, a pytree of [state] leaves, D their total size.
      xs: [T, in] inputs x_1 .. x_T.
    """
    _check_sequence(carry0, xs)
    return _backward_products(step, carry0, xs, lambda m: m)


def jacobian_norms(step: Step, carry0, xs) -> jax.Array:
    """‖∂h_T/∂h_{T-d}‖₂ (largest singular value) for d = 0..T: [T + 1].

    Memory is O(T D + D²): the products are reduced to their norms as they are formed.
    Arguments as `jacobian_products`.
    """
    _check_sequence(carry0, xs)
    return _backward_products(step, carry0, xs, lambda m: jnp.linalg.norm(m, ord=2))


def step_spectra(step: Step, carry0, xs, every: int = 1) -> dict[str, np.ndarray]:
    """Spectral radius max|eig J_t| and norm ‖J_t‖₂ of the one-step Jacobian J_t = ∂h_t/∂h_{t-1}
    at the states the sequence visits, for t = 1, 1 + every, ...: each [ceil(T / every)].

    Arguments as `jacobian_products`. Eigenvalues are computed with numpy on the host.
    """
    _check_sequence(carry0, xs)
    _checks.positive_int("every", every)
    before = _states_before_each_step(step, carry0, xs)
    picked = jax.tree.map(lambda a: a[::every], before)
    jacs = np.asarray(jax.vmap(lambda c, x: step_jacobian(step, c, x))(picked, xs[::every]))
    return {
        "spectral_radius": np.abs(np.linalg.eigvals(jacs)).max(axis=-1),
        "spectral_norm": np.linalg.norm(jacs, ord=2, axis=(-2, -1)),
    }


def lru_spectrum(params) -> dict[str, np.ndarray]:
    """|λ| [N] and phase arg λ in (-π, π] [N] of an LRU layer's eigenvalues."""
    lam = np.asarray(lru.eigenvalues(params))
    return {"abs": np.abs(lam), "phase": np.angle(lam)}


# --- models -------------------------------------------------------------------------------

RECURRENT_LAYERS = (lnn.RecurrentLayer, lnn.LRU)


@dataclasses.dataclass
class LayerCall:
    """One call of a recurrent layer inside a model.

    path: the layer's module path, e.g. "blocks_0/mixer"; kind: "lru" or the cell name;
    params: its parameters; inputs: [batch, time, in] what it was given; reverse: its direction.
    """

    path: str
    kind: str
    params: dict
    inputs: jax.Array
    reverse: bool
    cell: cells.Cell | None  # None for the LRU


def _is_layer_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, RECURRENT_LAYERS)


def _path(module) -> str:
    return "/".join(module.path)


def _lengths(call_args, call_kwargs):
    return call_args[1] if len(call_args) > 1 else call_kwargs.get("seq_lengths")


def layer_calls(model: nn.Module, variables, inputs, *args, **kwargs) -> list[LayerCall]:
    """Every recurrent layer (`lru_jax.nn` RecurrentLayer or LRU) that `model.apply(variables,
    inputs, *args, **kwargs)` runs, with its parameters and inputs, in call order.

    The layers must run on full-length sequences: a layer given `seq_lengths` is a ValueError.
    """
    calls = []

    def record(next_fun, call_args, call_kwargs, context):
        if _is_layer_call(context) and _lengths(call_args, call_kwargs) is not None:
            raise ValueError(
                "seq_lengths: the diagnostics need full-length sequences (no padding), got "
                f"lengths for {_path(context.module)}"
            )
        out = next_fun(*call_args, **call_kwargs)
        if _is_layer_call(context):
            module = context.module
            is_lru = isinstance(module, lnn.LRU)
            calls.append(
                LayerCall(
                    _path(module),
                    "lru" if is_lru else module.cell,
                    dict(module.variables["params"]),
                    call_args[0],
                    bool(call_kwargs.get("reverse", False)),
                    None if is_lru else module.make_cell(),
                )
            )
        return out

    with nn.intercept_methods(record):
        model.apply(variables, inputs, *args, **kwargs)
    if not calls:
        raise ValueError(
            f"model: expected a model with lru_jax.nn recurrent layers, found none in "
            f"{type(model).__name__}"
        )
    return calls


def _probe_shapes(call: LayerCall) -> object:
    """Zero probes for a layer's state at every step: leaves [time, batch, state]."""
    batch, time = call.inputs.shape[:2]
    if call.cell is None:
        n = call.params["nu_log"].shape[0]
        return (jnp.zeros((time, batch, n)), jnp.zeros((time, batch, n)))  # real, imag
    carry = call.cell.zero_carry((batch,), cells.hidden_size(call.params))
    return jax.tree.map(lambda c: jnp.zeros((time, *c.shape), c.dtype), carry)


def _probed_layer(module, params, x, initial_carry, reverse: bool, probes):
    """The layer's forward with probes[t] added to the state after step t: (carry, y).

    x: [batch, time, in]; probes: leaves [time, batch, state] in processing order. With zero
    probes this equals the layer's own output (tests check it).
    """
    xs = jnp.swapaxes(x, 0, 1)
    if reverse:
        xs = xs[::-1]
    if isinstance(module, lnn.LRU):
        # h_t = λ h_{t-1} + (γ B u_t + p_t): the probe enters with the input term.
        b = lru.input_term(params, xs) + jax.lax.complex(*probes)
        h0 = (
            initial_carry
            if initial_carry is not None
            else lru.zero_state(b.shape[1:-1], b.shape[-1])
        )
        hs = scan.linear_scan(
            lru.eigenvalues(params),
            b,
            h0,
            method=module.scan_method,
            scan_table=module.scan_table,
        )
        carry, ys = hs[-1], lru.readout(params, hs, xs)
    else:
        cell = module.make_cell()
        if initial_carry is None:
            initial_carry = cell.zero_carry((xs.shape[1],), cells.hidden_size(params), xs.dtype)

        def step(carry, inputs):
            projected, probe = inputs
            carry, _ = cell.recur(params, carry, projected)
            carry = jax.tree.map(jnp.add, carry, probe)
            return carry, jax.tree.leaves(carry)[-1]  # the output is h: the carry's last leaf

        carry, ys = jax.lax.scan(step, initial_carry, (cell.project(params, xs), probes))
    if reverse:
        ys = ys[::-1]
    return carry, jnp.swapaxes(ys, 0, 1)


def state_gradients(
    model: nn.Module, variables, inputs, loss_fn: Callable, *args, **kwargs
) -> dict[str, object]:
    """∂L/∂h_t for the recurrent state h_t of every recurrent layer: {path: carry-shaped pytree
    with leaves [batch, time, state]} (the LRU's as a (real, imag) pair).

    L = loss_fn(model.apply(variables, inputs, *args, **kwargs)), a scalar. Each layer's call
    is replaced (through a flax method interceptor) by the same recurrence with a zero probe
    p_t added to the state after step t; ∂L/∂p_t = ∂L/∂h_t, the gradient arriving at step t
    through every later step and layer. The state is the full carry: h for SimpleRNN and GRU,
    (c, h) for the LSTM, the complex state (real and imaginary parts) for the LRU. Time is the
    input position, also for layers run in reverse. Layers must run on full-length sequences
    (no `seq_lengths`).
    """
    calls = {call.path: call for call in layer_calls(model, variables, inputs, *args, **kwargs)}
    zeros = {path: _probe_shapes(call) for path, call in calls.items()}

    def loss_of_probes(probes):
        def probed(next_fun, call_args, call_kwargs, context):
            if not _is_layer_call(context):
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            next_fun(*call_args, **call_kwargs)  # binds the layer's parameters
            carry, y = _probed_layer(
                module,
                module.variables["params"],
                call_args[0],
                call_kwargs.get("initial_carry"),
                bool(call_kwargs.get("reverse", False)),
                probes[_path(module)],
            )
            return (carry, y) if call_kwargs.get("return_carry", False) else y

        with nn.intercept_methods(probed):
            return loss_fn(model.apply(variables, inputs, *args, **kwargs))

    grads = jax.jit(jax.grad(loss_of_probes))(zeros)

    def batch_major(path, leaf):  # [time, batch, state] in processing order -> input order
        leaf = jnp.swapaxes(leaf, 0, 1)
        return leaf[:, ::-1] if calls[path].reverse else leaf

    return {p: jax.tree.map(lambda leaf, p=p: batch_major(p, leaf), g) for p, g in grads.items()}


def hidden_state_grads(
    model: nn.Module, variables, inputs, loss_fn: Callable, *args, **kwargs
) -> dict[str, jax.Array]:
    """‖∂L/∂h_t‖ over the whole state (see `state_gradients`): {path: [batch, time]}."""
    grads = state_gradients(model, variables, inputs, loss_fn, *args, **kwargs)
    return {
        path: jnp.sqrt(sum(jnp.sum(jnp.square(leaf), axis=-1) for leaf in jax.tree.leaves(g)))
        for path, g in grads.items()
    }


def layer_step(call: LayerCall) -> tuple[Step, Callable[[], object]]:
    """(step, zero_carry) for a recorded layer: the functional form of its recurrence."""
    if call.kind == "lru":
        n = call.params["nu_log"].shape[0]
        return lru_step(call.params), lambda: (jnp.zeros((n,)), jnp.zeros((n,)))
    hidden = cells.hidden_size(call.params)
    return cell_step(call.cell, call.params), lambda: call.cell.zero_carry((), hidden)


def layer_jacobian_norms(call: LayerCall, num_examples: int) -> np.ndarray:
    """‖∂h_T/∂h_{T-d}‖₂ [num_examples, T + 1] of a recorded layer on its first examples."""
    step, zero = layer_step(call)
    xs = call.inputs[:num_examples]
    if call.reverse:
        xs = xs[:, ::-1]
    carry0 = zero()
    return np.asarray(jax.jit(jax.vmap(lambda x: jacobian_norms(step, carry0, x)))(xs))


def layer_spectrum(call: LayerCall, num_examples: int, every: int) -> dict[str, np.ndarray]:
    """The layer's |λ| and phase (LRU), or one-step Jacobian spectra [examples, steps] (cells)."""
    if call.kind == "lru":
        return lru_spectrum(call.params)
    step, zero = layer_step(call)
    per_example = [
        step_spectra(step, zero(), x[::-1] if call.reverse else x, every)
        for x in call.inputs[:num_examples]
    ]
    return {k: np.stack([s[k] for s in per_example]) for k in per_example[0]}


def geometric_mean(norms: np.ndarray, axis: int = 0) -> np.ndarray:
    """exp(mean(log x)) over `axis`, the natural average of quantities that span decades.

    Zeros (underflow) give 0 and infinities give inf."""
    with np.errstate(divide="ignore"):
        return np.exp(np.mean(np.log(np.asarray(norms, np.float64)), axis=axis))


def model_diagnostics(
    model: nn.Module,
    variables,
    inputs,
    loss_fn: Callable,
    *args,
    num_examples: int = 4,
    spectrum_every: int = 10,
    **kwargs,
) -> dict:
    """Every diagnostic of a model on one batch, as a JSON-able dict keyed by layer path.

    Args:
      model, variables: a Flax model and its variables.
      inputs: the batch's inputs (as `model.apply` takes them).
      loss_fn: model outputs -> scalar loss.
      num_examples: how many of the batch's sequences the Jacobian diagnostics use.
      spectrum_every: one-step Jacobian spectra at every this many steps.

    Returns:
      {"layers": {path: {"kind", "reverse", "grad_norm_per_step" [time] (batch mean of
      ‖∂L/∂h_t‖), "jacobian_norm_by_distance" [time + 1] (geometric mean over examples),
      "spectrum": {...}}}}.
    """
    _checks.positive_int("num_examples", num_examples)
    _checks.positive_int("spectrum_every", spectrum_every)
    calls = layer_calls(model, variables, inputs, *args, **kwargs)
    grads = hidden_state_grads(model, variables, inputs, loss_fn, *args, **kwargs)
    layers = {}
    for call in calls:
        norms = layer_jacobian_norms(call, num_examples)
        spectrum = layer_spectrum(call, num_examples, spectrum_every)
        layers[call.path] = {
            "kind": call.kind,
            "reverse": call.reverse,
            "grad_norm_per_step": np.asarray(grads[call.path]).mean(axis=0).tolist(),
            "jacobian_norm_by_distance": geometric_mean(norms).tolist(),
            "spectrum": {k: np.asarray(v).tolist() for k, v in spectrum.items()},
        }
    return {"layers": layers}
