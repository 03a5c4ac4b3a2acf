"""Recurrent cells (lru_jax.cells, lru_jax.nn) against a numpy loop, flax.linen and PyTorch."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from references import first_params_key

from lru_jax import cells
from lru_jax import nn as lru_nn

KINDS = ["tanh", "relu", "lstm", "gru"]
IN, HIDDEN, BATCH = 4, 5, 3  # all different, so a transposed weight cannot go unnoticed


def make_cell(kind):
    if kind in ("tanh", "relu"):
        return cells.simple_rnn(kind)
    return cells.lstm() if kind == "lstm" else cells.gru()


# The reference: textbook equations, one sequence and one step at a time, float64.


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_step(kind, p, carry, x):
    """One step of one sequence: x [in], carry [H] (LSTM: (c, h)) -> (carry, y)."""
    hidden = p["w_hh"].shape[0]

    def gate(w, k):  # the k-th gate's block of a fused [*, G*H] weight or [G*H] bias
        return w[..., k * hidden : (k + 1) * hidden]

    if kind in ("tanh", "relu"):
        pre = x @ p["w_ih"] + p["b"] + carry @ p["w_hh"]
        h = np.tanh(pre) if kind == "tanh" else np.maximum(pre, 0.0)
        return h, h
    if kind == "lstm":
        c, h = carry
        i, f, g, o = (
            x @ gate(p["w_ih"], k) + h @ gate(p["w_hh"], k) + gate(p["b"], k) for k in range(4)
        )
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        return (c, h), h
    h = carry
    x_r, x_z, x_n = (x @ gate(p["w_ih"], k) + gate(p["b_ih"], k) for k in range(3))
    h_r, h_z, h_n = (h @ gate(p["w_hh"], k) + gate(p["b_hh"], k) for k in range(3))
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    h = (1.0 - z) * n + z * h
    return h, h


def np_unroll(kind, params, xs, carry=None, lengths=None, reverse=False):
    """xs [T, B, in] -> (carry, ys [T, B, H]), each sequence run alone over its own steps."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(xs, np.float64)
    time, batch, _ = xs.shape
    hidden = p["w_hh"].shape[0]
    lengths = [time] * batch if lengths is None else [int(n) for n in lengths]
    if carry is None:
        zero = np.zeros((batch, hidden))
        carry = (zero, zero) if kind == "lstm" else zero
    carry = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
    ys = np.zeros((time, batch, hidden))
    finals = []
    for b in range(batch):
        state = (carry[0][b], carry[1][b]) if kind == "lstm" else carry[b]
        steps = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in steps:
            state, ys[t, b] = np_step(kind, p, state, xs[t, b])
        finals.append(state)
    if kind == "lstm":
        return (np.stack([s[0] for s in finals]), np.stack([s[1] for s in finals])), ys
    return np.stack(finals), ys


# Helpers.


def random_params(kind, rng, in_dim=IN, hidden=HIDDEN, scale=0.5):
    """Random float32 parameters (biases too) with the cell's names and shapes."""
    shapes = jax.tree.map(jnp.shape, make_cell(kind).init(jax.random.key(0), in_dim, hidden))
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def random_carry(kind, rng, batch=BATCH, hidden=HIDDEN):
    def leaf():
        return rng.normal(size=(batch, hidden)).astype(np.float32)

    return (leaf(), leaf()) if kind == "lstm" else leaf()


def leaves(carry):
    return [np.asarray(c) for c in jax.tree.leaves(carry)]


def close(got, want, tol=2e-5):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, atol=tol * (1.0 + np.max(np.abs(want))), rtol=tol)


def valid_mask(lengths, time):
    """bool [T, B]: step t is inside sequence b."""
    return np.arange(time)[:, None] < np.asarray(lengths)[None, :]


# 1. Against the numpy loop.

CONFIGS = [
    # time, initial carry, reverse, unroll, seq_lengths
    (1, False, False, 1, None),
    (1, True, True, 1, [0, 1, 1]),
    (7, False, False, 1, None),
    (7, True, False, 1, None),
    (7, True, True, 2, None),
    (7, False, False, 2, [0, 7, 3]),
    (7, True, False, 1, [3, 0, 7]),
    (7, True, True, 1, [5, 7, 0]),
    (8, True, True, 3, [8, 1, 4]),  # unroll not dividing the length
]


@pytest.mark.parametrize("kind", KINDS)
def test_unroll_matches_numpy_loop(kind):
    rng = np.random.default_rng(0)
    cell = make_cell(kind)
    params = random_params(kind, rng)
    for time, with_carry, reverse, unroll, lengths in CONFIGS:
        xs = rng.normal(size=(time, BATCH, IN)).astype(np.float32)
        carry0 = random_carry(kind, rng) if with_carry else None
        seq = None if lengths is None else np.asarray(lengths, np.int32)
        carry, ys = cells.unroll(
            cell, params, xs, carry0, seq_lengths=seq, reverse=reverse, unroll=unroll
        )
        want_carry, want_ys = np_unroll(kind, params, xs, carry0, lengths, reverse)
        config = (time, with_carry, reverse, unroll, lengths)
        assert ys.shape == (time, BATCH, HIDDEN) and ys.dtype == jnp.float32, config
        close(ys, want_ys)
        assert jax.tree.structure(carry) == jax.tree.structure(want_carry), config
        got_c = leaves(carry)
        for got, want in zip(got_c, leaves(want_carry), strict=True):
            close(got, want)
        if lengths is not None:
            pad = ~valid_mask(lengths, time)
            assert np.all(np.asarray(ys)[pad] == 0.0), config
            empty = np.asarray(lengths) == 0  # length 0: exactly the initial carry
            init = leaves(carry0) if with_carry else [np.zeros((BATCH, HIDDEN))] * len(got_c)
            for got, want in zip(got_c, init, strict=True):
                np.testing.assert_array_equal(got[empty], want[empty])


@pytest.mark.parametrize("kind", KINDS)
def test_step_matches_numpy(kind):
    rng = np.random.default_rng(1)
    cell = make_cell(kind)
    params = random_params(kind, rng)
    carry = random_carry(kind, rng)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    got_carry, got_y = cell.step(params, carry, x)
    want_carry, want_y = np_unroll(kind, params, x[None], carry)
    close(got_y, want_y[0])
    for got, want in zip(leaves(got_carry), leaves(want_carry), strict=True):
        close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_leak(kind):
    """Changing the inputs past each length changes neither valid outputs nor the carry."""
    rng = np.random.default_rng(2)
    cell = make_cell(kind)
    params = random_params(kind, rng)
    time, lengths = 6, np.array([2, 0, 6], np.int32)
    pad = ~valid_mask(lengths, time)
    xs = rng.normal(size=(time, BATCH, IN)).astype(np.float32)
    other = xs.copy()
    other[pad] = (100.0 * rng.normal(size=other[pad].shape)).astype(np.float32)
    carry0 = random_carry(kind, rng)
    for reverse in (False, True):
        c1, y1 = cells.unroll(cell, params, xs, carry0, seq_lengths=lengths, reverse=reverse)
        c2, y2 = cells.unroll(cell, params, other, carry0, seq_lengths=lengths, reverse=reverse)
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
        assert np.all(np.asarray(y2)[pad] == 0.0)
        for a, b in zip(leaves(c1), leaves(c2), strict=True):
            np.testing.assert_array_equal(a, b)
        # And the valid part is not trivially constant: changing a valid input does change it.
        moved = xs.copy()
        moved[0, 2] += 1.0
        _, y3 = cells.unroll(cell, params, moved, carry0, seq_lengths=lengths, reverse=reverse)
        assert not np.allclose(np.asarray(y3)[:, 2], np.asarray(y1)[:, 2])


def test_reverse_within_lengths_by_hand():
    """An identity-ish RNN that sums its inputs shows the order of steps directly."""
    # relu, w_ih = I, w_hh = I, b = 0: h_t = h_{t-1} + x_t for non-negative inputs.
    params = {"w_ih": np.eye(1, dtype=np.float32), "w_hh": np.eye(1, dtype=np.float32)}
    params["b"] = np.zeros(1, np.float32)
    xs = np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]], np.float32)[..., None]
    lengths = np.array([3, 4], np.int32)
    carry, ys = cells.unroll(
        cells.simple_rnn("relu"), params, xs, seq_lengths=lengths, reverse=True
    )
    # Sequence 0 (length 3) runs steps 2, 1, 0; sequence 1 runs 3, 2, 1, 0.
    np.testing.assert_array_equal(np.asarray(ys)[..., 0], [[7, 15], [6, 14], [4, 12], [0, 8]])
    np.testing.assert_array_equal(np.asarray(carry)[:, 0], [7, 15])


def test_resets_run_each_document_alone_and_keep_gradients(kind="lstm"):
    """A reset zeroes the carry inside the loop: each document between resets gets the numpy
    loop's outputs run alone (from zeros; the first from the initial carry unless reset), and
    the chunked backward pass agrees with autodiff of the same loop, padding included."""
    rng = np.random.default_rng(3)
    cell, params = make_cell(kind), random_params(kind, rng)
    time = 7
    xs = rng.normal(size=(time, BATCH, IN)).astype(np.float32)
    carry0 = random_carry(kind, rng)
    resets = np.zeros((time, BATCH), bool)
    resets[[2, 5], 0] = True  # documents [0, 2), [2, 5), [5, 7)
    resets[[0, 3], 1] = True  # the initial carry is dropped at once
    resets[[4, 6], 2] = True  # the reset at 6 lies in the padding (length 5)
    lengths = np.array([7, 7, 5], np.int32)
    _, ys = cells.unroll(cell, params, xs, carry0, seq_lengths=lengths, resets=resets)
    for b in range(BATCH):
        bounds = [0, *np.flatnonzero(resets[: lengths[b], b]), lengths[b]]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if start == end:
                continue
            first = jax.tree.map(lambda c, b=b: c[b : b + 1], carry0)
            fresh = start > 0 or resets[0, b]
            _, want = np_unroll(kind, params, xs[start:end, b : b + 1], None if fresh else first)
            close(np.asarray(ys)[start:end, b], want[:, 0])
    assert np.all(np.asarray(ys)[5:, 2] == 0.0)

    weights = rng.normal(size=(time, BATCH, HIDDEN)).astype(np.float32)

    def loss(grad_chunk):
        def f(p, x, c):
            carry, y = cells.unroll(
                cell, p, x, c, seq_lengths=lengths, resets=resets, grad_chunk=grad_chunk
            )
            return jnp.sum(y * weights) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(carry))

        return jax.grad(f, argnums=(0, 1, 2))(params, xs, carry0)

    got, want = loss(2), loss(None)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(g, w, 1e-4)
    # Row 1 resets at step 0: its initial carry reaches nothing.
    for leaf in jax.tree.leaves(got[2]):
        assert np.all(np.asarray(leaf)[1] == 0.0)


# 2. Parity with flax.linen.


def flax_cell(kind):
    if kind == "tanh":
        return fnn.SimpleCell(HIDDEN)
    if kind == "relu":
        return fnn.SimpleCell(HIDDEN, activation_fn=jax.nn.relu)
    return fnn.LSTMCell(HIDDEN) if kind == "lstm" else fnn.GRUCell(HIDDEN)


def from_flax(kind, variables):
    """flax.linen cell parameters -> ours (per-gate kernels concatenated in our gate order)."""
    p = variables["params"]["cell"]

    def cat(names, leaf):
        return jnp.concatenate([p[n][leaf] for n in names], axis=-1)

    if kind in ("tanh", "relu"):
        return {"w_ih": p["i"]["kernel"], "w_hh": p["h"]["kernel"], "b": p["i"]["bias"]}
    if kind == "lstm":
        return {
            "w_ih": cat(["ii", "if", "ig", "io"], "kernel"),
            "w_hh": cat(["hi", "hf", "hg", "ho"], "kernel"),
            "b": cat(["hi", "hf", "hg", "ho"], "bias"),
        }
    zeros = jnp.zeros(HIDDEN, jnp.float32)
    return {
        "w_ih": cat(["ir", "iz", "in"], "kernel"),
        "w_hh": cat(["hr", "hz", "hn"], "kernel"),
        "b_ih": cat(["ir", "iz", "in"], "bias"),
        "b_hh": jnp.concatenate([zeros, zeros, p["hn"]["bias"]]),
    }


def lru_module(kind):
    if kind in ("tanh", "relu"):
        return lru_nn.SimpleRNN(HIDDEN, activation=kind)
    return lru_nn.LSTM(HIDDEN) if kind == "lstm" else lru_nn.GRU(HIDDEN)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_flax_linen(kind):
    rng = np.random.default_rng(3)
    time = 6
    x = rng.normal(size=(BATCH, time, IN)).astype(np.float32)
    lengths = np.array([6, 1, 4], np.int32)  # flax's carry for a length 0 is not defined
    valid = valid_mask(lengths, time).T  # [B, T]
    carry0 = random_carry(kind, rng)
    for reverse in (False, True):
        flax_rnn = fnn.RNN(flax_cell(kind), reverse=reverse, keep_order=True)
        variables = flax_rnn.init(jax.random.key(0), x)
        # Random biases too (flax initialises them to zero, which would hide a mapping error).
        variables = jax.tree.map(
            lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), variables
        )
        ours = {"params": from_flax(kind, variables)}
        module = lru_module(kind)
        for seq, init in ((None, None), (None, carry0), (lengths, carry0)):
            want_c, want_y = flax_rnn.apply(
                variables, x, initial_carry=init, seq_lengths=seq, return_carry=True
            )
            got_c, got_y = module.apply(
                ours, x, seq, initial_carry=init, return_carry=True, reverse=reverse
            )
            if seq is None:
                close(got_y, want_y)
            else:  # flax runs the cell over the padding too; ours zeroes it
                close(np.asarray(got_y)[valid], np.asarray(want_y)[valid])
                assert np.all(np.asarray(got_y)[~valid] == 0.0)
            assert jax.tree.structure(got_c) == jax.tree.structure(want_c)
            for got, want in zip(leaves(got_c), leaves(want_c), strict=True):
                close(got, want)


# 3. Parity with PyTorch.


def torch_module(kind, bidirectional=False):
    torch.manual_seed(0)
    kwargs = {"batch_first": True, "bidirectional": bidirectional}
    if kind in ("tanh", "relu"):
        return torch.nn.RNN(IN, HIDDEN, nonlinearity=kind, **kwargs)
    module = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    return module(IN, HIDDEN, **kwargs)


def from_torch(kind, module, suffix=""):
    """torch's layer-0 weights -> ours: W^T, and the two biases summed (kept apart for GRU)."""

    def get(name):
        return getattr(module, f"{name}_l0{suffix}").detach().numpy().astype(np.float32)

    params = {"w_ih": get("weight_ih").T.copy(), "w_hh": get("weight_hh").T.copy()}
    if kind == "gru":
        params.update(b_ih=get("bias_ih"), b_hh=get("bias_hh"))
    else:
        params["b"] = get("bias_ih") + get("bias_hh")
    return params


def to_torch_carry(kind, carry):
    if kind == "lstm":  # ours (c, h), torch (h_0, c_0), each [layers, B, H]
        return (torch.from_numpy(carry[1])[None], torch.from_numpy(carry[0])[None])
    return torch.from_numpy(carry)[None]


def from_torch_carry(kind, carry):
    if kind == "lstm":
        h_n, c_n = carry
        return [c_n.detach().numpy(), h_n.detach().numpy()]
    return [carry.detach().numpy()]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_pytorch(kind):
    rng = np.random.default_rng(4)
    module = torch_module(kind)
    params = from_torch(kind, module)
    cell = make_cell(kind)
    for time in (1, 7):
        x = rng.normal(size=(BATCH, time, IN)).astype(np.float32)
        carry0 = random_carry(kind, rng)
        with torch.no_grad():
            want_y, want_c = module(torch.from_numpy(x), to_torch_carry(kind, carry0))
        got_c, got_y = cells.unroll(cell, params, x.swapaxes(0, 1), carry0)
        close(np.asarray(got_y).swapaxes(0, 1), want_y.numpy(), tol=1e-5)
        for got, want in zip(leaves(got_c), from_torch_carry(kind, want_c), strict=True):
            close(got, want[0], tol=1e-5)


@pytest.mark.parametrize("grad_chunk", [4, None])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_pytorch_autograd(kind, grad_chunk):
    """Gradients through unroll against torch.autograd: the chunked backward pass (9 steps:
    two chunks of 4, then 1) and JAX's autodiff of the loop (grad_chunk None)."""
    rng = np.random.default_rng(8)
    module = torch_module(kind)
    params = from_torch(kind, module)
    time = 9
    x = rng.normal(size=(BATCH, time, IN)).astype(np.float32)
    y_cot = rng.normal(size=(BATCH, time, HIDDEN)).astype(np.float32)
    carry0 = random_carry(kind, rng)

    x_t = torch.from_numpy(x).requires_grad_()
    carry_t = jax.tree.map(lambda c: c.requires_grad_(), to_torch_carry(kind, carry0))
    y_t, _ = module(x_t, carry_t)
    (y_t * torch.from_numpy(y_cot)).sum().backward()

    def loss(params, x, carry0):
        _, ys = cells.unroll(
            make_cell(kind), params, x.swapaxes(0, 1), carry0, grad_chunk=grad_chunk
        )
        return jnp.sum(ys.swapaxes(0, 1) * y_cot)

    g_params, g_x, g_carry = jax.grad(loss, argnums=(0, 1, 2))(params, x, carry0)
    want = from_torch(kind, module)  # same layout, filled from .grad below
    for name, value in module.named_parameters():
        grad = value.grad.numpy()
        kind_name = name.split("_l0")[0]  # weight_ih, weight_hh, bias_ih, bias_hh
        if kind_name.startswith("weight"):
            want["w_" + kind_name[-2:]] = grad.T
        elif kind == "gru":
            want["b_" + kind_name[-2:]] = grad
        else:
            want["b"] = grad  # b_ih and b_hh receive the same gradient as their sum
    for name in params:
        close(g_params[name], want[name], tol=1e-4)
    close(g_x, x_t.grad.numpy(), tol=1e-4)
    if kind == "lstm":
        want_carry = from_torch_carry(kind, (carry_t[0].grad, carry_t[1].grad))
    else:
        want_carry = from_torch_carry(kind, carry_t.grad)
    for got, w in zip(leaves(g_carry), want_carry, strict=True):
        close(got, w[0], tol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_matches_pytorch_packed_bidirectional(kind):
    """Packed sequences: torch's forward and backward directions against unroll with lengths."""
    rng = np.random.default_rng(5)
    module = torch_module(kind, bidirectional=True)
    time = 6
    lengths = np.array([4, 6, 1], np.int32)  # torch rejects length 0
    x = rng.normal(size=(BATCH, time, IN)).astype(np.float32)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x),
        torch.from_numpy(lengths.astype(np.int64)),
        batch_first=True,
        enforce_sorted=False,
    )
    with torch.no_grad():
        out, carry = module(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=time)
    out = out.numpy().swapaxes(0, 1)  # [T, B, 2H], zero past each length
    want_c = from_torch_carry(kind, carry)  # leaves [2 directions, B, H]
    cell = make_cell(kind)
    for direction, suffix in enumerate(("", "_reverse")):
        params = from_torch(kind, module, suffix)
        got_c, got_y = cells.unroll(
            cell, params, x.swapaxes(0, 1), seq_lengths=lengths, reverse=bool(direction)
        )
        close(got_y, out[..., direction * HIDDEN : (direction + 1) * HIDDEN], tol=1e-5)
        for got, want in zip(leaves(got_c), want_c, strict=True):
            close(got, want[direction], tol=1e-5)


# 4. Gradients.


@pytest.mark.parametrize("grad_chunk", [3, None])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_numpy_finite_differences(kind, grad_chunk):
    """jax.grad through unroll (lengths, reverse, carry) against float64 central differences,
    for the chunked backward pass (4 steps: a chunk of 3, then 1) and autodiff of the loop."""
    rng = np.random.default_rng(6)
    cell = make_cell(kind)
    time, batch, in_dim, hidden = 4, 2, 3, 3
    lengths = np.array([3, 4], np.int32)
    params = random_params(kind, rng, in_dim, hidden)
    xs = rng.normal(size=(time, batch, in_dim)).astype(np.float32)
    carry0 = random_carry(kind, rng, batch, hidden)
    ys_cot = rng.normal(size=(time, batch, hidden))
    c_cot = [rng.normal(size=(batch, hidden)) for _ in leaves(carry0)]

    for reverse in (False, True):

        def loss(params, xs, carry0, reverse=reverse):
            carry, ys = cells.unroll(
                cell,
                params,
                xs,
                carry0,
                seq_lengths=lengths,
                reverse=reverse,
                grad_chunk=grad_chunk,
            )
            total = jnp.sum(ys * ys_cot)
            for c, w in zip(jax.tree.leaves(carry), c_cot, strict=True):
                total = total + jnp.sum(c * w)
            return total

        def np_loss(params, xs, carry0, reverse=reverse):
            carry, ys = np_unroll(kind, params, xs, carry0, lengths, reverse)
            return np.sum(ys * ys_cot) + sum(
                np.sum(c * w) for c, w in zip(leaves(carry), c_cot, strict=True)
            )

        args = (params, xs, carry0)
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
        flat, treedef = jax.tree.flatten(args64)
        eps = 1e-6
        for i, (leaf, got) in enumerate(zip(flat, jax.tree.leaves(grads), strict=True)):
            fd = np.zeros(leaf.shape)
            for j in np.ndindex(leaf.shape):
                plus = [a.copy() for a in flat]
                minus = [a.copy() for a in flat]
                plus[i][j] += eps
                minus[i][j] -= eps
                f_plus = np_loss(*jax.tree.unflatten(treedef, plus))
                f_minus = np_loss(*jax.tree.unflatten(treedef, minus))
                fd[j] = (f_plus - f_minus) / (2 * eps)
            close(got, fd, tol=1e-4)
        # The padded inputs (t >= length) get exactly zero gradient.
        pad = ~valid_mask(lengths, time)
        assert np.all(np.asarray(grads[1])[pad] == 0.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_chunked_backward_second_order_and_vmap_match_autodiff(kind):
    """Reverse-over-reverse (a gradient penalty) and vmapped gradients through the chunked
    backward pass equal the same through JAX's autodiff of the loop."""
    rng = np.random.default_rng(9)
    cell = make_cell(kind)
    params = random_params(kind, rng, 3, 4)
    xs = rng.normal(size=(7, 2, 3)).astype(np.float32)

    def penalty(params, grad_chunk):
        def loss(xs):
            return jnp.sum(cells.unroll(cell, params, xs, grad_chunk=grad_chunk)[1] ** 2)

        return jnp.sum(jax.grad(loss)(xs) ** 2)

    penalty_grad = jax.jit(jax.grad(penalty), static_argnums=1)  # eagerly, several times slower
    got = penalty_grad(params, 3)
    want = penalty_grad(params, None)
    for name in params:
        close(got[name], want[name], tol=1e-5)

    def loss(params, grad_chunk):
        return jnp.sum(cells.unroll(cell, params, xs, grad_chunk=grad_chunk)[1] ** 2)

    stacked = jax.tree.map(lambda a: np.stack([a, 0.5 * a]), params)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)), static_argnums=1)
    got = grads(stacked, 3)
    want = grads(stacked, None)
    for name in params:
        close(got[name], want[name], tol=1e-5)


def test_check_grads_lstm_and_gru():
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(3, 2, 3)).astype(np.float32)
    lengths = np.array([2, 3], np.int32)
    for kind in ("lstm", "gru"):
        cell = make_cell(kind)
        params = random_params(kind, rng, 3, 2)

        def f(params, xs, cell=cell):
            carry, ys = cells.unroll(cell, params, xs, seq_lengths=lengths, reverse=True)
            return jnp.sum(ys**2) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

        f = jax.jit(f)  # check_grads evaluates f many times: compiled once, not op by op
        check_grads(f, (params, xs), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


# 5. Bad input.


def _bad_calls():
    lstm = cells.lstm()
    params = lstm.init(jax.random.key(0), IN, HIDDEN)
    xs = np.zeros((5, BATCH, IN), np.float32)
    zero = np.zeros((BATCH, HIDDEN), np.float32)
    return [
        (lambda: cells.unroll(lstm, params, xs[0]), ValueError, r"xs: expected rank 3"),
        (lambda: cells.unroll(lstm, params, xs.astype(np.int32)), TypeError, r"xs: .*float"),
        (
            lambda: cells.unroll(lstm, params, np.zeros((5, BATCH, IN + 1), np.float32)),
            ValueError,
            rf"xs: the parameters expect {IN} features",
        ),
        (
            lambda: cells.unroll(lstm, params, xs, seq_lengths=np.array([1, 2], np.int32)),
            ValueError,
            r"seq_lengths: expected shape",
        ),
        (
            lambda: cells.unroll(lstm, params, xs, seq_lengths=np.array([1.0, 2.0, 3.0])),
            TypeError,
            r"seq_lengths: expected an integer",
        ),
        (
            lambda: cells.unroll(lstm, params, xs, seq_lengths=np.array([1, -1, 2])),
            ValueError,
            r"seq_lengths: expected values in \[0, 5\]",
        ),
        (
            lambda: cells.unroll(lstm, params, xs, seq_lengths=np.array([1, 6, 2])),
            ValueError,
            r"seq_lengths: expected values in \[0, 5\]",
        ),
        (lambda: cells.unroll(lstm, params, xs, zero), ValueError, r"carry: expected lstm"),
        (
            lambda: cells.unroll(lstm, params, xs, (zero[:, :-1], zero[:, :-1])),
            ValueError,
            r"carry: expected lstm",
        ),
        (
            lambda: cells.unroll(cells.gru(), cells.gru().init(jax.random.key(0), IN, 2), xs, zero),
            ValueError,
            r"carry: expected gru",
        ),
        (lambda: cells.simple_rnn("sigmoid"), ValueError, r"activation: expected one of"),
        (lambda: cells.get("transformer"), ValueError, r"cell: expected one of"),
        (lambda: cells.unroll(lstm, params, xs, unroll=0), ValueError, r"unroll: expected"),
        (
            lambda: cells.unroll(lstm, params, xs, grad_chunk=0),
            ValueError,
            r"grad_chunk: expected a positive int",
        ),
        (lambda: lstm.init(jax.random.key(0), IN, 0), ValueError, r"hidden: expected"),
    ]


def test_bad_input_is_named():
    for call, error, match in _bad_calls():
        with pytest.raises(error, match=match):
            call()


def test_bad_input_to_flax_modules_is_named():
    x = np.zeros((BATCH, 5, IN), np.float32)
    for module in (lru_nn.LSTM(HIDDEN), lru_nn.GRU(HIDDEN), lru_nn.SimpleRNN(HIDDEN)):
        variables = module.init(jax.random.key(0), x)
        with pytest.raises(ValueError, match=rf"x: the parameters expect {IN} features"):
            module.apply(variables, np.zeros((BATCH, 5, IN + 2), np.float32))
        with pytest.raises(ValueError, match=r"x: expected rank 3"):
            module.apply(variables, x[0])
        with pytest.raises(ValueError, match=r"seq_lengths: expected values"):
            module.apply(variables, x, np.array([1, 2, 9], np.int32))


# 6. Initialisation.


@pytest.mark.parametrize("kind", KINDS)
def test_flax_layer_parameters_are_the_cells_init_of_its_key(kind):
    x = np.zeros((BATCH, 5, IN), np.float32)
    key = jax.random.key(4)
    module = {"tanh": lru_nn.SimpleRNN(HIDDEN), "relu": lru_nn.SimpleRNN(HIDDEN, activation="relu")}
    module = module.get(kind) or lru_nn.RecurrentLayer(HIDDEN, cell=kind)
    got = module.init(key, x)["params"]
    want = make_cell(kind).init(first_params_key(key), IN, HIDDEN)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


def test_init_biases():
    key = jax.random.key(1)
    p = cells.lstm().init(key, IN, HIDDEN)
    want = np.repeat(np.array([0.0, 1.0, 0.0, 0.0], np.float32), HIDDEN)  # i, f, g, o
    np.testing.assert_array_equal(np.asarray(p["b"]), want)
    p = cells.gru().init(key, IN, HIDDEN)
    np.testing.assert_array_equal(np.asarray(p["b_ih"]), np.zeros(3 * HIDDEN))
    np.testing.assert_array_equal(np.asarray(p["b_hh"]), np.zeros(3 * HIDDEN))
    p = cells.simple_rnn().init(key, IN, HIDDEN)
    np.testing.assert_array_equal(np.asarray(p["b"]), np.zeros(HIDDEN))


@pytest.mark.parametrize("kind", ["tanh", "lstm", "gru"])
def test_init_shapes_and_scales(kind):
    in_dim, hidden = 256, 64
    p = make_cell(kind).init(jax.random.key(2), in_dim, hidden)
    gates = {"tanh": 1, "lstm": 4, "gru": 3}[kind]
    assert p["w_ih"].shape == (in_dim, gates * hidden) and p["w_ih"].dtype == jnp.float32
    assert p["w_hh"].shape == (hidden, gates * hidden) and p["w_hh"].dtype == jnp.float32
    # LeCun normal: variance 1 / fan_in.
    std = float(np.std(np.asarray(p["w_ih"])))
    assert abs(std * np.sqrt(in_dim) - 1.0) < 0.05, std


@pytest.mark.parametrize("kind", ["tanh", "lstm", "gru"])
def test_init_recurrent_blocks_are_orthogonal(kind):
    hidden = 6
    w_hh = np.asarray(make_cell(kind).init(jax.random.key(3), IN, hidden)["w_hh"], np.float64)
    for g in range(w_hh.shape[1] // hidden):
        block = w_hh[:, g * hidden : (g + 1) * hidden]
        np.testing.assert_allclose(block.T @ block, np.eye(hidden), atol=1e-5, err_msg=f"{g=}")


@pytest.mark.parametrize("time, batch", [(5, 0), (0, 2)], ids=["no sequences", "no steps"])
def test_empty_batches_and_sequences_run_forwards_and_backwards(time, batch):
    """With no sequences or no steps nothing is computed: the outputs are empty, the carry is
    the initial one and passes its cotangent straight back, and the parameters' gradients
    are zero (the chunked backward pass once divided by the number of steps)."""

    def loss(params, carry, cell):
        last, ys = cells.unroll(cell, params, jnp.ones((time, batch, IN)), carry)
        assert ys.shape == (time, batch, HIDDEN)
        return jnp.sum(ys) + sum(jnp.sum(c) for c in jax.tree.leaves(last))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for kind in ("tanh", "lstm", "gru"):
        cell = make_cell(kind)
        params = cell.init(jax.random.key(0), IN, HIDDEN)
        carry = jax.tree.map(jnp.ones_like, cell.zero_carry((batch,), HIDDEN))
        d_params, d_carry = grad(params, carry, cell)
        for g in jax.tree.leaves(d_params):
            np.testing.assert_array_equal(g, np.zeros_like(g))
        for g in jax.tree.leaves(d_carry):  # 0 steps: the carry is returned as it came
            assert g.shape == (batch, HIDDEN)
            np.testing.assert_array_equal(g, np.ones_like(g))


def test_a_nested_list_input_is_converted():
    cell = cells.lstm()
    params = cell.init(jax.random.key(0), 2, HIDDEN)
    xs = [[[0.5, -1.0]], [[1.0, 2.0]]]  # [time 2, batch 1, in 2]
    carry, ys = cells.unroll(cell, params, xs)
    want_carry, want = cells.unroll(cell, params, jnp.asarray(xs))
    np.testing.assert_array_equal(ys, want)
    with pytest.raises(TypeError, match="xs: expected a numeric array, got list"):
        cells.unroll(cell, params, [["a", "b"]])
