"""The diagonal linear scan h_t = a_t * h_{t-1} + b_t as a Pallas kernel for GPUs (Triton).

Reached through ``lru_jax.scan.linear_scan(..., method="pallas")``; call `pallas_linear_scan`
directly only for the kernel's own knobs (`block_size`, `chunk_size`, `unroll`,
`interpret`). On a GPU the kernel is
lowered by Pallas' Triton backend; on any other backend it runs in Pallas' interpret mode
(correct, slow: for tests), which is why ``method="auto"`` never picks it off a GPU.

Layout. Time stays the leading axis and every axis after it is flattened into L "lanes"
(batch x state). The grid is (lane blocks, time chunks). A program owns `block` adjacent lanes
and walks its chunk of time step by step, loading a row a_t[lanes], b_t[lanes] (contiguous,
so loads coalesce) and storing h_t[lanes]. The scan is memory-bound; each loop iteration
issues the loads of `unroll` (8) steps before the first multiply, so several are in flight
per warp.

Block size (lanes per program) when not given: a power of two (Triton tensors must have a
power-of-two size), the smallest that keeps the number of lane blocks at or below
_TARGET_PROGRAMS, clamped to [_MIN_BLOCK, _MAX_BLOCK] = [32, 512]; num_warps = block / 128,
at least 1 and at most 4 (4 float32 lanes per thread, i.e. 16-byte loads, once block >= 128).
Lanes past L in the last block are masked on every load and store.

Time chunks (two passes), when lanes alone give too few programs (at most a quarter of
_TARGET_PROGRAMS lane blocks) and the sequence is long (at least 2 * _MIN_CHUNK steps): time
is cut into n_chunks chunks of `chunk` steps (n_chunks a power of two up to
_TARGET_PROGRAMS / lane blocks, chunk >= _MIN_CHUNK). Pass 1 runs every chunk from zero and
keeps only its end state and the product of its decays ([n_chunks, L] each); a short scan
over the chunks (the same kernel) gives the state entering each chunk; pass 2 reruns every
chunk from that state and stores h. Twice the reads for T / n_chunks dependent steps
instead of T. `chunk_size` overrides the
choice (rounded up to a multiple of the unroll; chunk_size >= T means one pass).

These sizes are educated defaults for NVIDIA cards of the H100 class, not yet tuned on one.

Complex numbers. Triton has no complex type: complex inputs are split into real and
imaginary float planes and the products are written out by hand. The split and the final
`lax.complex` are XLA ops outside the kernel: unless XLA fuses them into the producer of b and
the consumer of h, they add up to twice the kernel's own memory traffic. Callers that hold the
planes anyway can use `pallas_linear_scan_planes`, where under jit the two cancel out.

Gradients. `jax.custom_vjp`: the adjoint g_t = dL/dh_t + a_{t+1} g_{t+1} is itself a linear
scan, run by the same kernel in the opposite direction with each step's decay taken from the
step before it; then da_t = g_t h_{t-1}, db_t = g_t, dh0 = a_first g_first. As in JAX's own
autodiff of complex products, nothing is conjugated (cotangents are transposes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lru_jax import _checks

_UNROLL = 8  # steps per loop iteration: their loads are issued together
_MIN_BLOCK, _MAX_BLOCK = 32, 512
_TARGET_PROGRAMS = 2048  # about 16 resident programs on each of ~132 SMs
_MIN_CHUNK = 256  # shortest time chunk worth a second pass


def pallas_available() -> bool:
    """True when the default backend is a GPU and a tiny scan kernel compiles and runs there."""
    return jax.default_backend() == "gpu" and _kernel_runs_on_gpu()


@functools.cache
def _kernel_runs_on_gpu() -> bool:
    try:
        b = jnp.ones((2, 3), jnp.float32)
        h = pallas_linear_scan(jnp.full((3,), 0.5, jnp.float32), b, interpret=False)
        return bool(np.allclose(np.asarray(h), [[1.0] * 3, [1.5] * 3]))
    except Exception:  # no Triton lowering, no GPU plugin, ...: the kernel is not available
        return False


class Plan(NamedTuple):
    """How the work is cut: `block` lanes per program, `n_chunks` chunks of `chunk` steps,
    loads issued `unroll` steps at a time (`chunk` is a multiple of `unroll`)."""

    block: int
    chunk: int
    n_chunks: int
    unroll: int


def plan(
    time: int,
    lanes: int,
    block_size: int | None = None,
    chunk_size: int | None = None,
    unroll: int = _UNROLL,
) -> Plan:
    """The `Plan` for `time` steps over `lanes` lanes (see the module docstring)."""
    block = block_size or min(
        _MAX_BLOCK, max(_MIN_BLOCK, pl.next_power_of_2(-(-lanes // _TARGET_PROGRAMS)))
    )
    lane_blocks = -(-lanes // block)
    if chunk_size is None:
        n_chunks = 1
        if lane_blocks * 4 <= _TARGET_PROGRAMS:
            wanted = 1 << ((_TARGET_PROGRAMS // lane_blocks).bit_length() - 1)
            n_chunks = max(1, min(wanted, time // _MIN_CHUNK))
        chunk_size = -(-time // n_chunks)
    chunk = _round_up(min(chunk_size, time), unroll)
    return Plan(block, chunk, -(-time // chunk), unroll)


def pallas_linear_scan(
    a,
    b,
    h0=None,
    *,
    reverse: bool = False,
    resets=None,
    chunk_size: int | None = None,
    block_size: int | None = None,
    unroll: int | None = None,
    interpret: bool | None = None,
):
    """h_t = a_t * h_{t-1} + b_t along axis 0 by the Pallas kernel; as `linear_scan`.

    Args:
      a: [time, ...] or [...] (time-invariant, never copied over time), real or complex,
        broadcastable against `b`.
      b: [time, ...] the input term; time or the state may be empty (h is then empty).
      h0: optional [...] state before the first step (after the last if `reverse`).
      reverse: run from the last step to the first.
      resets: optional bool [time, *leading state axes]: where true, h_t = b_t.
      chunk_size: time steps per program; None chooses (see the module docstring).
      block_size: lanes per program, a power of two; None chooses.
      unroll: steps per loop iteration, whose loads are issued together; None: 8 on a GPU,
        1 in interpret mode (where unrolling only slows compilation).
      interpret: run Pallas' interpreter instead of the GPU kernel; None: unless on a GPU.

    Returns:
      h: [time, ...] with shape broadcast(a, b) and dtype result_type(a, b, h0). float16 and
      bfloat16 are computed in float32.
    """
    out_shape = _check(a, b, h0, resets, reverse, chunk_size, block_size, unroll, interpret)
    dtype = jnp.result_type(a, b, *(() if h0 is None else (h0,)))
    compute = _compute_dtype(dtype)
    time, state = out_shape[0], out_shape[1:]
    lanes = math.prod(state)
    if time == 0 or lanes == 0:  # nothing to scan: no program to launch (and no plan)
        return jnp.zeros(out_shape, dtype)

    a = jnp.asarray(a, compute)
    if a.ndim == len(out_shape) and a.shape[0] == time and time > 1:
        a = jnp.broadcast_to(a, out_shape).reshape(time, lanes)
    else:
        a = jnp.broadcast_to(a[0] if a.ndim == len(out_shape) else a, state).reshape(lanes)
    b = jnp.broadcast_to(jnp.asarray(b, compute), out_shape).reshape(time, lanes)
    h0 = jnp.zeros(state, compute) if h0 is None else jnp.asarray(h0, compute)
    h0 = jnp.broadcast_to(h0, state).reshape(lanes)
    if resets is not None:
        resets = jnp.asarray(resets)
        resets = resets.reshape(resets.shape + (1,) * (len(out_shape) - resets.ndim))
        resets = jnp.broadcast_to(resets, out_shape).reshape(time, lanes).astype(jnp.int8)

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    unroll = unroll or (1 if interpret else _UNROLL)
    static = _Static(reverse, plan(time, lanes, block_size, chunk_size, unroll), interpret)
    h = _scan_jit(static, a, b, h0, resets)
    return h.reshape(out_shape).astype(dtype)


def pallas_linear_scan_planes(a, b, h0=None, **kwargs):
    """`pallas_linear_scan` for complex numbers held as (real, imaginary) pairs of real arrays.

    Args:
      a: (a_re, a_im), each [time, ...] or [...], broadcastable against b's planes.
      b: (b_re, b_im), each [time, ...].
      h0: optional (h0_re, h0_im), each [...].
      **kwargs: as `pallas_linear_scan` (reverse, resets, chunk_size, block_size, ...).

    Returns:
      (h_re, h_im), each [time, ...].

    Inside `jax.jit` the packing into complex numbers and the kernel's split back into planes
    cancel out (XLA simplifies real(complex(x, y)) to x), so a caller that has the planes
    anyway, e.g. from two real matmuls, saves the two extra passes over memory that complex
    inputs and outputs cost. Gradients flow to every plane.
    """
    for name, pair in (("a", a), ("b", b), ("h0", h0)):
        if pair is not None and (not isinstance(pair, (tuple, list)) or len(pair) != 2):
            raise TypeError(f"{name}: expected a (real, imaginary) pair, got {type(pair).__name__}")
        for part in () if pair is None else pair:
            _checks.floating(name, part, allow_complex=False)
    h = pallas_linear_scan(_pack(a), _pack(b), _pack(h0), **kwargs)
    return h.real, h.imag


def _pack(pair):
    if pair is None:
        return None
    re, im = jnp.broadcast_arrays(*pair)
    dtype = jnp.promote_types(re.dtype, im.dtype)
    return jax.lax.complex(re.astype(dtype), im.astype(dtype))


def _check(a, b, h0, resets, reverse, chunk_size, block_size, unroll, interpret):
    """Names the argument of any mistake; returns the output shape [time, ...]."""
    a_shape = _checks.floating("a", a)
    b_shape = _checks.floating("b", b)
    if len(b_shape) == 0:
        raise ValueError(f"b: expected shape [time, ...], got {b_shape}")
    out_shape = _checks.broadcastable(("a", "b"), (a_shape, b_shape))
    if len(out_shape) != len(b_shape) or out_shape[0] != b_shape[0]:
        raise ValueError(f"a: expected a shape that leaves b's time axis alone, got {a_shape}")
    if h0 is not None:
        h0_shape = _checks.floating("h0", h0)
        _checks.broadcastable(("h0", "the state"), (h0_shape, out_shape[1:]))
        if np.broadcast_shapes(h0_shape, out_shape[1:]) != out_shape[1:]:
            raise ValueError(
                f"h0: expected a shape broadcastable to {out_shape[1:]}, got {h0_shape}"
            )
    if resets is not None:
        if not hasattr(resets, "dtype"):  # a list: arrays and tracers keep their type
            resets = np.asarray(resets)
        r_shape, r_dtype = tuple(resets.shape), resets.dtype
        if r_dtype != np.bool_:
            raise TypeError(f"resets: expected a bool array, got dtype {r_dtype}")
        padded = r_shape + (1,) * (len(out_shape) - len(r_shape))
        if not r_shape or len(r_shape) > len(out_shape) or r_shape[0] != out_shape[0]:
            raise ValueError(
                f"resets: expected shape [time={out_shape[0]}, *leading state axes], got {r_shape}"
            )
        _checks.broadcastable(("resets", "the output"), (padded, out_shape))
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse: expected a bool, got {reverse!r}")
    if chunk_size is not None:
        _checks.positive_int("chunk_size", chunk_size)
    if block_size is not None:
        _checks.positive_int("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two (Triton), got {block_size}")
    if unroll is not None:
        _checks.positive_int("unroll", unroll)
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"interpret: expected a bool or None, got {interpret!r}")
    return out_shape


def _compute_dtype(dtype):
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if dtype == jnp.complex128 else jnp.complex64)
    return jnp.dtype(jnp.float64 if dtype == jnp.float64 else jnp.float32)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Differentiation: the adjoint is a scan too, run by the same kernel.


class _Static(NamedTuple):
    reverse: bool
    plan: Plan
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static, a, b, h0, resets):
    """a: [T, L] or [L]; b: [T, L]; h0: [L]; resets: int8 [T, L] or None -> h [T, L]."""
    return _run(static, a, b, h0, resets, reverse=static.reverse, prev_a=False)


def _scan_fwd(static, a, b, h0, resets):
    h = _scan(static, a, b, h0, resets)
    return h, (a, h0, resets, h)


def _scan_bwd(static, residuals, ct):
    a, h0, resets, h = residuals
    # g_t = ct_t + a_{next} g_{next}: the opposite direction, decay of the step before.
    g = _run(static, a, ct, jnp.zeros_like(h0), resets, reverse=not static.reverse, prev_a=True)
    first = h.shape[0] - 1 if static.reverse else 0
    if static.reverse:
        h_prev = jnp.concatenate([h[1:], h0[None]], axis=0)
    else:
        h_prev = jnp.concatenate([h0[None], h[:-1]], axis=0)
    da_steps = g * h_prev
    a_first = a[first] if a.ndim == 2 else a
    if resets is not None:
        da_steps = jnp.where(resets == 0, da_steps, 0)
        a_first = jnp.where(resets[first] == 0, a_first, 0)
    da = da_steps if a.ndim == 2 else jnp.sum(da_steps, axis=0)
    return da, g, a_first * g[first], None


_scan.defvjp(_scan_fwd, _scan_bwd)
# One trace and compilation per (static, shapes): eager pallas_calls would recompile each call.
_scan_jit = jax.jit(_scan, static_argnums=0)


def _run(static, a, b, h0, resets, *, reverse, prev_a):
    """One scan of complex-or-real arrays through the kernel (planes in, planes out)."""
    out = _scan_planes(
        _split(a), _split(b), _split(h0), resets, static.plan, reverse, prev_a, static.interpret
    )
    return out[0] if len(out) == 1 else jax.lax.complex(*out)


def _split(x):
    return (x.real, x.imag) if jnp.iscomplexobj(x) else (x,)


# The kernel.


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one pallas_call."""

    time: int
    lanes: int
    plan: Plan
    planes: int  # 1 for real, 2 for complex (real and imaginary planes)
    time_varying: bool
    has_resets: bool
    reverse: bool
    prev_a: bool  # step t multiplies by the decay of the step before it (the adjoint scan)
    summary: bool  # store only each chunk's end state and decay product, not every h_t


def _scan_planes(a, b, h0, resets, plan_, reverse, prev_a, interpret):
    """a: planes [T, L] or [L]; b: planes [T, L]; h0: planes [L] -> h: planes [T, L]."""
    time, lanes = b[0].shape
    spec = _Spec(
        time, lanes, plan_, len(b), a[0].ndim == 2, resets is not None, reverse, prev_a, False
    )
    if plan_.n_chunks == 1:
        return _call(spec, a, b, [x[None] for x in h0], resets, interpret)
    summary = _call(dataclasses.replace(spec, summary=True), a, b, [], resets, interpret)
    end, decay = summary[: spec.planes], summary[spec.planes :]
    # State after each chunk, in scan order: a scan over the chunks with h0 as the start.
    n = plan_.n_chunks
    over_chunks = Plan(plan_.block, _round_up(n, plan_.unroll), 1, plan_.unroll)
    after = _scan_planes(decay, end, h0, None, over_chunks, False, False, interpret)
    entry = [jnp.concatenate([h[None], x[:-1]], axis=0) for h, x in zip(h0, after, strict=True)]
    return _call(spec, a, b, entry, resets, interpret)


def _call(spec: _Spec, a, b, h0, resets, interpret):
    """One pallas_call over the grid (lane blocks, chunks); returns a tuple of planes."""
    block, chunk, n_chunks, _ = spec.plan
    rows = pl.BlockSpec((spec.time, block), lambda i, c: (0, i))  # every step, `block` lanes
    lanes_only = pl.BlockSpec((block,), lambda i, c: (i,))
    per_chunk = pl.BlockSpec((pl.squeezed, block), lambda i, c: (c, i))
    in_specs = [rows if spec.time_varying else lanes_only] * len(a) + [rows] * len(b)
    in_specs += [per_chunk] * len(h0) + [rows] * spec.has_resets
    args = [*a, *b, *h0, *([resets] if spec.has_resets else [])]
    dtype = b[0].dtype
    if spec.summary:
        out_shape = [jax.ShapeDtypeStruct((n_chunks, spec.lanes), dtype)] * (2 * spec.planes)
        out_specs = [per_chunk] * (2 * spec.planes)
    else:
        out_shape = [jax.ShapeDtypeStruct((spec.time, spec.lanes), dtype)] * spec.planes
        out_specs = [rows] * spec.planes
    return pl.pallas_call(
        functools.partial(_kernel, spec),
        out_shape=tuple(out_shape),
        grid=(pl.cdiv(spec.lanes, block), n_chunks),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=min(4, max(1, block // 128))),
        name="linear_scan",
    )(*args)


def _kernel(spec: _Spec, *refs):
    """One program: `block` lanes, one chunk of steps (see the module docstring)."""
    refs = iter(refs)
    n = spec.planes
    a_refs = [next(refs) for _ in range(n)]
    b_refs = [next(refs) for _ in range(n)]
    h0_refs = [] if spec.summary else [next(refs) for _ in range(n)]
    r_ref = next(refs) if spec.has_resets else None
    out_refs = list(refs)

    block, chunk, n_chunks, unroll = spec.plan
    lane = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    lane_ok = lane < spec.lanes
    dtype = b_refs[0].dtype

    def load(ref, t=None):
        return plt.load(ref if t is None else ref.at[t], mask=lane_ok, other=0)

    a_fixed = None if spec.time_varying else [load(r) for r in a_refs]
    zero = jnp.zeros((block,), dtype)
    h = [load(r) for r in h0_refs] if h0_refs else [zero] * n
    decay = [jnp.ones((block,), dtype), zero][:n] if spec.summary else []  # product of m's
    start = pl.program_id(1) * chunk
    # The last chunk may run past the end: those steps read clamped rows and are never stored,
    # and nothing uses the last chunk's summary, so they need no other care.
    padded = chunk * n_chunks > spec.time

    def time_of(step):
        t = spec.time - 1 - step if spec.reverse else step
        return jnp.minimum(jnp.maximum(t, 0), spec.time - 1)

    def inputs(step):
        """(decay m, input b) of one step, loaded for this program's lanes."""
        b_t = [load(r, time_of(step)) for r in b_refs]
        a_step = step - 1 if spec.prev_a else step
        m = [load(r, time_of(a_step)) for r in a_refs] if spec.time_varying else a_fixed
        keep = step >= 1 if spec.prev_a else None
        if spec.has_resets:
            restart = load(r_ref, time_of(a_step)) != 0
            keep = ~restart if keep is None else keep & ~restart
        if keep is not None:
            m = [jnp.where(keep, x, 0) for x in m]
        return m, b_t

    def group(j, carry):
        h, decay = carry
        steps = [start + j * unroll + u for u in range(unroll)]
        loaded = [inputs(s) for s in steps]  # all loads first: they overlap in flight
        states = []
        for m, b_t in loaded:
            h = _add(_mul(m, h), b_t)
            if spec.summary:
                decay = _mul(m, decay)
            states.append(h)
        if not spec.summary:
            for step, h_t in zip(steps, states, strict=True):
                mask = lane_ok & (step < spec.time) if padded else lane_ok
                for ref, x in zip(out_refs, h_t, strict=True):
                    plt.store(ref.at[time_of(step)], x, mask=mask)
        return h, decay

    h, decay = jax.lax.fori_loop(0, chunk // unroll, group, (h, decay))
    if spec.summary:
        for ref, x in zip(out_refs, [*h, *decay], strict=True):
            plt.store(ref, x, mask=lane_ok)


def _mul(x, y):
    """Product of two numbers given as planes: (re,) or (re, im)."""
    if len(x) == 1:
        return [x[0] * y[0]]
    return [x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0]]


def _add(x, y):
    return [u + v for u, v in zip(x, y, strict=True)]
