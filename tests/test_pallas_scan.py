"""The Pallas scan kernel against a numpy loop and the sequential scan.

On CPU the kernel runs in Pallas' interpret mode; on a GPU the same tests run the compiled Triton
kernel (`interpret` left to its default), which also exercises the masking of partial lane
blocks that interpret mode cannot see (it pads blocks).
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax.kernels import pallas_scan
from lru_jax.kernels.pallas_scan import pallas_linear_scan
from lru_jax.scan import linear_scan

# [time, batch, state]: 2 * 6 = 12 lanes, so a block of 8 leaves a partial, masked block.
SHAPE = (21, 2, 6)


def numpy_loop(a, b, h0=None, reverse=False, resets=None):
    """h_t = a_t h_{t-1} + b_t one step at a time in float64/complex128; reset: h_{t-1} = 0."""
    b = np.asarray(b, np.complex128 if np.iscomplexobj(b) else np.float64)
    a = np.broadcast_to(a, b.shape)
    h = np.zeros(b.shape[1:], b.dtype) if h0 is None else np.asarray(h0, b.dtype)
    out = np.zeros_like(b)
    for t in reversed(range(len(b))) if reverse else range(len(b)):
        if resets is not None and resets[t].any():
            h = np.where(resets[t].reshape(resets[t].shape + (1,) * (b.ndim - resets.ndim)), 0, h)
        h = a[t] * h + b[t]
        out[t] = h
    return out


def _inputs(seed, complex_, time_varying, time=SHAPE[0]):
    rng = np.random.default_rng(seed)
    shape = (time, *SHAPE[1:])
    a = rng.uniform(0.6, 1.0, shape if time_varying else shape[-1:])
    b = rng.normal(size=shape)
    h0 = rng.normal(size=shape[1:])
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, a.shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
    dtype = np.complex64 if complex_ else np.float32
    resets = rng.uniform(size=shape[:2]) < 0.2
    return a.astype(dtype), b.astype(dtype), h0.astype(dtype), resets


def _close(got, want, tol=2e-5):
    got = np.asarray(got)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=tol * (1 + np.max(np.abs(want))), rtol=tol)


# (complex, time-varying a, kwargs of the reference, kernel knobs): each case one compilation.
FORWARD_CASES = {
    "real, one pass, partial block": (False, True, {"h0": True}, {"block_size": 8}),
    "complex, invariant a, reverse, resets": (
        True,
        False,
        {"h0": True, "reverse": True, "resets": True},
        {"block_size": 8},
    ),
    "complex, two passes, unrolled, resets": (
        True,
        True,
        {"resets": True},
        {"chunk_size": 5, "unroll": 4, "block_size": 4},
    ),
    "real, invariant a, reverse, two passes": (
        False,
        False,
        {"reverse": True, "h0": True},
        {"chunk_size": 8},
    ),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_matches_numpy_loop(case):
    complex_, time_varying, ref_kwargs, knobs = FORWARD_CASES[case]
    a, b, h0, resets = _inputs(0, complex_, time_varying)
    kwargs = {
        "h0": h0 if ref_kwargs.get("h0") else None,
        "reverse": ref_kwargs.get("reverse", False),
        "resets": resets if ref_kwargs.get("resets") else None,
    }
    got = pallas_linear_scan(a, b, **kwargs, **knobs)
    assert got.dtype == b.dtype
    _close(got, numpy_loop(a, b, **kwargs))


def test_linear_scan_method_pallas_single_step_and_broadcast_h0():
    # T = 1 (the single step is padded to a whole loop iteration); h0 [state] broadcasts.
    a, b, h0, resets = _inputs(1, True, True, time=1)
    got = linear_scan(a, b, h0[0], method="pallas", resets=resets)
    _close(got, numpy_loop(a, b, np.broadcast_to(h0[0], h0.shape), resets=resets))


def test_resets_by_hand_under_jit():
    # a = 2, b = 1, h0 = 5, a reset at t = 2: 11, 23, [reset] 1, 3.
    scan = jax.jit(lambda a, b, h0, r: linear_scan(a, b, h0, method="pallas", resets=r))
    got = scan(jnp.full((4, 1), 2.0), jnp.ones((4, 1)), jnp.array([5.0]), jnp.arange(4) == 2)
    np.testing.assert_allclose(np.asarray(got)[:, 0], [11.0, 23.0, 1.0, 3.0])


def test_planes_match_numpy_loop_without_complex_ops():
    a, b, h0, resets = _inputs(5, True, False)
    planes = jax.jit(
        lambda a, b, h0: pallas_scan.pallas_linear_scan_planes(a, b, h0, resets=resets)
    )
    args = [(jnp.real(x), jnp.imag(x)) for x in (a, b, h0)]
    h_re, h_im = planes(*args)
    _close(h_re + 1j * h_im, numpy_loop(a, b, h0, resets=resets))
    # Packing into complex numbers and the kernel's split back into planes cancel out.
    assert "c64[" not in planes.lower(*args).compile().as_text()


GRAD_CASES = {
    "real, time-varying a, resets, two passes": (False, True, {"chunk_size": 8}),
    "complex, invariant a, reverse, resets, one pass": (True, False, {"reverse": True}),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_sequential_autodiff(case):
    complex_, time_varying, kwargs = GRAD_CASES[case]
    a, b, h0, resets = _inputs(2, complex_, time_varying)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=b.shape), b.dtype)

    def loss(a, b, h0, method):
        h = linear_scan(a, b, h0, method=method, resets=resets, **kwargs)
        return jnp.sum(jnp.real(weights * h) + 0.1 * jnp.abs(h) ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0, "pallas")
    want = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0, "sequential")
    for name, g, w in zip("a b h0".split(), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        _close(g, np.asarray(w), tol=1e-4)


@pytest.mark.parametrize("complex_", [False, True])
def test_kernel_lowers_to_triton_for_cuda(complex_):
    """The GPU path, up to Triton IR: no power-of-two or unsupported-primitive surprises.

    (Lowering needs no GPU; compiling the Triton IR to PTX does and is not tested here.)
    """
    a, b, h0, resets = _inputs(4, complex_, False, time=300)

    def loss(a, b):
        h = pallas_linear_scan(a, b, h0, resets=resets, chunk_size=64, interpret=False)
        return jnp.sum(jnp.abs(h) ** 2)

    lowered = (
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(a, b).lower(lowering_platforms=("cuda",))
    )
    # forward: pass 1, scan over chunks, pass 2; backward: the same three for the adjoint.
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 6


def test_plan_covers_every_step_and_lane():
    for time, lanes in [(1, 1), (65536, 64), (16384, 4096), (1000, 1 << 20), (300, 7)]:
        block, chunk, n_chunks, unroll = pallas_scan.plan(time, lanes)
        assert block & (block - 1) == 0 and 32 <= block <= 512  # a power of two (Triton)
        assert chunk % unroll == 0 and n_chunks * chunk >= time > (n_chunks - 1) * chunk
    # Few lanes, long sequence: time is cut into chunks so programs fill the card.
    assert pallas_scan.plan(65536, 64).n_chunks > 1
    assert pallas_scan.plan(1000, 1 << 20).n_chunks == 1


def test_available_only_on_gpu_and_never_auto():
    # On a GPU this compiles and runs the Triton kernel (and every test above runs it too).
    assert pallas_scan.pallas_available() == (jax.default_backend() == "gpu")
    jaxpr = jax.make_jaxpr(lambda b: linear_scan(jnp.full((6,), 0.5), b))(jnp.ones((4, 6)))
    assert "pallas_call" not in str(jaxpr)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_size": 12}, ValueError, "block_size: expected a power of two"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"unroll": 0}, ValueError, "unroll"),
        ({"chunk_size": -1}, ValueError, "chunk_size"),
        ({"interpret": "yes"}, TypeError, "interpret"),
        ({"reverse": 1}, TypeError, "reverse"),
        ({"a": np.ones((6,), np.int32)}, TypeError, "a: expected a floating"),
        ({"a": np.ones((4,), np.float32)}, ValueError, "a and b must broadcast"),
        ({"a": np.ones((2, 5, 6), np.float32)}, ValueError, "a: expected a shape that leaves"),
        ({"b": np.float32(1.0)}, ValueError, "b: expected shape"),
        ({"h0": np.ones((3,), np.float32)}, ValueError, "h0"),
        ({"resets": np.ones((5,), np.float32)}, TypeError, "resets: expected a bool"),
        ({"resets": np.ones((4,), bool)}, ValueError, "resets: expected shape"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = {"a": np.full((6,), 0.5, np.float32), "b": np.ones((5, 6), np.float32)}
    args.update(kwargs)
    a, b = args.pop("a"), args.pop("b")
    with pytest.raises(error, match=match):
        pallas_linear_scan(a, b, **args)


def test_planes_bad_input_is_named():
    re = np.ones((5, 6), np.float32)
    with pytest.raises(TypeError, match="b: expected a \\(real, imaginary\\) pair"):
        pallas_scan.pallas_linear_scan_planes((re, re), re)
    with pytest.raises(TypeError, match="a: expected a floating-point dtype"):
        pallas_scan.pallas_linear_scan_planes((re.astype(np.complex64), re), (re, re))


def _broadcasts_to(jaxpr, shape):
    """Whether any equation in a jaxpr (recursively) broadcasts a value to `shape`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "broadcast_in_dim" and tuple(eqn.params["shape"]) == shape:
            return True
        if any(_broadcasts_to(sub, shape) for sub in jax.extend.core.jaxprs_in_params(eqn.params)):
            return True
    return False


def test_time_invariant_a_is_not_materialised():
    """Forward and backward: no [time, state] copy of a [state] decay."""
    a, b = jnp.full((8,), 0.9), jnp.ones((500, 8))

    def forward_and_backward(method):
        def run(a, b, cotangent):
            h, vjp = jax.vjp(lambda a, b: linear_scan(a, b, method=method), a, b)
            return h, vjp(cotangent)

        return jax.make_jaxpr(run)(a, b, b).jaxpr

    assert not _broadcasts_to(forward_and_backward("pallas"), (500, 8))
    # The check does see a materialised a: the associative scan needs one.
    assert _broadcasts_to(forward_and_backward("associative"), (500, 8))


def test_no_sequences_or_no_steps_give_an_empty_scan():
    for shape in ((5, 0, 6), (0, 2, 6)):
        h = pallas_linear_scan(jnp.full((6,), 0.5), jnp.ones(shape))
        assert h.shape == shape and h.dtype == jnp.float32
