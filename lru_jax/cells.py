"""Recurrent cells as pure functions, and `unroll`, the driver that runs one over a sequence.

A cell is a `Cell`: parameter initialisers, an input projection and a recurrent step, split
into the recurrent matmul and an elementwise `combine`:

    step(params, carry, x) = combine(params, carry, project(params, x), state_of(carry) @ w_hh)

`unroll` runs the cell under `jax.lax.scan` with one matmul per step: [x, h] against the
stacked [w_ih; w_hh] when the cell is `additive` (SimpleRNN, LSTM), x w_ih and h w_hh apart for
the GRU. Gradients are JAX's autodiff of that loop (docs/benchmarks.md says what was measured).

Parameters (fused gates, PyTorch's gate order, so weights move between the two unchanged):

    SimpleRNN  w_ih [in, H]    w_hh [H, H]    b [H]                 carry h
    LSTM       w_ih [in, 4H]   w_hh [H, 4H]   b [4H]  gates i,f,g,o  carry (c, h)
    GRU        w_ih [in, 3H]   w_hh [H, 3H]   b_ih [3H], b_hh [3H]   gates r,z,n  carry h

Initialisation: input weights LeCun-normal, recurrent weights orthogonal per gate, biases zero
except the LSTM forget gate bias, which starts at 1 so the cell remembers by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lru_jax import _checks
from lru_jax.scan import reverse_within_lengths, step_mask

Params = dict[str, jax.Array]
Carry = Any

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class Cell(NamedTuple):
    """A recurrent cell as pure functions.

    Attributes:
      name: "simple_rnn" | "lstm" | "gru".
      param_inits: (in_dim, hidden) -> {name: init(key) -> array}.
      project: (params, x [..., in]) -> input projection [..., gates * hidden].
      combine: (params, carry, projected, recurrent [..., gates * hidden]) -> (carry,
        y [..., hidden]), where recurrent = state_of(carry) @ w_hh; elementwise, no matmul.
      state_of: carry -> the state h [..., hidden] that multiplies w_hh.
      zero_carry: (batch_shape, hidden, dtype) -> the all-zero carry.
      additive: `combine` sees only projected + recurrent, so the two matmuls can be one:
        [x, h] @ [w_ih; w_hh] (SimpleRNN, LSTM; not the GRU, whose n gate needs them apart).
    """

    name: str
    param_inits: Callable[[int, int], dict[str, Callable]]
    project: Callable[[Params, jax.Array], jax.Array]
    combine: Callable[[Params, Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]]
    state_of: Callable[[Carry], jax.Array]
    zero_carry: Callable[..., Carry]
    additive: bool = False

    def init(self, key: jax.Array, in_dim: int, hidden: int) -> Params:
        """Returns freshly initialised parameters (float32)."""
        _checks.positive_int("in_dim", in_dim)
        _checks.positive_int("hidden", hidden)
        inits = self.param_inits(in_dim, hidden)
        keys = jax.random.split(key, len(inits))
        return {name: init(k) for (name, init), k in zip(inits.items(), keys, strict=True)}

    def recur(self, params: Params, carry: Carry, xp: jax.Array) -> tuple[Carry, jax.Array]:
        """One step from the projected input xp [..., gates * hidden]."""
        return self.combine(params, carry, xp, self.state_of(carry) @ params["w_hh"])

    def step(self, params: Params, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step: x [..., in] -> (carry, y [..., hidden])."""
        return self.recur(params, carry, self.project(params, x))


def _inits(in_dim: int, hidden: int, gates: int, biases: dict[str, float]):
    def w_ih(key):
        return jax.nn.initializers.lecun_normal()(key, (in_dim, gates * hidden), jnp.float32)

    def w_hh(key):  # orthogonal per gate: each gate's recurrent map preserves norms at init
        orthogonal = jax.nn.initializers.orthogonal()
        keys = jax.random.split(key, gates)
        return jnp.concatenate([orthogonal(k, (hidden, hidden), jnp.float32) for k in keys], 1)

    def constant(value_per_gate):
        return lambda key: jnp.repeat(jnp.asarray(value_per_gate, jnp.float32), hidden)

    inits = {"w_ih": w_ih, "w_hh": w_hh}
    for name, per_gate in biases.items():
        inits[name] = constant(per_gate)
    return inits


def _hidden_zeros(batch_shape, hidden, dtype=jnp.float32):
    return jnp.zeros((*batch_shape, hidden), dtype)


def _affine(params, x):
    return x @ params["w_ih"] + params["b"]


def simple_rnn(activation: str = "tanh") -> Cell:
    """Elman RNN: h' = act(x W_ih + b + h W_hh), act in {"tanh", "relu"}."""
    _checks.one_of("activation", activation, tuple(ACTIVATIONS))
    act = ACTIVATIONS[activation]

    def combine(params, h, xp, recurrent):
        h = act(xp + recurrent)
        return h, h

    return Cell(
        "simple_rnn",
        lambda i, h: _inits(i, h, 1, {"b": [0.0]}),
        _affine,
        combine,
        _identity,
        _hidden_zeros,
        additive=True,
    )


def _identity(h):
    return h


def _lstm_combine(params, carry, xp, recurrent):
    c, _ = carry
    i, f, g, o = jnp.split(xp + recurrent, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


def _lstm_state(carry):
    return carry[1]


def lstm() -> Cell:
    """LSTM: gates i, f, g, o; c' = σ(f) c + σ(i) tanh(g); h' = σ(o) tanh(c'). Carry (c, h)."""

    def zero_carry(batch_shape, hidden, dtype=jnp.float32):
        return (_hidden_zeros(batch_shape, hidden, dtype),) * 2

    return Cell(
        "lstm",
        lambda i, h: _inits(i, h, 4, {"b": [0.0, 1.0, 0.0, 0.0]}),
        _affine,
        _lstm_combine,
        _lstm_state,
        zero_carry,
        additive=True,
    )


def _gru_project(params, x):
    return x @ params["w_ih"] + params["b_ih"]


def _gru_combine(params, h, xp, recurrent):
    x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(recurrent + params["b_hh"], 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = (1.0 - z) * n + z * h
    return h, h


def gru() -> Cell:
    """GRU: r, z = σ(.), n = tanh(x_n + r (h W_hn + b_hn)), h' = (1 - z) n + z h."""
    zeros = [0.0, 0.0, 0.0]
    return Cell(
        "gru",
        lambda i, h: _inits(i, h, 3, {"b_ih": zeros, "b_hh": zeros}),
        _gru_project,
        _gru_combine,
        _identity,
        _hidden_zeros,
    )


CELLS = {"simple_rnn": simple_rnn, "lstm": lstm, "gru": gru}


def get(name: str, **kwargs) -> Cell:
    """The cell called `name` ("simple_rnn", "lstm", "gru")."""
    _checks.one_of("cell", name, tuple(CELLS))
    return CELLS[name](**kwargs)


def hidden_size(params: Params) -> int:
    return params["w_hh"].shape[0]


def check_input(params: Params, xs, name: str = "xs") -> None:
    """Checks a float input whose last axis matches the parameters' input size."""
    _checks.floating(name, xs, allow_complex=False)
    _checks.feature_size(name, xs.shape[-1], params["w_ih"].shape[0])


def unroll(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    carry: Carry = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
) -> tuple[Carry, jax.Array]:
    """Runs `cell` over a time-major sequence with `jax.lax.scan`.

    Args:
      cell: a `Cell`, e.g. `cells.lstm()`.
      params: the cell's parameters.
      xs: [time, batch, in] float inputs.
      carry: the initial carry (zeros if None); its leaves are [batch, hidden].
      seq_lengths: optional int [batch] in [0, time]. Outputs past a length are zero, and the
        returned carry is the one after the last valid step (the initial one if the length is 0).
      reverse: run from the last valid step to the first. With `seq_lengths`, each sequence is
        reversed within its own length (as PyTorch's packed sequences and flax's `keep_order`);
        outputs stay at their input positions.
      unroll: how many steps `lax.scan` unrolls per loop iteration.

    Returns:
      (carry, ys) with ys: [time, batch, hidden].
    """
    _checks.rank("xs", xs, 3, "[time, batch, features]")
    check_input(params, xs)
    time, batch, _ = xs.shape
    seq_lengths = _checks.seq_lengths(seq_lengths, batch, time)
    _checks.positive_int("unroll", unroll)
    hidden = hidden_size(params)
    dtype = jnp.result_type(xs, params["w_hh"])
    if carry is None:
        carry = cell.zero_carry((batch,), hidden, dtype)
    else:
        _check_carry(cell, carry, batch, hidden, dtype)

    if reverse:
        xs = reverse_within_lengths(xs, seq_lengths)
    valid = step_mask(seq_lengths, time)
    carry, ys = _recurrence(cell, unroll, params, carry, xs, valid)
    if reverse:
        ys = reverse_within_lengths(ys, seq_lengths)
    return carry, ys


# Measured on XLA:CPU (docs/benchmarks.md): projecting the whole sequence before the loop made
# the forward pass slower than projecting inside it (the [time, batch, gates * hidden] array
# goes through memory), and one matmul of [x, h] with the stacked weights beat two. A
# hand-written backward pass that formed the weight gradients after the loop was no faster
# than JAX's autodiff of this loop and held 45% more memory, so gradients are JAX's own.


def _elementwise_params(params: Params) -> Params:
    """The parameters `combine` may use (biases): everything but the two weight matrices."""
    return {k: v for k, v in params.items() if k not in ("w_ih", "w_hh")}


def _step_params(cell: Cell, params: Params) -> Params:
    """What `_pre_activations` multiplies by: for additive cells w_ih is [w_ih; w_hh] (stacked
    once, before the loop)."""
    if not cell.additive:
        return params
    return dict(params, w_ih=jnp.concatenate([params["w_ih"], params["w_hh"]], 0))


def _pre_activations(cell: Cell, step_params: Params, carry, x):
    """(projected, recurrent) of one step; for additive cells one matmul and recurrent = 0."""
    h = cell.state_of(carry)
    if cell.additive:
        return cell.project(step_params, jnp.concatenate([x, h], -1)), jnp.zeros((), h.dtype)
    return cell.project(step_params, x), h @ step_params["w_hh"]


def _masked_combine(cell: Cell, params, carry, xp, recurrent, ok):
    """`cell.combine`, except that past a sequence's end (ok false) the carry stays and y is 0."""
    new_carry, y = cell.combine(params, carry, xp, recurrent)
    if ok is None:
        return new_carry, y
    new_carry = jax.tree.map(lambda n, o: jnp.where(ok[:, None], n, o), new_carry, carry)
    return new_carry, jnp.where(ok[:, None], y, jnp.zeros((), y.dtype))


def _recurrence(cell: Cell, unroll: int, params: Params, carry, xs, valid):
    """Runs the cell over xs [time, batch, in] -> (carry, ys [time, batch, hidden]).

    `valid` is None or bool [time, batch].
    """
    elementwise = _elementwise_params(params)
    step_params = _step_params(cell, params)

    def step(carry, inputs):
        x, ok = inputs
        xp, recurrent = _pre_activations(cell, step_params, carry, x)
        return _masked_combine(cell, elementwise, carry, xp, recurrent, ok)

    return jax.lax.scan(step, carry, (xs, valid), unroll=unroll)


def _check_carry(cell: Cell, carry, batch: int, hidden: int, dtype) -> None:
    want = jax.tree.map(jnp.shape, cell.zero_carry((batch,), hidden))
    got = jax.tree.map(jnp.shape, carry)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(f"carry: expected {cell.name} carry with shapes {want}, got {got}")
    for leaf in jax.tree.leaves(carry):
        if leaf.dtype != dtype:
            raise TypeError(f"carry: expected dtype {dtype} (the computation's), got {leaf.dtype}")
