"""Recurrent cells as pure functions, and `unroll`, the driver that runs one over a sequence.

A cell is a `Cell`: parameter initialisers, an input projection and a recurrent step, split
into the recurrent matmul and an elementwise `combine`:

    step(params, carry, x) = combine(params, carry, project(params, x), state_of(carry) @ w_hh)

`unroll` runs the cell under `jax.lax.scan` with one matmul per step: [x, h] against the
stacked [w_ih; w_hh] when the cell is `additive` (SimpleRNN, LSTM), x w_ih and h w_hh apart for
the GRU. Its backward pass (`grad_chunk`, see `unroll`) carries only the state's gradient
through the reversed loop and forms the weight, bias and input gradients once per chunk of
steps, as matmuls over the chunk's rows, instead of one small matmul and a read-modify-write of
every weight gradient per step as autodiff of the loop does (docs/benchmarks.md: measurements).

Parameters (fused gates, PyTorch's gate order, so weights move between the two unchanged):

    SimpleRNN  w_ih [in, H]    w_hh [H, H]    b [H]                 carry h
    LSTM       w_ih [in, 4H]   w_hh [H, 4H]   b [4H]  gates i,f,g,o  carry (c, h)
    GRU        w_ih [in, 3H]   w_hh [H, 3H]   b_ih [3H], b_hh [3H]   gates r,z,n  carry h

Initialisation: input weights LeCun-normal, recurrent weights orthogonal per gate, biases zero
except the LSTM forget gate bias, which starts at 1 so the cell remembers by default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lru_jax import _checks
from lru_jax.padding import reverse_within_lengths, step_mask

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
        return self.recur(params, carry, self.project(params, check_input(params, x, "x")))


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


def check_input(params: Params, xs, name: str = "xs"):
    """xs [..., features] as an array (a nested list is converted), checked against the
    parameters' input size."""
    return _checks.features(name, xs, params["w_ih"].shape[0])


def unroll(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    carry: Carry = None,
    *,
    seq_lengths: jax.Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
    grad_chunk: int | None = 16,
    resets: jax.Array | None = None,
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
      grad_chunk: time steps per weight-gradient matmul in the backward pass (a custom VJP;
        the result equals autodiff's to rounding). None: JAX's own autodiff of the loop, which
        also supports forward-mode differentiation (`jax.jvp`, `jax.jacfwd`).
      resets: optional bool [time, batch]: where true, the carry is zeroed before that step
        (a document starts there), inside the same loop. Resets past a sequence's length are
        ignored; with `reverse` they are reversed with xs (they mark restarts in the order
        the cell runs, as `scan.linear_scan`'s).

    Returns:
      (carry, ys) with ys: [time, batch, hidden], computed (carry included) in
      result_type(xs, w_hh): a nonlinear cell has no scan to accumulate in, so under mixed
      precision (`nn.LSTM(dtype=jnp.bfloat16)` casts its parameters) it runs in bfloat16.
    """
    xs = check_input(params, xs)
    _checks.rank("xs", xs, 3, "[time, batch, features]")
    time, batch, _ = xs.shape
    seq_lengths = _checks.seq_lengths(seq_lengths, batch, time)
    resets = _checks.resets(resets, (time, batch), "[time, batch]")
    _checks.positive_int("unroll", unroll)
    if grad_chunk is not None:
        _checks.positive_int("grad_chunk", grad_chunk)
    hidden = hidden_size(params)
    dtype = jnp.result_type(xs, params["w_hh"])
    if carry is None:
        carry = cell.zero_carry((batch,), hidden, dtype)
    else:
        _check_carry(cell, carry, batch, hidden, dtype)

    if reverse:
        xs = reverse_within_lengths(xs, seq_lengths)
        resets = None if resets is None else reverse_within_lengths(resets, seq_lengths)
    valid = step_mask(seq_lengths, time)
    if resets is not None and valid is not None:  # a reset in the padding must not clear the carry
        resets = resets & valid
    if grad_chunk is None:
        carry, ys = _recurrence(cell, unroll, params, carry, xs, valid, resets)
    else:
        carry, ys = _chunked_bptt(cell, unroll, grad_chunk, params, carry, xs, valid, resets)
    if reverse:
        ys = reverse_within_lengths(ys, seq_lengths)
    return carry, ys


# Measured on XLA:CPU (docs/benchmarks.md): projecting the whole sequence before the loop made
# the forward pass slower than projecting inside it (the [time, batch, gates * hidden] array
# goes through memory), and one matmul of [x, h] with the stacked weights beat two. Forming
# the weight gradients once after the whole backward loop was no faster than autodiff (the
# [time, batch, gates * hidden] gradient goes through memory); once per chunk of 16 steps,
# while the chunk is in cache, it is (`_chunked_bptt`).


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


def _restart(carry, reset):
    """The carry zeroed where `reset` (bool [batch], or None: unchanged)."""
    if reset is None:
        return carry
    return jax.tree.map(lambda c: jnp.where(reset[:, None], jnp.zeros((), c.dtype), c), carry)


def _recurrence(cell: Cell, unroll: int, params: Params, carry, xs, valid, resets, save=False):
    """Runs the cell over xs [time, batch, in] -> (carry, ys [time, batch, hidden]).

    `valid` and `resets` are None or bool [time, batch]; at a reset the carry is zeroed before
    the step. With `save`, ys is (ys, residuals): per step the projected input, the recurrent
    product (None for additive cells) and the carry it started from (after the reset).
    """
    elementwise = _elementwise_params(params)
    step_params = _step_params(cell, params)

    def step(carry, inputs):
        x, ok, reset = inputs
        carry = _restart(carry, reset)
        xp, recurrent = _pre_activations(cell, step_params, carry, x)
        new_carry, y = _masked_combine(cell, elementwise, carry, xp, recurrent, ok)
        if not save:
            return new_carry, y
        return new_carry, (y, (xp, None if cell.additive else recurrent, carry))

    return jax.lax.scan(step, carry, (xs, valid, resets), unroll=unroll)


# Backpropagation through time with the weight gradients formed per chunk of steps.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_bptt(cell: Cell, unroll: int, chunk: int, params: Params, carry, xs, valid, resets):
    """`_recurrence`, differentiated by `_bptt_backward`."""
    return _recurrence(cell, unroll, params, carry, xs, valid, resets)


def _bptt_forward(cell, unroll, chunk, params, carry, xs, valid, resets):
    carry, (ys, residuals) = _recurrence(cell, unroll, params, carry, xs, valid, resets, True)
    return (carry, ys), (params, xs, valid, resets, residuals)


def _bptt_backward(cell, unroll, chunk, saved, cotangents):
    """The reversed loop over chunks of `chunk` steps (the first T mod chunk steps last)."""
    params, xs, valid, resets, residuals = saved
    dcarry, dys = cotangents
    sequences = (dys, *residuals, valid, resets, xs)  # each [time, ...] (or None)
    time = xs.shape[0]
    size = max(1, min(chunk, time))  # steps per chunk (1 when there are none: no chunks)
    n_chunks, head = divmod(time, size)
    step_back = _bptt_step(cell, params)

    def chunk_back(state, inputs):
        dcarry, d_elementwise, d_params = state
        dy, xp, recurrent, carries, ok, reset, x = inputs
        (dcarry, d_elementwise), (dxp, drec) = jax.lax.scan(
            step_back,
            (dcarry, d_elementwise),
            (dy, xp, recurrent, carries, ok, reset),
            reverse=True,
            unroll=unroll,
        )
        h_prev = cell.state_of(carries)
        d_chunk, dx = _chunk_matmul_grads(cell, params, x, h_prev, dxp, drec)
        return (dcarry, d_elementwise, _tree_add(d_params, d_chunk)), dx

    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    state = (dcarry, zeros(_elementwise_params(params)), zeros(params))
    # explicit sizes, not -1, which cannot be inferred when the batch is empty
    body = jax.tree.map(lambda a: a[head:].reshape(n_chunks, size, *a.shape[1:]), sequences)
    state, dxs = jax.lax.scan(chunk_back, state, body, reverse=True)
    dxs = dxs.reshape(n_chunks * size, *xs.shape[1:])
    if head:
        state, dx_head = chunk_back(state, jax.tree.map(lambda a: a[:head], sequences))
        dxs = jnp.concatenate([dx_head, dxs])
    dcarry, d_elementwise, d_params = state
    d_params = _tree_add(d_params, {**zeros(params), **d_elementwise})
    return d_params, dcarry, dxs, None, None


_chunked_bptt.defvjp(_bptt_forward, _bptt_backward)


def _bptt_step(cell: Cell, params: Params):
    """One reversed step: (dcarry after it, dy) -> dcarry before it, and the cotangents of
    its projected input and recurrent product (the same for additive cells)."""
    elementwise = _elementwise_params(params)

    def step_back(state, inputs):
        dcarry, d_elementwise = state
        dy, xp, recurrent, carry, ok, reset = inputs
        if cell.additive:  # combine sees xp + recurrent: one cotangent serves both

            def combine(e, c, p):
                return _masked_combine(cell, e, c, p, jnp.zeros((), p.dtype), ok)

            _, vjp = jax.vjp(combine, elementwise, carry, xp)
            de, dcarry, dxp = vjp((dcarry, dy))
            drec = dxp
        else:
            _, vjp = jax.vjp(
                functools.partial(_masked_combine, cell, ok=ok), elementwise, carry, xp, recurrent
            )
            de, dcarry, dxp, drec = vjp((dcarry, dy))
        _, state_vjp = jax.vjp(cell.state_of, carry)
        (dcarry_via_h,) = state_vjp(drec @ params["w_hh"].T)
        # A reset zeroed the carry before this step: nothing flows back past it.
        dcarry = _restart(_tree_add(dcarry, dcarry_via_h), reset)
        state = (dcarry, _tree_add(d_elementwise, de))
        return state, (dxp, None if cell.additive else drec)

    return step_back


def _chunk_matmul_grads(cell: Cell, params: Params, x, h_prev, dxp, drec):
    """Gradients of one chunk's matmuls (x [K, B, in], h_prev [K, B, H]) as [K*B]-row matmuls:
    (d params, dx [K, B, in])."""

    def rows(a):
        return a.reshape(-1, a.shape[-1])

    def pre_activations(p, x_rows):
        projected, recurrent = cell.project(p, x_rows), rows(h_prev) @ p["w_hh"]
        return projected + recurrent if cell.additive else (projected, recurrent)

    _, vjp = jax.vjp(pre_activations, params, rows(x))
    d_params, dx = vjp(rows(dxp) if cell.additive else (rows(dxp), rows(drec)))
    return d_params, dx.reshape(x.shape)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _check_carry(cell: Cell, carry, batch: int, hidden: int, dtype) -> None:
    want = jax.tree.map(jnp.shape, cell.zero_carry((batch,), hidden))
    got = jax.tree.map(jnp.shape, carry)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(f"carry: expected {cell.name} carry with shapes {want}, got {got}")
    for leaf in jax.tree.leaves(carry):
        if leaf.dtype != dtype:
            raise TypeError(f"carry: expected dtype {dtype} (the computation's), got {leaf.dtype}")
