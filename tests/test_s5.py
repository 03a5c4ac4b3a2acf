"""The S5 against the paper's equations in float64 numpy: HiPPO-N by its formula, the real
system it diagonalises (matrix exponential, bilinear transform), the diagonal recurrence as a
loop (outputs and gradients); the s5-pytorch package given the same weights; steps, padding,
resets, the mixer and its config, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from references import first_params_key

from lru_jax import nn as lnn
from lru_jax import s5
from lru_jax.tasks.base import TaskSpec
from lru_jax.training import config as config_lib

# These programs are tiny: on CPU, XLA's backend optimisations cost more time than they save.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=_FAST if jax.default_backend() == "cpu" else None, **kwargs)


# one compiled forward per form, shared by the tests
_forward = _jit(s5.forward, static_argnames=("conj_sym", "discretization", "reverse", "method"))
_init = _jit(s5.init, static_argnums=(1, 2, 3, 4, 5, 6))


def _applied(layer, **static):
    """layer.apply, compiled (`static`: the apply's keyword arguments that select a program)."""
    return _jit(lambda variables, *args: layer.apply(variables, *args, **static))


def hippo_n_formula(n):
    """Smith et al. 2023, eq. for HiPPO-N: −sqrt((i+½)(k+½)) below the diagonal, −½ on it,
    +sqrt((i+½)(k+½)) above."""
    a = np.zeros((n, n))
    for i in range(n):
        for k in range(n):
            size = np.sqrt((i + 0.5) * (k + 0.5))
            a[i, k] = -size if i > k else (-0.5 if i == k else size)
    return a


def numpy_s5(p, u, h0=None, *, conj_sym=True, discretization="zoh", reverse=False):
    """The paper's diagonal recurrence one step at a time in complex128: u [time, batch, H] ->
    (y [time, batch, H], x_last [batch, P'])."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lam = p["Lambda_re"] + 1j * p["Lambda_im"]
    b = p["B_re"] + 1j * p["B_im"]
    c = p["C_re"] + 1j * p["C_im"]
    delta = np.exp(p["log_step"])
    if discretization == "zoh":
        lam_bar = np.exp(lam * delta)
        b_bar = ((lam_bar - 1) / lam)[:, None] * b
    else:
        lam_bar = (1 + delta * lam / 2) / (1 - delta * lam / 2)
        b_bar = (delta / (1 - delta * lam / 2))[:, None] * b
    time, batch, _ = u.shape
    x = np.zeros((batch, lam.size), complex) if h0 is None else np.asarray(h0, complex)
    y = np.zeros(u.shape)
    for t in range(time - 1, -1, -1) if reverse else range(time):
        x = lam_bar * x + u[t] @ b_bar.T
        y[t] = (2 if conj_sym else 1) * (x @ c.T).real + p["D"] * u[t]
    return y, x


def _params(h=3, p=8, blocks=2, conj_sym=True, seed=0):
    """Initial parameters moved off their initial values: Λ's real parts spread, every
    timescale different."""
    params = _init(jax.random.key(seed), h, p, blocks, conj_sym, 0.001, 0.1)
    rng = np.random.default_rng(seed)
    states = params["log_step"].shape[0]
    spread = {
        "Lambda_re": -np.exp(rng.normal(size=states)) * 0.5,
        "log_step": rng.uniform(np.log(0.05), np.log(0.5), states),
    }
    return {k: np.asarray(spread.get(k, v), np.float32) for k, v in params.items()}


# ---------------------------------------------------------------- initialisation


def test_hippo_n_is_its_formula_and_its_eigenbasis_diagonalises_it():
    for n in (1, 2, 5, 8):
        np.testing.assert_allclose(s5.hippo_n(n), hippo_n_formula(n), atol=1e-12)
    # the block-diagonal eigenbasis: A V = V Λ, orthonormal columns, Re Λ = −1/2 exactly
    a = scipy.linalg.block_diag(hippo_n_formula(4), hippo_n_formula(4))
    for conj_sym in (False, True):
        lam, v = s5.eigenbasis(8, blocks=2, conj_sym=conj_sym)
        assert lam.shape == (4 if conj_sym else 8,) and v.shape == (8, lam.size)
        np.testing.assert_allclose(a @ v, v * lam, atol=1e-12)
        np.testing.assert_allclose(v.conj().T @ v, np.eye(lam.size), atol=1e-12)
        np.testing.assert_array_equal(lam.real, -0.5)
    # its eigenvalues are a general eig's; with conj_sym one of each conjugate pair is kept
    full = np.linalg.eigvals(hippo_n_formula(8))
    np.testing.assert_allclose(full.real, -0.5, atol=1e-12)
    lam, _ = s5.eigenbasis(8, conj_sym=True)
    kept = np.concatenate([lam, lam.conj()])
    by_frequency = lambda z: z[np.argsort(z.imag)]  # noqa: E731
    np.testing.assert_allclose(by_frequency(kept), by_frequency(full), atol=1e-10)


def test_init_and_the_modules_parameters():
    params = _init(jax.random.key(1), 3, 8, 2, True, 0.01, 0.2)
    lam, _ = s5.eigenbasis(8, 2, conj_sym=True)
    np.testing.assert_allclose(params["Lambda_re"] + 1j * params["Lambda_im"], lam, atol=1e-6)
    steps = np.exp(np.asarray(params["log_step"]))
    assert steps.shape == (4,) and np.all((steps >= 0.01 - 1e-7) & (steps <= 0.2 + 1e-7))
    assert all(v.dtype == jnp.float32 for v in params.values())
    x = jnp.ones((2, 5, 3))
    key = jax.random.key(4)
    got = _jit(lnn.S5(d_state=8, blocks=2).init)(key, x)["params"]
    want = _init(first_params_key(key), 3, 8, 2, True, 0.001, 0.1)  # compiled like the module's
    assert set(got) == set(want) == set(s5.PARAM_NAMES)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


# ---------------------------------------------------------------- the paper's equations


def _real_system_output(a, b, c, d, delta, u, discretization):
    """The real system (A, B, C, D) discretised with step Δ in its own basis, in float64."""
    if discretization == "zoh":
        a_bar = scipy.linalg.expm(a * delta)
        b_bar = np.linalg.solve(a, (a_bar - np.eye(len(a))) @ b)
    else:
        left = np.eye(len(a)) - delta / 2 * a
        a_bar = np.linalg.solve(left, np.eye(len(a)) + delta / 2 * a)
        b_bar = np.linalg.solve(left, delta * b)
    x = np.zeros((u.shape[1], len(a)))
    y = np.zeros(u.shape)
    for t in range(u.shape[0]):
        x = x @ a_bar.T + u[t] @ b_bar.T
        y[t] = x @ c.T + u[t] * d
    return y


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_the_layer_is_the_real_hippo_n_system_discretised(discretization):
    """With B̃ = V⁻¹B, C̃ = CV from real B, C and one timescale, the layer (both with and
    without conjugate symmetry) equals block-diagonal HiPPO-N discretised as a real matrix."""
    rng = np.random.default_rng(2)
    h, p, blocks, delta = 3, 8, 2, 0.3
    b, c, d = rng.normal(size=(p, h)), rng.normal(size=(h, p)), rng.normal(size=h)
    u = rng.normal(size=(10, 2, h))
    a = scipy.linalg.block_diag(*[hippo_n_formula(p // blocks)] * blocks)
    want = _real_system_output(a, b, c, d, delta, u, discretization)
    for conj_sym in (True, False):
        lam, v = s5.eigenbasis(p, blocks, conj_sym)
        b_tilde, c_tilde = v.conj().T @ b, c @ v
        params = {
            "Lambda_re": lam.real, "Lambda_im": lam.imag, "B_re": b_tilde.real,
            "B_im": b_tilde.imag, "C_re": c_tilde.real, "C_im": c_tilde.imag, "D": d,
            "log_step": np.full(lam.size, np.log(delta)),
        }  # fmt: skip
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        y, _ = _forward(
            params, u.astype(np.float32), conj_sym=conj_sym, discretization=discretization,
            method="sequential",
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(y), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_forward_matches_the_papers_recurrence(method):
    rng = np.random.default_rng(3)
    u = rng.normal(size=(10, 2, 3)).astype(np.float32)
    h0 = (rng.normal(size=(2, 8)) + 1j * rng.normal(size=(2, 8))).astype(np.complex64)
    for conj_sym, kw in (
        (True, {"discretization": "zoh"}),
        (False, {"discretization": "bilinear", "h0": h0, "reverse": True}),
    ):
        p = _params(conj_sym=conj_sym)
        y, x_last = _forward(p, u, conj_sym=conj_sym, method=method, **kw)
        y_ref, x_ref = numpy_s5(p, u, conj_sym=conj_sym, **kw)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=5e-5, rtol=5e-5)
        np.testing.assert_allclose(np.asarray(x_last), x_ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_gradients_match_the_numpy_recurrence(discretization):
    """<∇L, v> of L = Σ w ⊙ y against a float64 central difference of the numpy loop, along
    random directions v in every parameter and the input."""
    rng = np.random.default_rng(4)
    p = _params(conj_sym=True, seed=1)
    u = rng.normal(size=(8, 2, 3)).astype(np.float32)
    w = rng.normal(size=u.shape)

    def loss(p, u):
        return jnp.sum(w * s5.forward(p, u, discretization=discretization)[0])

    def numpy_loss(p, u):
        return np.sum(w * numpy_s5(p, u, discretization=discretization)[0])

    grad_p, grad_u = _jit(jax.grad(loss, argnums=(0, 1)))(p, u)
    for _ in range(3):
        v = {k: rng.normal(size=x.shape) for k, x in p.items()}
        v_u = rng.normal(size=u.shape)
        eps = 1e-5
        shift = [({k: p[k] + s * eps * v[k] for k in p}, u + s * eps * v_u) for s in (1, -1)]
        want = (numpy_loss(*shift[0]) - numpy_loss(*shift[1])) / (2 * eps)
        got = sum(np.sum(np.asarray(grad_p[k]) * v[k]) for k in p)
        got += np.sum(np.asarray(grad_u) * v_u)
        np.testing.assert_allclose(got, want, rtol=2e-4)


# ---------------------------------------------------------------- the s5-pytorch package


def test_equal_to_s5_pytorch_given_the_same_weights():
    """s5-pytorch 0.2.1's S5 (full state, y = Re(C̃ x) + D u: our conj_sym=False) with its
    own HiPPO-N initialisation: the same eigenvalues, outputs, final states and gradients, by
    zero-order hold and (its `discretize_bilinear`) the bilinear transform."""
    torch = pytest.importorskip("torch")
    package = pytest.importorskip("s5")
    torch.manual_seed(0)
    h, p = 3, 8
    module = package.S5(h, p)
    ssm = module.seq
    lam_theirs = ssm.Lambda.detach().numpy()
    lam_ours, _ = s5.eigenbasis(p, conj_sym=False)
    np.testing.assert_allclose(
        lam_theirs[np.argsort(lam_theirs.imag)], lam_ours[np.argsort(lam_ours.imag)], atol=1e-5
    )
    with torch.no_grad():  # timescales off their tiny initial values, so that states move
        ssm.log_step.copy_(torch.linspace(np.log(0.05), np.log(0.5), p))
    ours = {
        "Lambda_re": ssm.Lambda.real, "Lambda_im": ssm.Lambda.imag, "B_re": ssm.B[..., 0],
        "B_im": ssm.B[..., 1], "C_re": ssm.C.real, "C_im": ssm.C.imag, "D": ssm.D,
        "log_step": ssm.log_step,
    }  # fmt: skip
    ours = {k: v.detach().numpy().copy() for k, v in ours.items()}
    x = torch.randn(2, 9, h, requires_grad=True)  # batch-major, as the package
    cotangent = torch.randn(2, 9, h)
    for discretization, theirs in (("zoh", None), ("bilinear", package.discretize_bilinear)):
        if theirs is not None:
            ssm.discretize = theirs
        module.zero_grad()
        x.grad = None
        y_t, state_t = module(x, return_state=True)
        (y_t * cotangent).sum().backward()

        def loss(params, x, d=discretization):
            y, state = lnn.S5(p, conj_sym=False, discretization=d).apply(
                {"params": params}, x, return_carry=True
            )[::-1]
            return jnp.sum(y * cotangent.numpy()), (y, state)

        (_, (y, state)), grads = _jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            ours, x.detach().numpy()
        )
        np.testing.assert_allclose(np.asarray(y), y_t.detach().numpy(), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(state), state_t.detach().numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(grads[1]), x.grad.numpy(), atol=2e-5, rtol=1e-4)
        # torch's gradient of a real loss in a complex parameter z is dL/dRe z + i dL/dIm z
        g = {name: grads[0][name] for name in ours}
        pairs = (
            (g["Lambda_re"] + 1j * g["Lambda_im"], ssm.Lambda.grad),
            (np.stack([g["B_re"], g["B_im"]], -1), ssm.B.grad),
            (g["C_re"] + 1j * g["C_im"], ssm.C.grad),
            (g["D"], ssm.D.grad),
            (g["log_step"], ssm.log_step.grad),
        )
        for got, want in pairs:
            np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=5e-5, rtol=1e-4)


# ---------------------------------------------------------------- module, mixer, errors


def test_module_steps_padding_and_resets():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 3)).astype(np.float32)
    layer = lnn.S5(d_state=8, blocks=2, discretization="bilinear", scan_method="sequential")
    variables = {"params": _params()}
    p = variables["params"]
    kw = {"discretization": "bilinear"}

    @functools.partial(_jit, static_argnames="reverse")
    def full(x, lengths, h0, resets, reverse=False):  # one program for every call below
        return layer.apply(
            variables, x, lengths, initial_carry=h0, resets=resets, reverse=reverse,
            return_carry=True,
        )  # fmt: skip

    no_resets, every_step = np.zeros((3, 7), bool), np.full(3, 7)
    # steps equal the full call
    h0 = (rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))).astype(np.complex64)
    _, y = full(x, every_step, h0, no_resets)
    step = _applied(layer, method="step")
    h = h0
    for t in range(7):
        h, y_t = step(variables, h, x[:, t])
        np.testing.assert_allclose(np.asarray(y_t), np.asarray(y[:, t]), atol=2e-5)
    carry = layer.initial_carry(3)
    assert carry.shape == (3, 4) and carry.dtype == jnp.complex64
    assert lnn.S5(d_state=8, conj_sym=False).initial_carry(2).shape == (2, 8)
    # padding, reverse within lengths
    lengths = np.array([7, 4, 0])
    for reverse in (False, True):
        h_last, y = full(x, lengths, carry, no_resets, reverse=reverse)
        for b, n in enumerate(lengths):
            assert np.all(np.asarray(y)[b, n:] == 0.0)
            if n:
                want = numpy_s5(p, x[b : b + 1, :n].swapaxes(0, 1), reverse=reverse, **kw)
                np.testing.assert_allclose(np.asarray(y)[b, :n], want[0][:, 0], atol=5e-5)
                np.testing.assert_allclose(np.asarray(h_last[b]), want[1][0], atol=5e-5)
    # resets restart sequence 0 at step 2
    resets = no_resets.copy()
    resets[0, 2] = True
    _, y = full(x, every_step, carry, resets)
    want = numpy_s5(p, x[:1, 2:].swapaxes(0, 1), **kw)[0][:, 0]
    np.testing.assert_allclose(np.asarray(y)[0, 2:], want, atol=5e-5)


def test_the_mixer_from_the_config_and_its_model_steps():
    """model.s5 builds the layer its options say; a model's one-step path (what `generate`
    runs) equals its full call; bad options are named by their config key."""
    config = config_lib.default_config()
    config.model.update({"mixer": "s5", "d_model": 4, "num_layers": 1})
    config.model.s5.update({"d_state": 12, "blocks": 3, "discretization": "bilinear"})
    config_lib.validate(config)
    spec = TaskSpec(name="t", kind="per_step", seq_len=4, num_outputs=7, vocab_size=7)
    model = config_lib.build_model(config.model, spec)
    tokens = np.array([[1, 2, 5, 6], [3, 4, 0, 2]], np.int32)
    variables, logits = _jit(lambda key: (v := model.init(key, tokens), model.apply(v, tokens)))(
        jax.random.key(0)
    )
    mixer = variables["params"]["blocks_0"]["mixer"]
    assert mixer["B_re"].shape == (6, 4) and mixer["C_im"].shape == (4, 6)
    lam, _ = s5.eigenbasis(12, 3, conj_sym=True)  # three blocks of HiPPO-N 4
    np.testing.assert_allclose(mixer["Lambda_im"], lam.imag, atol=1e-5)
    step = _jit(lambda carry, token: model.apply(variables, carry, token, method="step"))
    carry = model.apply(variables, 2, method="initial_carry")
    for t in range(4):
        carry, step_logits = step(carry, tokens[:, t])
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(logits[:, t]), atol=1e-5)

    for key, value, match in (
        ("blocks", 5, "config.model.s5.blocks: expected a divisor of d_state 12"),
        ("d_state", 9, "config.model.s5.d_state: expected a multiple of 2 x blocks = 6"),
        ("dt_min", 0.5, r"config.model.s5.dt_min, dt_max: expected 0 < dt_min <= dt_max"),
        ("dt_max", 0, "config.model.s5.dt_max: expected a positive number"),
        ("discretization", "euler", "config.model.s5.discretization: expected one of"),
        ("scan_method", "cumsum", "config.model.s5.scan_method: expected one of"),
    ):
        bad = config_lib.default_config()
        bad.model.s5.update({"d_state": 12, "blocks": 3})
        bad.model.s5[key] = value
        with pytest.raises(ValueError, match=match):
            config_lib.validate(bad)


def test_bad_input_is_named():
    x = jnp.ones((2, 5, 3))
    layer = lnn.S5(d_state=8)
    variables = {"params": _params()}  # the parameters' shapes do not depend on the blocks
    with pytest.raises(ValueError, match="x: the parameters expect 3 features"):
        layer.apply(variables, jnp.ones((2, 5, 4)))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        layer.apply(variables, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"resets: expected rank 2 \[batch, time\]"):
        layer.apply(variables, x, resets=jnp.zeros((5,), bool))
    with pytest.raises(ValueError, match=r"x: expected rank 2 \[batch, H\]"):
        layer.apply(variables, layer.initial_carry(2), x, method="step")
    with pytest.raises(ValueError, match="discretization: expected one of"):
        s5.forward(variables["params"], x, discretization="euler")
    with pytest.raises(ValueError, match="discretization: expected one of"):
        lnn.S5(d_state=8, discretization="euler").apply(
            variables, layer.initial_carry(2), x[:, 0], method="step"
        )
    with pytest.raises(ValueError, match="blocks: expected a divisor of d_state 8"):
        lnn.S5(d_state=8, blocks=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="d_state: expected a multiple of 2 x blocks = 2"):
        lnn.S5(d_state=7).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="scan_method: expected one of"):
        lnn.S5(d_state=8, scan_method="cumsum").init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="d_model: expected a positive int"):
        s5.init(jax.random.key(0), 3.0, 8)
