"""Mamba against its paper's equations in float64 numpy: the selective scan as a loop
(outputs, final states and gradients, with resets, reverse and an initial state), its compiled
memory plan; the mambapy package's block given the same weights (outputs, gradients, the
state its steps carry); steps, padding, resets, the mixer, remat, truncated BPTT, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import first_params_key

from lru_jax import mamba, models, scan
from lru_jax import nn as lnn
from lru_jax.tasks.base import TaskSpec
from lru_jax.training import config as config_lib

# These programs are tiny: on CPU, XLA's backend optimisations cost more time than they save.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=_FAST if jax.default_backend() == "cpu" else None, **kwargs)


_STATIC = ("method", "reverse", "chunk_size")
_selective = _jit(scan.selective_scan, static_argnames=_STATIC)


def numpy_selective_scan(x, delta, A, B, C, D=None, h0=None, resets=None, reverse=False):
    """Gu and Dao 2023, eqs. 2a-2b and 4 (Ā = exp(ΔA), B̄ = ΔB), one step at a time in
    float64: x, delta [time, batch, D], A [D, N], B, C [time, batch, N] -> (y, h_last)."""
    x, delta, A, B, C = (np.asarray(v, np.float64) for v in (x, delta, A, B, C))
    time, batch, channels = x.shape
    h = np.zeros((batch, channels, A.shape[1])) if h0 is None else np.asarray(h0, np.float64)
    y = np.zeros(x.shape)
    for t in range(time - 1, -1, -1) if reverse else range(time):
        a_bar = np.exp(delta[t][:, :, None] * A)  # [batch, D, N]
        if resets is not None:
            a_bar = a_bar * ~resets[t][:, None, None]
        b_bar = delta[t][:, :, None] * B[t][:, None, :]
        h = a_bar * h + b_bar * x[t][:, :, None]
        y[t] = np.einsum("bdn,bn->bd", h, C[t]) + (0.0 if D is None else D * x[t])
    return y, h


def _scan_inputs(rng, time=10, batch=2, channels=3, state=4):
    """(x, delta, A, B, C, D, h0) float32, Δ positive of order 0.1-1."""
    f = np.float32
    return (
        rng.normal(size=(time, batch, channels)).astype(f),
        np.log1p(np.exp(rng.normal(size=(time, batch, channels)) - 1.0)).astype(f),
        -np.exp(rng.normal(size=(channels, state))).astype(f),
        rng.normal(size=(time, batch, state)).astype(f),
        rng.normal(size=(time, batch, state)).astype(f),
        rng.normal(size=channels).astype(f),
        rng.normal(size=(batch, channels, state)).astype(f),
    )


# ---------------------------------------------------------------- the selective scan


@pytest.mark.parametrize("method", scan.SELECTIVE_METHODS)
def test_selective_scan_matches_the_papers_recurrence(method):
    """Blocks of 4 over 10 steps (a padded last block), resets, h0 and the skip; reversed (the
    same blocks over flipped inputs in every method: checked with one)."""
    rng = np.random.default_rng(0)
    x, delta, A, B, C, D, h0 = _scan_inputs(rng)
    resets = rng.random(x.shape[:2]) < 0.2
    reverse = method == "sequential"
    y, h = _selective(
        x, delta, A, B, C, D, h0, resets=resets, method=method, reverse=reverse, chunk_size=4
    )
    y_ref, h_ref = numpy_selective_scan(x, delta, A, B, C, D, h0, resets, reverse)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(h), h_ref, atol=2e-5, rtol=2e-5)
    # no steps: no outputs, the initial state back
    y, h = scan.selective_scan(x[:0], delta[:0], A, B[:0], C[:0], None, h0, method=method)
    assert y.shape == (0, 2, 3)
    np.testing.assert_array_equal(np.asarray(h), h0)


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_selective_scan_gradients_match_the_numpy_recurrence(method):
    """<∇L, v> of L = Σ w ⊙ y + Σ w_h ⊙ h_last against a float64 central difference of the
    numpy loop, along random directions v in every argument; with resets."""
    rng = np.random.default_rng(1)
    args = _scan_inputs(rng, time=9)
    resets = rng.random(args[0].shape[:2]) < 0.2
    w = rng.normal(size=args[0].shape)
    w_h = rng.normal(size=args[-1].shape)

    def loss(*args):
        y, h = scan.selective_scan(*args, resets=resets, method=method, chunk_size=4)
        return jnp.sum(w * y) + jnp.sum(w_h * h)

    def numpy_loss(*args):
        y, h = numpy_selective_scan(*args, resets=resets)
        return np.sum(w * y) + np.sum(w_h * h)

    grads = _jit(jax.grad(loss, argnums=tuple(range(7))))(*args)
    for _ in range(3):
        v = [rng.normal(size=a.shape) for a in args]
        eps = 1e-6
        plus = numpy_loss(*(a + eps * d for a, d in zip(args, v, strict=True)))
        minus = numpy_loss(*(a - eps * d for a, d in zip(args, v, strict=True)))
        got = sum(np.sum(np.asarray(g) * d) for g, d in zip(grads, v, strict=True))
        np.testing.assert_allclose(got, (plus - minus) / (2 * eps), rtol=1e-4)


def test_selective_scan_never_plans_the_every_state_array():
    """XLA's buffer plan of the gradient (a compile-time fact): the fused scan's temporaries
    stay below one [time, batch, D, N] array; materialising h, then contracting with C, needs
    several (the benchmark, docs/benchmarks.md, measures both at full size)."""
    time, batch, channels, state = 256, 2, 16, 16
    every_state = time * batch * channels * state * 4
    rng = np.random.default_rng(2)
    args = _scan_inputs(rng, time, batch, channels, state)[:6]

    def fused(*args):
        return scan.selective_scan(*args, method="sequential")[0]

    def naive(x, delta, A, B, C, D):
        hs = scan.linear_scan(jnp.exp(delta[..., None] * A), (delta * x)[..., None] * B[:, :, None])
        return jnp.einsum("tbdn,tbn->tbd", hs, C) + D * x

    planned = []
    for f in (fused, naive):
        grad = jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=tuple(range(6)))
        planned.append(_jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    assert planned[0] < every_state < 2 * every_state < planned[1], (planned, every_state)


def test_selective_scan_bad_arguments_are_named():
    x, delta, A, B, C, D, h0 = _scan_inputs(np.random.default_rng(3))
    cases = (
        ((x[0], delta, A, B, C), {}, ValueError, r"x: expected rank 3 \[time, batch, D\]"),
        ((x, delta[:, :1], A, B, C), {}, ValueError, r"delta: expected shape \(10, 2, 3\)"),
        ((x, delta, A[:2], B, C), {}, ValueError, r"A: expected shape \(3, 4\) \[D, N\]"),
        ((x, delta, A, B, C[..., :2]), {}, ValueError, r"C: expected shape \(10, 2, 4\)"),
        ((x, delta, A, B, C, D[:2]), {}, ValueError, r"D: expected shape \(3,\)"),
        ((x, delta, A, B, C, D, h0[0]), {}, ValueError, r"h0: expected shape \(2, 3, 4\)"),
        ((x.astype(np.int32), delta, A, B, C), {}, TypeError, "x: expected a floating-point"),
        ((x, delta, A, B, C), {"resets": np.zeros((10, 2))}, TypeError, "resets: expected a bool"),
        ((x, delta, A, B, C), {"resets": np.zeros(10, bool)}, ValueError, "resets: expected shape"),
        ((x, delta, A, B, C), {"method": "pallas"}, ValueError, "method: expected one of"),
        ((x, delta, A, B, C), {"chunk_size": 0}, ValueError, "chunk_size: expected a positive"),
    )
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            scan.selective_scan(*args, **kwargs)


# ---------------------------------------------------------------- the mambapy package


def _moved(params, seed=0):
    """Parameters moved off their initial values: Δ of order 0.1-1, A of several scales."""
    rng = np.random.default_rng(seed)
    e, n = params["A_log"].shape
    moved = {
        "b_dt": rng.normal(size=e) - 1.0,
        "A_log": rng.normal(size=(e, n)),
        "D": rng.normal(size=e),
    }
    return {k: np.asarray(moved.get(k, v), np.float32) for k, v in params.items()}


def test_equal_to_mambapy_given_the_same_weights():
    """mambapy 1.2.0's MambaBlock (parallel scan): outputs, gradients of every parameter and
    the input; the state its steps carry (h, the conv inputs) is our final state; our steps
    are its steps."""
    torch = pytest.importorskip("torch")
    package = pytest.importorskip("mambapy.mamba")
    torch.manual_seed(0)
    config = package.MambaConfig(d_model=8, n_layers=1, d_state=4, expand_factor=2, d_conv=3)
    block = package.MambaBlock(config)
    moved = _moved(mamba.from_mambapy({k: v.numpy() for k, v in block.state_dict().items()}))
    with torch.no_grad():
        block.dt_proj.bias.copy_(torch.from_numpy(moved["b_dt"]))
        block.A_log.copy_(torch.from_numpy(moved["A_log"]))
        block.D.copy_(torch.from_numpy(moved["D"]))
    params = mamba.from_mambapy({k: v.numpy() for k, v in block.state_dict().items()})
    x = torch.randn(2, 7, 8, requires_grad=True)  # batch-major, as the package
    cotangent = torch.randn(2, 7, 8)
    y_t = block(x)
    (y_t * cotangent).sum().backward()

    def loss(params, x):
        y, state = mamba.forward(params, jnp.swapaxes(x, 0, 1))
        return jnp.sum(jnp.swapaxes(y, 0, 1) * cotangent.numpy()), (y, state)

    (_, (y, state)), grads = _jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        params, x.detach().numpy()
    )
    np.testing.assert_allclose(np.swapaxes(y, 0, 1), y_t.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), x.grad.numpy(), atol=1e-5, rtol=1e-4)
    theirs = mamba.from_mambapy({k: p.grad.numpy() for k, p in block.named_parameters()})
    for name in mamba.PARAM_NAMES:
        np.testing.assert_allclose(
            np.asarray(grads[0][name]), theirs[name], atol=2e-5, rtol=1e-4, err_msg=name
        )
    # its steps from an empty cache: their outputs, and the cache at the end is our state
    cache = (None, torch.zeros(2, 16, 2))  # (h, the last d_conv - 1 conv inputs [B, E, W-1])
    ours = mamba.zero_state((2,), 16, 4, 3)
    step = _jit(mamba.step)
    with torch.no_grad():
        for t in range(7):
            y_step, cache = block.step(x[:, t], cache)
            ours, y_ours = step(params, ours, x[:, t].numpy())
            np.testing.assert_allclose(y_step.numpy(), y_t[:, t].detach().numpy(), atol=1e-5)
            np.testing.assert_allclose(np.asarray(y_ours), y_step.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.h), cache[0].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.window), np.swapaxes(cache[1], 1, 2), atol=1e-6)


# ---------------------------------------------------------------- module, mixer, errors


_LAYER = lnn.Mamba(
    d_inner=40, d_state=5, d_conv=3, dt_min=0.01, dt_max=0.2, scan_method="sequential",
    chunk_size=3,
)  # fmt: skip
_INIT_KEY = jax.random.key(5)


@functools.cache
def _initial_params():
    return _jit(_LAYER.init)(_INIT_KEY, jnp.zeros((1, 1, 20)))["params"]


def _layer_and_variables():
    return _LAYER, {"params": _moved(_initial_params(), seed=1)}


def test_init_and_the_modules_parameters():
    got = _initial_params()
    want = _jit(mamba.init, static_argnums=(1, 2, 3, 4, 5, 6, 7))(
        first_params_key(_INIT_KEY), 20, 40, 5, 3, None, 0.01, 0.2
    )
    assert set(got) == set(want) == set(mamba.PARAM_NAMES)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    # S4D-real A = −(1..N) in every channel; Δ starts in [dt_min, dt_max]; R = ⌈20/16⌉ = 2
    np.testing.assert_allclose(-np.exp(got["A_log"]), -np.tile(np.arange(1, 6), (40, 1)), 1e-6)
    dt = np.log1p(np.exp(np.asarray(got["b_dt"], np.float64)))
    assert np.all((dt >= 0.01 * (1 - 1e-5)) & (dt <= 0.2 * (1 + 1e-5))), dt
    assert np.ptp(np.log(dt)) > 0.5 * np.log(20)  # spread over the range, not one value
    assert got["W_dt"].shape == (40, 2) and got["W_x"].shape == (2 + 10, 40)
    assert np.abs(got["W_dt"]).max() <= 2**-0.5
    np.testing.assert_array_equal(got["D"], 1.0)
    assert np.abs(got["W_in"]).max() <= 1 / np.sqrt(20) and got["W_in"].shape == (80, 20)
    assert got["conv_w"].shape == (3, 40) and np.abs(got["conv_w"]).max() <= 1 / np.sqrt(3)


def test_module_steps_padding_reverse_and_resets():
    """The module's full call against its own steps (one compiled step, batched): equal
    outputs and final state; with lengths, each sequence as its steps over its valid part
    (reversed within it), zeros past it; after a reset, the steps from a zero state."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 7, 20)).astype(np.float32)
    layer, variables = _layer_and_variables()

    @functools.partial(_jit, static_argnames="reverse")
    def full(x, lengths, state, resets, reverse=False):  # one program for every call below
        return layer.apply(
            variables, x, lengths, initial_carry=state, resets=resets, reverse=reverse,
            return_carry=True,
        )  # fmt: skip

    step = _jit(lambda c, x_t: layer.apply(variables, c, x_t, method="step"))

    def stepped(x, state):
        """Every step's output [batch, time, H] and the state after each step."""
        ys, states = [], []
        for t in range(x.shape[1]):
            state, y_t = step(state, x[:, t])
            ys.append(y_t)
            states.append(state)
        return np.stack(ys, 1), states

    no_resets, every_step = np.zeros((3, 7), bool), np.full(3, 7)
    state0 = jax.tree.map(
        lambda c: rng.normal(size=c.shape).astype(np.float32), layer.initial_carry(3)
    )
    assert state0.h.shape == (3, 40, 5) and state0.window.shape == (3, 2, 40)
    state, y = full(x, every_step, state0, no_resets)
    want_y, want_states = stepped(x, state0)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-5)
    for got, want in zip(state, want_states[-1], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

    lengths = np.array([7, 4, 0])
    for reverse in (False, True):
        x_in = x.copy()
        if reverse:  # each sequence read backwards within its length
            for b, n in enumerate(lengths):
                x_in[b, :n] = x[b, :n][::-1]
        want_y, want_states = stepped(x_in, state0)
        state, y = full(x, lengths, state0, no_resets, reverse=reverse)
        for b, n in enumerate(lengths):
            assert np.all(np.asarray(y)[b, n:] == 0.0)
            expected = want_y[b, :n][::-1] if reverse else want_y[b, :n]
            np.testing.assert_allclose(np.asarray(y)[b, :n], expected, atol=1e-5)
            last = want_states[n - 1] if n else state0  # the initial state for length 0
            for got, want in zip(state, last, strict=True):
                np.testing.assert_allclose(np.asarray(got)[b], np.asarray(want)[b], atol=1e-5)

    resets = no_resets.copy()
    resets[0, 3] = True  # sequence 0 starts a new document at step 3
    _, y = full(x, every_step, state0, resets)
    restarted = jax.tree.map(lambda c: c.at[0].set(0.0), stepped(x[:, :3], state0)[1][-1])
    np.testing.assert_allclose(np.asarray(y)[0, 3:], stepped(x[:, 3:], restarted)[0][0], 1e-5)
    np.testing.assert_allclose(np.asarray(y)[1:], stepped(x, state0)[0][1:], atol=1e-5)


def _tiny_config(**model):
    config = config_lib.default_config()
    config.model.update({"mixer": "mamba", "d_model": 8, "num_layers": 1, "dropout_rate": 0.0})
    config.model.mamba.update({"d_state": 3, "expansion": 1.5, "chunk_size": 3, **model})
    config_lib.validate(config)
    return config


def test_the_mixer_from_the_config_generation_and_remat():
    """model.mamba builds the block its options say; `generate` (the blocks' steps after the
    prompt's full call) continues greedily as the full call over the grown sequence predicts;
    remat chunks give the full call's outputs and carries (the carry handed from chunk to
    chunk, as truncated BPTT hands it from segment to segment)."""
    config = _tiny_config(d_conv=2, dt_rank=3)
    spec = TaskSpec(name="t", kind="per_step", seq_len=9, num_outputs=7, vocab_size=7)
    model = config_lib.build_model(config.model, spec)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 7, size=(3, 9)).astype(np.int32)
    variables = _jit(model.init)(jax.random.key(0), tokens)
    mixer = variables["params"]["blocks_0"]["mixer"]
    assert mixer["A_log"].shape == (12, 3) and mixer["W_dt"].shape == (12, 3)
    assert mixer["conv_w"].shape == (2, 12) and mixer["W_in"].shape == (24, 8)
    apply = _jit(model.apply)
    generated = models.generate(model, variables, tokens[:, :6], 3, temperature=0.0)
    grown = np.concatenate([tokens[:, :6], generated], 1)  # causal: position t sees t and before
    np.testing.assert_array_equal(generated, np.argmax(apply(variables, grown), -1)[:, 5:8])

    lengths = np.array([9, 5, 1], np.int32)
    remat = model.clone(remat=True, remat_chunk=4)  # 4 + 4 + 1 (a padded last chunk)
    both = _jit(lambda v: [m.apply(v, tokens, lengths, return_carry=True) for m in (model, remat)])(
        variables
    )
    for a, b in zip(jax.tree.leaves(both[1]), jax.tree.leaves(both[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_settings_and_input_are_named():
    layer, variables = _layer_and_variables()
    x = jnp.ones((2, 5, 20))
    with pytest.raises(ValueError, match="x: the parameters expect 20 features"):
        layer.apply(variables, jnp.ones((2, 5, 3)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, 20), jnp.int32))
    with pytest.raises(ValueError, match=r"resets: expected rank 2 \[batch, time\]"):
        layer.apply(variables, x, resets=jnp.zeros((5,), bool))
    with pytest.raises(ValueError, match=r"x: expected rank 2 \[batch, H\]"):
        layer.apply(variables, layer.initial_carry(2), x, method="step")
    with pytest.raises(ValueError, match="state0: expected a mamba.State"):
        layer.apply(variables, x, initial_carry=layer.initial_carry(3))
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.Mamba(d_inner=6, scan_method="pallas").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dt_min, dt_max: expected 0 < dt_min <= dt_max"):
        lnn.Mamba(d_inner=6, dt_min=0.2, dt_max=0.1).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="d_inner: expected a positive int"):
        mamba.init(jax.random.key(0), 4, 6.0)
    with pytest.raises(ValueError, match="state_dict: expected a mambapy MambaBlock"):
        mamba.from_mambapy({"A_log": np.zeros((2, 2))})
    for key, value, match in (
        ("d_state", 0, "config.model.mamba.d_state: expected a positive int"),
        ("dt_max", 0.0001, "config.model.mamba.dt_min, dt_max: expected 0 < dt_min"),
        ("expansion", 0, "config.model.mamba.expansion: expected a positive number"),
        ("scan_method", "pallas", "config.model.mamba.scan_method: expected one of"),
        ("chunk_size", -1, "config.model.mamba.chunk_size: expected a non-negative int"),
    ):
        with pytest.raises(ValueError, match=match):
            _tiny_config(**{key: value})
