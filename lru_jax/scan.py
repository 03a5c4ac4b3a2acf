"""The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t: the one place that runs it.

Every method computes the same thing along axis 0 (time) and differs only in how:

- ``"sequential"``: `jax.lax.scan`, T dependent steps, O(1) extra memory per step.
- ``"associative"``: `jax.lax.associative_scan` on pairs (a, b) with
  (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2); O(log T) depth, O(T) work, but a must be
  materialised at every step.
- ``"chunked"``: time is cut into blocks of `chunk_size` steps. All blocks are scanned
  together from a zero state (one `lax.scan` over the block length, the blocks forming a batch),
  the block-to-block carries are then scanned over the (few) blocks, and each step adds
  (product of its a's since the block start) * (carry into its block). About 2*sqrt(T)
  dependent steps instead of T, and a time-invariant `a` is never materialised.
- ``"pallas"``: a Pallas kernel (`lru_jax.kernels.pallas_scan`): on a GPU each program walks
  time over a block of lanes (Triton lowering), with its own scan-shaped custom VJP; elsewhere
  it runs in Pallas' interpret mode (slow, for tests). "auto" chooses it only from a passed
  table of measurements in which it was fastest.
- ``"auto"``: picks one of the above from the platform and the shape (see `choose_method`):
  from measurements when a `scan_table` is passed (a `lru_jax.scan_table.ScanTable`: measured
  at a program's own shapes by `lru_jax.scan_choices.measure`, or read from the bench's
  scan_choices.json by `scan_choices.load`), else from a built-in rule. Where the table's
  forward-only and forward+backward winners differ, the forward pass uses the first and
  differentiation the second. The choice is a function of the arguments and the platform
  alone; each "auto" scan is marked in the traced program (`AUTO_SCOPE`) so that
  `scan_choices.queries` can read off which shapes a program asks "auto" about.

Sequence parallelism (`sequence_axis=...`, inside `jax.set_mesh(mesh)`): time is split into
contiguous blocks over the devices of one mesh axis. Each device scans its block from a zero
state with `method`, the blocks' (total decay, end state) pairs are all-gathered, a short scan
over the blocks gives each device the state entering its block, and every step adds
(product of its a's since the block start) * (that state). This lets a sequence longer than one
device holds be scanned, and equals the single-device scan.

Gradients (reverse mode) come from the adjoint scan, a `jax.custom_vjp` around every method:
the transpose of h_t = a_t h_{t-1} + b_t is the same recurrence run the other way,
g_t = a_{t+1} g_{t+1} + ct_t (JAX's cotangents are transposes: no conjugation for complex
values), run by the forward's own method in the opposite direction, and then db_t = g_t,
dh0 = a_first g_first and da_t = g_t h_{t-1} (summed over time and the broadcast axes for a
time-invariant a; the sequential method then sums it inside the adjoint's own loop, for states
of at least `FUSED_ADJOINT_MIN_BYTES`). Resets set a_t = 0 before the scan, which cuts g there
too. The backward pass keeps only a, h0 and h, where autodiff of a method keeps its
intermediates as well (the associative scan's partial products of every level). A custom VJP
has no forward mode: `adjoint=False` gives JAX's autodiff of the method, for `jax.jvp` and
`jax.jacfwd`.
"pallas" has its kernel's own adjoint (see above).

`log_linear_scan` is the same recurrence for positive a and b given as log a_t and log b_t,
computed in log space (log h_t = logaddexp(log a_t + log h_{t-1}, log b_t)): a state far below
(or above) float32's range stays exact in relative terms where the plain form underflows to
zero (docs/recurrences-min.md).

`selective_scan` is Mamba's recurrence, h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ with a
state [batch, D, N] per step, read out y_t = h_t C_t as it runs: time in blocks, one block's
states at a time (each block `linear_scan`'s, or a loop body that reads out), rematerialised
under differentiation, so that no [time, batch, D, N] array exists (docs/recurrences-mamba.md).

Precision: every scan accumulates in at least float32 (`accumulation_dtype`): inputs of a
lower precision (bfloat16 activations under mixed precision) are cast up at the boundary, so
the states come back float32 (complex64 for complex inputs) whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lru_jax import _checks
from lru_jax.scan_table import ScanTable

METHODS = ("sequential", "associative", "chunked", "pallas")
# the methods of `log_linear_scan`: "cumsum" is the minGRU paper's closed form
LOG_METHODS = ("sequential", "associative", "cumsum")
# backends whose built-in "auto" rule comes from our own measurements (docs/benchmarks.md); on
# the others it is a default from the literature, and train.py measures instead (see
# `config.train.scan_choices`)
MEASURED_RULE_BACKENDS = ("cpu",)
# the name scope around every "auto" scan: dtype name, time steps, state elements per step
AUTO_SCOPE = "lru_jax.linear_scan[auto {dtype} {time}x{state_size}]"


def accumulation_dtype(*arrays):
    """The dtype a scan of `arrays` runs and returns its states in: their common dtype,
    promoted to at least float32 (bfloat16 and float16 inputs give float32, complex ones
    complex64): a decay close to 1 is not representable in bfloat16 (its spacing below 1 is
    2^-8), and a state summed over many steps would lose its small terms."""
    return jnp.result_type(*(v for v in arrays if v is not None), jnp.float32)


def linear_scan(
    a,
    b,
    h0=None,
    *,
    method="auto",
    reverse=False,
    resets=None,
    chunk_size=None,
    sequence_axis=None,
    scan_table=None,
    adjoint=True,
):
    """Runs h_t = a_t * h_{t-1} + b_t along axis 0 and returns every h_t.

    Args:
      a: the decay, real or complex, broadcastable against `b` (numpy rules, trailing axes
        aligned) and with at most as many axes. If it has no time axis (e.g. the LRU's λ of
        shape [N] against b [T, B, N]), it is time-invariant and methods that allow it never
        copy it to every step.
      b: [time, ...] the input term, real or complex. time may be 0 (h is then empty).
      h0: optional [...] state before the first step (after the last one if `reverse`),
        broadcastable to the state shape `out.shape[1:]`. Zero if None.
      method: "sequential" | "associative" | "chunked" | "pallas" | "auto".
      reverse: run from the last step to the first: h_t = a_t * h_{t+1} + b_t.
      resets: optional bool [time, *leading state axes]: where true, the recurrence restarts
        from zero at that step (h_t = b_t), e.g. at episode or document boundaries. Aligned at
        the leading axes: a [time, batch] mask applies to every feature of that batch element.
      chunk_size: block length of the "chunked" method, default about sqrt(time); time steps
        per program of the "pallas" kernel, default chosen from the shape.
      sequence_axis: optional name of an axis of the current mesh (`jax.set_mesh`) to split
        time over (sequence parallelism, see the module docstring); `method` then runs within
        each device's block. Time must be divisible by that axis' size. Call it under `jax.jit`.
      scan_table: optional `ScanTable` of measured times that "auto" chooses from (see
        `choose_method`); None: the built-in rule.
      adjoint: True: reverse-mode gradients by the adjoint scan (a `jax.custom_vjp`, see the
        module docstring), which keeps only a and h for the backward pass; forward mode
        (`jax.jvp`, `jax.jacfwd`) then raises a TypeError naming custom_vjp. False: JAX's
        autodiff of the method, forward mode included. "pallas" always uses its kernel's own
        adjoint (reverse mode only).

    Returns:
      h: [time, ...] with shape broadcast(a, b) and dtype `accumulation_dtype(a, b, h0)`:
      result_type(a, b, h0), at least float32 (bfloat16 inputs are cast up at the boundary).
    """
    a, b, h0, resets, out_shape = _validate(a, b, h0, resets)
    if chunk_size is not None:
        _checks.positive_int("chunk_size", chunk_size)
    _checks.one_of("method", method, (*METHODS, "auto"))
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse: expected a bool, got {reverse!r}")
    check_scan_table(scan_table)
    _checks.boolean("adjoint", adjoint)
    if sequence_axis is not None:
        check_sequence_axis(sequence_axis, out_shape[0])
        if method == "pallas":
            raise ValueError("method: 'pallas' does not take a sequence_axis yet; use another")
    if out_shape[0] == 0:  # no steps: nothing to scan (and no method to choose)
        return jnp.zeros(out_shape, accumulation_dtype(a, b, h0))

    kw = dict(out_shape=out_shape, reverse=reverse, chunk_size=chunk_size, adjoint=adjoint)
    if method == "auto" and sequence_axis is None:
        dtype = accumulation_dtype(a, b, h0)
        time, size = out_shape[0], math.prod(out_shape[1:])
        with _auto_scope(time, size, dtype):
            method = choose_method(time, size, dtype=dtype, scan_table=scan_table)
            forward = choose_method(
                time, size, dtype=dtype, differentiated=False, scan_table=scan_table
            )
            if forward != method:
                return _forward_or_trained(forward, method, a, b, h0, resets, **kw)
            return _scan(method, a, b, h0, resets, **kw)
    kw.update(sequence_axis=sequence_axis, scan_table=scan_table)
    return _scan(method, a, b, h0, resets, **kw)


def check_scan_table(scan_table) -> None:
    """A TypeError unless `scan_table` is None or a `ScanTable`."""
    if scan_table is not None and not isinstance(scan_table, ScanTable):
        raise TypeError(
            "scan_table: expected a lru_jax.scan_table.ScanTable or None (read a "
            f"scan_choices.json with scan_choices.load), got {type(scan_table).__name__}"
        )


def _auto_scope(time: int, state_size: int, dtype):
    """The name scope marking an "auto" scan in the traced program (see `AUTO_SCOPE`)."""
    name = AUTO_SCOPE.format(dtype=jnp.dtype(dtype).name, time=time, state_size=state_size)
    return jax.named_scope(name)


def _forward_or_trained(forward, trained, a, b, h0, resets, **kw):
    """Runs method `forward` where nothing differentiates the scan and `trained` where
    something does (a measured table can rank them differently, see `choose_method`)."""

    def run(method):
        return lambda a, b, h0, resets: _scan(method, a, b, h0, resets, **kw)

    # the trained method's VJP is a custom one (its adjoint, or the kernel's): reverse mode only
    if trained == "pallas" or kw["adjoint"]:
        scan_fn = jax.custom_vjp(run(forward))
        scan_fn.defvjp(lambda *args: jax.vjp(run(trained), *args), lambda vjp, g: vjp(g))
    else:  # forward mode too; reverse mode transposes `trained`'s JVP
        scan_fn = jax.custom_jvp(run(forward))
        scan_fn.defjvp(lambda primals, tangents: jax.jvp(run(trained), primals, tangents))
    return scan_fn(a, b, h0, resets)


def _scan(
    method,
    a,
    b,
    h0,
    resets,
    *,
    out_shape,
    reverse,
    chunk_size,
    adjoint,
    sequence_axis=None,
    scan_table=None,
):
    """`linear_scan` of validated inputs with one method (not "auto" unless sequence_axis)."""
    dtype = accumulation_dtype(a, b, h0)
    time = out_shape[0]
    a = jnp.asarray(a, dtype)
    b = jnp.broadcast_to(jnp.asarray(b, dtype), out_shape)
    h0 = None if h0 is None else jnp.broadcast_to(jnp.asarray(h0, dtype), out_shape[1:])
    if method == "pallas":  # the kernel takes resets, reverse and a time-invariant a itself
        from lru_jax.kernels import pallas_scan  # lazily: Pallas only when asked for

        return pallas_scan.pallas_linear_scan(
            a, b, h0, reverse=reverse, resets=resets, chunk_size=chunk_size
        )

    # `a` keeps a leading time axis only if it varies in time; else it is [state axes...].
    time_varying = a.ndim == len(out_shape) and a.shape[0] == time and time > 1
    if not time_varying and a.ndim == len(out_shape):
        a = a[0]
    if resets is not None:
        mask = jnp.reshape(resets, resets.shape + (1,) * (len(out_shape) - resets.ndim))
        a = jnp.where(mask, jnp.zeros((), dtype), a if time_varying else a[None])
        time_varying = True

    core = functools.partial(
        _core,
        time_varying=time_varying,
        method=method,
        chunk_size=chunk_size,
        sequence_axis=sequence_axis,
        scan_table=scan_table,
    )
    if adjoint:
        fused = method == "sequential" and sequence_axis is None and not time_varying
        fused = fused and math.prod(out_shape[1:]) * b.dtype.itemsize >= FUSED_ADJOINT_MIN_BYTES
        return _with_adjoint(core, a, b, h0, reverse, time_varying, fused)
    return core(a, b, h0, reverse)


def _core(a, b, h0, reverse, *, time_varying, method, chunk_size, sequence_axis, scan_table):
    """The scan of prepared inputs (resets folded into a zero `a`) in either direction."""
    if sequence_axis is None:
        return _run(a, b, h0, time_varying, method, chunk_size, reverse=reverse)
    if reverse:
        b = jnp.flip(b, 0)
        a = jnp.flip(a, 0) if time_varying else a
    h = _sequence_parallel(a, b, h0, time_varying, method, chunk_size, sequence_axis, scan_table)
    return jnp.flip(h, 0) if reverse else h


def _with_adjoint(core, a, b, h0, reverse, time_varying, fused=False):
    """`core(a, b, h0, reverse)` with the adjoint scan as its VJP (`_adjoint`; with `fused`,
    the sequential loop that sums a time-invariant a's gradient as it goes)."""

    @jax.custom_vjp
    def scan(a, b, h0):
        return core(a, b, h0, reverse)

    def scan_fwd(a, b, h0):
        h = core(a, b, h0, reverse)
        return h, (a, h0, h)

    def scan_bwd(residuals, ct):
        if fused:
            return _sequential_adjoint(*residuals, ct, reverse)
        return _adjoint(core, *residuals, ct, reverse, time_varying)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan(a, b, h0)


def _adjoint(core, a, h0, h, ct, reverse, time_varying):
    """The VJP of h = core(a, b, h0, reverse) at cotangent `ct`: (da, db, dh0).

    JAX's cotangents are transposes, not adjoints (no conjugation, also for complex values):
    for the forward direction the transpose of h_t = a_t h_{t-1} + b_t is the scan the other
    way, g_t = a_{t+1} g_{t+1} + ct_t, and db_t = g_t, dh0 = a_0 g_0, da_t = g_t h_{t-1}
    (h_{-1} = h0); `reverse` mirrors every index. A reset (a_t = 0) cuts g there too.
    """
    later = slice(1, None) if not reverse else slice(None, -1)  # x_{t+1} at t, as a slice
    earlier = slice(None, -1) if not reverse else slice(1, None)
    first = 0 if not reverse else -1

    def in_order(x, y):  # x then y along time in the scan's own direction
        return jnp.concatenate([x, y] if not reverse else [y, x], axis=0)

    # the adjoint's decay at t is a of the step after t; after the last step nothing follows
    a_next = in_order(a[later], jnp.zeros_like(a[:1])) if time_varying else a
    g = core(a_next, ct, None, not reverse)
    h_start = jnp.zeros(h.shape[1:], h.dtype) if h0 is None else h0
    if time_varying:  # per step: g_first * h0, then g_t * h_{t-1}; summed to a's own shape
        da = _sum_to(in_order((g[first] * h_start)[None], g[later] * h[earlier]), a.shape)
    else:  # a sum over time (and broadcast axes) of products that XLA fuses into the sum
        da = _sum_to(g[later] * h[earlier], a.shape) + _sum_to(g[first] * h_start, a.shape)
    dh0 = None if h0 is None else (a[first] if time_varying else a) * g[first]
    return da, g, dh0


# A step's state of at least this many bytes takes the one-loop adjoint: below it the loop's
# second carry costs more per step than the second pass over g and h (docs/benchmarks.md).
FUSED_ADJOINT_MIN_BYTES = 2048


def _sequential_adjoint(a, h0, h, ct, reverse):
    """`_adjoint` for the sequential method and a time-invariant a in one loop: each step
    reads ct_t and h_t, writes g_t and adds g_{t+1} h_t to da in the carry, so the backward
    pass reads h once instead of making a second pass over g and h. (For a time-varying a the
    loop would have to read h_{t-1} and a_{t+1} by index or from shifted copies: measured
    slower than the two passes.) `reverse` mirrors every index as in `_adjoint`."""

    def step(carry, inputs):
        g_next, da_sum = carry  # g of the step after t (zero after the last)
        ct_t, h_t = inputs
        g = a * g_next + ct_t
        return (g, da_sum + g_next * h_t), g

    zeros = jnp.zeros(h.shape[1:], h.dtype)
    (_, da_sum), g = jax.lax.scan(step, (zeros, zeros), (ct, h), reverse=not reverse)
    first = 0 if not reverse else -1
    if h0 is not None:  # the first step's term g h0 (h0 = 0 contributes nothing)
        da_sum = da_sum + g[first] * h0
    dh0 = None if h0 is None else a * g[first]
    return _sum_to(da_sum, a.shape), g, dh0


def _sum_to(x, shape):
    """x summed over its leading axes and those `shape` broadcasts (size 1) to `shape`."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x.reshape(shape)


def _run(a, b, h0, time_varying, method, chunk_size, scan_table=None, reverse=False):
    """The scan of prepared inputs (see `linear_scan`) with one method, in time order, or
    from the last step to the first if `reverse` (h0 then enters at the last step)."""
    time = b.shape[0]
    if method == "auto":  # within a sequence-parallel block; the kernel takes no sequence_axis
        size = math.prod(b.shape[1:])
        with _auto_scope(time, size, b.dtype):
            method = choose_method(
                time, size, dtype=b.dtype, allow_pallas=False, scan_table=scan_table
            )
            return _run(a, b, h0, time_varying, method, chunk_size, reverse=reverse)
    if method == "sequential":
        return _sequential(a, b, h0, time_varying, reverse)
    if method == "associative":
        return _associative(a, b, h0, time_varying, reverse)
    if reverse:  # the blocked scan runs in time order: mirror time around it
        b = jnp.flip(b, 0)
        a = jnp.flip(a, 0) if time_varying else a
    h = _chunked(a, b, h0, time_varying, chunk_size or _default_chunk(time))
    return jnp.flip(h, 0) if reverse else h


def choose_method(
    time: int,
    state_size: int,
    backend: str | None = None,
    dtype=None,
    allow_pallas: bool = True,
    differentiated: bool = True,
    scan_table: ScanTable | None = None,
) -> str:
    """The method "auto" runs for a scan of `time` steps over `state_size` elements per step.

    A function of its arguments and the platform (`backend`, default JAX's) alone.
    With a `scan_table` measured on `backend` (`lru_jax.scan_choices.measure`, or the bench's
    scan_choices.json read by `scan_choices.load`): the method that was fastest at the
    nearest measured shape (same real/complex kind; forward+backward timings if
    `differentiated`, else forward-only ones, each where the table has them). "auto" asks for
    both: where they differ, the scan runs the forward-only choice unless it is differentiated
    (a `jax.custom_vjp`; with `adjoint=False`, a `jax.custom_jvp` unless the trained choice is
    "pallas"). A table
    measured on another backend is not used.

    Without one, a built-in rule. On CPU it comes from measurements
    (docs/benchmarks.md): a `lax.scan` step costs well under a microsecond on XLA:CPU and the
    sequential scan moves the least memory, so it was the fastest method at 31 of 32 shapes
    measured (T 256..65536, B*N 64..4096, real and complex, forward and backward; the
    exception a 0.6 ms case). On accelerators the rule is "associative", whose log depth is
    expected to win where one sequential step leaves most of the chip idle; that default is
    not measured here (no GPU was available): run the bench's gpu suite and load its table, or
    `scan_choices.measure` the shapes a program uses (train.py does so by default on any backend
    not in `MEASURED_RULE_BACKENDS`, see `config.train.scan_choices`).
    """
    check_scan_table(scan_table)
    backend = backend or jax.default_backend()
    allowed = METHODS if allow_pallas else tuple(m for m in METHODS if m != "pallas")
    if scan_table is not None and scan_table.backend == backend and time > 1:
        is_complex = None if dtype is None else bool(jnp.issubdtype(dtype, jnp.complexfloating))
        mode = "fwd+bwd" if differentiated else "fwd"
        measured = scan_table.fastest(time, state_size, is_complex, allowed, mode)
        if measured is not None:
            return measured
    if backend not in MEASURED_RULE_BACKENDS and time > 1:
        return "associative"
    return "sequential"


def _default_chunk(time: int) -> int:
    return max(1, int(math.isqrt(max(time, 1))))


def _validate(a, b, h0, resets, names=("a", "b", "h0"), allow_complex=True):
    """(a, b, h0, resets) as arrays (nested lists converted) after checking their dtypes and
    shapes, and the output shape [time, ...]."""
    a_name, b_name, h0_name = names
    a, b = _checks.array(a_name, a), _checks.array(b_name, b)
    a_shape = _checks.floating(a_name, a, allow_complex=allow_complex)
    b_shape = _checks.floating(b_name, b, allow_complex=allow_complex)
    if len(b_shape) == 0:
        raise ValueError(f"{b_name}: expected at least rank 1 [time, ...], got a scalar")
    if len(a_shape) > len(b_shape):  # broadcasting would move b's time axis off axis 0
        raise ValueError(
            _checks.message(a_name, f"at most {b_name}'s {len(b_shape)} axes", f"shape {a_shape}")
        )
    out_shape = _checks.broadcastable((a_name, b_name), (a_shape, b_shape))
    if h0 is not None:
        h0 = _checks.array(h0_name, h0)
        h0_shape = _checks.floating(h0_name, h0, allow_complex=allow_complex)
        try:
            fits = np.broadcast_shapes(h0_shape, out_shape[1:]) == tuple(out_shape[1:])
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{h0_name}: expected a shape broadcastable to the state shape "
                f"{out_shape[1:]}, got {h0_shape}"
            )
    if resets is not None:
        resets = _checks.array("resets", resets)
        if resets.dtype != jnp.bool_:
            raise TypeError(f"resets: expected a bool array, got dtype {resets.dtype}")
        r = resets.shape
        padded = r + (1,) * (len(out_shape) - len(r))
        if not r or len(r) > len(out_shape) or r[0] != out_shape[0]:
            raise ValueError(
                f"resets: expected shape [time={out_shape[0]}, *leading state axes] aligned "
                f"with the output {out_shape}, got {r}"
            )
        _checks.broadcastable(("resets", "the output"), (padded, out_shape))
    return a, b, h0, resets, out_shape


def _sequential(a, b, h0, time_varying, reverse=False):
    h_init = jnp.zeros(b.shape[1:], b.dtype) if h0 is None else h0
    if time_varying:

        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        return jax.lax.scan(step, h_init, (a, b), reverse=reverse)[1]

    def step_invariant(h, b_t):
        h = a * h + b_t
        return h, h

    return jax.lax.scan(step_invariant, h_init, b, reverse=reverse)[1]


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _associative(a, b, h0, time_varying, reverse=False):
    a_full = jnp.broadcast_to(a if time_varying else a[None], b.shape)
    first = -1 if reverse else 0
    if h0 is not None:
        b = b.at[first].add(a_full[first] * h0)
    return jax.lax.associative_scan(_combine, (a_full, b), reverse=reverse)[1]


def _chunked(a, b, h0, time_varying, chunk):
    time = b.shape[0]
    state_shape = b.shape[1:]
    n_chunks = -(-time // chunk)
    pad = n_chunks * chunk - time  # zero b at the end: it cannot reach any earlier step

    def blocks(x):
        """[time, ...] -> [chunk, n_chunks, ...]: scan along the block, blocks as a batch."""
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape((n_chunks, chunk) + x.shape[1:]), 0, 1)

    b_blocks = blocks(b)
    if time_varying:
        a_blocks = blocks(a)

        def local_step(carry, ab):
            h, prod = carry
            h = ab[0] * h + ab[1]
            prod = prod * ab[0]
            return (h, prod), (h, prod)

        start = (jnp.zeros(b_blocks.shape[1:], b.dtype), jnp.ones(a_blocks.shape[1:], b.dtype))
        _, (h_local, decay) = jax.lax.scan(local_step, start, (a_blocks, b_blocks))
    else:
        h_local = _sequential(a, b_blocks, None, False)
        # decay[l] = a^(l+1), shaped to broadcast against [chunk, n_chunks, *state].
        decay = jnp.cumprod(jnp.broadcast_to(a, (chunk,) + a.shape), axis=0)
        decay = decay.reshape((chunk,) + (1,) * (1 + len(state_shape) - a.ndim) + a.shape)

    # Carry into each block: a short scan over the blocks of (block decay, block end state).
    block_decay = jnp.broadcast_to(decay[-1], h_local.shape[1:])
    h_start = jnp.zeros(state_shape, b.dtype) if h0 is None else h0
    h_entry = jnp.concatenate(
        [h_start[None], _sequential(block_decay[:-1], h_local[-1, :-1], h0, True)], axis=0
    )
    h = h_local + decay * h_entry[None]
    h = jnp.swapaxes(h, 0, 1).reshape((n_chunks * chunk,) + state_shape)
    return h[:time]


def check_sequence_axis(sequence_axis, time: int) -> int:
    """Checks that `sequence_axis` names an axis of the current mesh dividing `time`.

    Returns that axis' size.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not isinstance(sequence_axis, str) or sequence_axis not in mesh.axis_names:
        raise ValueError(
            f"sequence_axis: expected an axis of the current mesh (set with jax.set_mesh), "
            f"one of {list(mesh.axis_names)}, got {sequence_axis!r}"
        )
    size = mesh.shape[sequence_axis]
    if time % size:
        raise ValueError(
            f"sequence_axis: the {time} time steps do not split into {size} equal blocks over "
            f"mesh axis {sequence_axis!r}; use a length divisible by {size}"
        )
    return size


def _sequence_parallel(a, b, h0, time_varying, method, chunk_size, axis, scan_table):
    """`_run` with time split into contiguous blocks over mesh axis `axis`."""
    state_shape = b.shape[1:]
    h0 = jnp.zeros(state_shape, b.dtype) if h0 is None else h0

    def block(a, b, h0):
        # b (and a time-varying a): this device's block [time / devices, ...]; h0 whole.
        h = _run(a, b, None, time_varying, method, chunk_size, scan_table)
        if time_varying:
            decay = jnp.cumprod(a, axis=0)  # product of the a's since the block start
        else:  # a [*state tail] -> a^(t+1), [block, 1.., *state tail]
            decay = jnp.cumprod(jnp.broadcast_to(a, (b.shape[0],) + a.shape), axis=0)
            decay = decay.reshape((b.shape[0],) + (1,) * (b.ndim - 1 - a.ndim) + a.shape)
        block_decay = jax.lax.all_gather(jnp.broadcast_to(decay[-1], h.shape[1:]), axis)
        block_end = jax.lax.all_gather(h[-1], axis)  # [devices, *state], from zero starts
        ends = _sequential(block_decay, block_end, h0, True)  # true state at each block end
        entering = jnp.concatenate([h0[None], ends[:-1]])[jax.lax.axis_index(axis)]
        return h + decay * entering[None]

    a_spec = P(axis) if time_varying else P()
    # check_vma=False: the local scans start from zero carries that JAX would otherwise
    # require to be marked as device-varying; the collectives are explicit above.
    sharded = jax.shard_map(
        block,
        in_specs=(a_spec, P(axis), P()),
        out_specs=P(axis),
        axis_names={axis},
        check_vma=False,
    )
    return sharded(a, b, h0)


# ---------------------------------------------------------------- the log-space scan


def log_linear_scan(
    log_a, log_b, log_h0=None, *, method="auto", reverse=False, resets=None, return_log=False
):
    """Runs h_t = a_t * h_{t-1} + b_t along axis 0 for positive a, b, in log space.

    The state is carried as its logarithm,

        log h_t = logaddexp(log a_t + log h_{t-1}, log b_t),

    so a state far outside float32's range (a long product of small a_t times a large h0, or
    inputs themselves below 1e-38) keeps its relative precision, where the plain `linear_scan`
    flushes it to zero. For positive inputs it equals `linear_scan(exp(log_a), exp(log_b),
    exp(log_h0))` wherever that is representable.

    Methods (each a function of the arguments alone; no `ScanTable`, which times `linear_scan`):

    - ``"sequential"``: `jax.lax.scan` of the step above.
    - ``"associative"``: `jax.lax.associative_scan` on pairs (log A, log B) with
      (A1, B1) . (A2, B2) = (A1 + A2, logaddexp(A2 + B1, B2)), the `linear_scan` combine in
      log space: O(log T) depth, each combine exact to float32 rounding.
    - ``"cumsum"``: the minGRU paper's closed form (Feng et al. 2024, appendix B; Heinsen 2023):
      a*_t = cumsum(log a)_t and log h_t = a*_t + logcumsumexp_k<=t(log b_k - a*_k) (with h0:
      logaddexp(a*_t + log h0, ...)). Two library cumulative ops, but it subtracts the large
      a*_t from log b_k and adds it back, so its absolute error in log h grows like
      |a*_t| * 2^-24: use it where sum |log a| over the sequence stays small. No `resets`.
    - ``"auto"``: "sequential" on CPU, "associative" elsewhere (`choose_method`'s built-in rule).

    Args:
      log_a: real [time, ...] (or without a time axis: time-invariant) log of the decay;
        broadcastable against `log_b`. -inf means a_t = 0.
      log_b: real [time, ...] log of the input term; -inf means b_t = 0.
      log_h0: optional real [...] log of the state before the first step (after the last if
        `reverse`); None: h0 = 0.
      method: "sequential" | "associative" | "cumsum" | "auto".
      reverse: run from the last step to the first: h_t = a_t * h_{t+1} + b_t.
      resets: optional bool [time, *leading state axes]: restart from zero there (h_t = b_t),
        as in `linear_scan`.
      return_log: return log h instead of h.

    Returns:
      h (or log h): real [time, ...] of shape broadcast(log_a, log_b), dtype
      `accumulation_dtype(log_a, log_b, log_h0)` (at least float32).
    """
    names = ("log_a", "log_b", "log_h0")
    log_a, log_b, log_h0, resets, out_shape = _validate(
        log_a, log_b, log_h0, resets, names, allow_complex=False
    )
    _checks.one_of("method", method, (*LOG_METHODS, "auto"))
    _checks.boolean("reverse", reverse)
    _checks.boolean("return_log", return_log)
    if method == "cumsum" and resets is not None:
        raise ValueError("resets: method 'cumsum' cannot restart the state; use another method")
    dtype = accumulation_dtype(log_a, log_b, log_h0)
    if out_shape[0] == 0:  # no steps: nothing to scan (h = 0, log h = -inf: never used)
        return jnp.full(out_shape, -jnp.inf if return_log else 0.0, dtype)
    if method == "auto":
        method = choose_method(out_shape[0], math.prod(out_shape[1:]), allow_pallas=False)
    log_a = jnp.broadcast_to(jnp.asarray(log_a, dtype), out_shape)
    log_b = jnp.broadcast_to(jnp.asarray(log_b, dtype), out_shape)
    if log_h0 is not None:
        log_h0 = jnp.broadcast_to(jnp.asarray(log_h0, dtype), out_shape[1:])
    if resets is not None:  # a_t = 0 where the state restarts
        mask = jnp.reshape(resets, resets.shape + (1,) * (len(out_shape) - resets.ndim))
        log_a = jnp.where(mask, -jnp.inf, log_a)
    if reverse:
        log_a, log_b = jnp.flip(log_a, 0), jnp.flip(log_b, 0)
    run = {"sequential": _log_sequential, "associative": _log_associative, "cumsum": _log_cumsum}
    log_h = run[method](log_a, log_b, log_h0)
    log_h = jnp.flip(log_h, 0) if reverse else log_h
    return log_h if return_log else jnp.exp(log_h)


def _log_sequential(log_a, log_b, log_h0):
    def step(log_h, ab):
        log_h = jnp.logaddexp(ab[0] + log_h, ab[1])
        return log_h, log_h

    if log_h0 is None:  # h0 = 0; logaddexp's derivatives are 0 (not nan) at -inf
        log_h0 = jnp.full(log_b.shape[1:], -jnp.inf, log_b.dtype)
    return jax.lax.scan(step, log_h0, (log_a, log_b))[1]


def _log_combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l + a_r, jnp.logaddexp(a_r + b_l, b_r)


def _log_associative(log_a, log_b, log_h0):
    if log_h0 is not None:
        log_b = log_b.at[0].set(jnp.logaddexp(log_a[0] + log_h0, log_b[0]))
    return jax.lax.associative_scan(_log_combine, (log_a, log_b))[1]


def _log_cumsum(log_a, log_b, log_h0):
    a_star = jnp.cumsum(log_a, axis=0)
    log_h = a_star + jax.lax.cumlogsumexp(log_b - a_star, axis=0)
    if log_h0 is not None:
        log_h = jnp.logaddexp(a_star + log_h0, log_h)
    return log_h


# ---------------------------------------------------------------- the selective scan

# the methods of `selective_scan`: "sequential" reads out inside the loop body, the others
# run `linear_scan`'s method over each block's states and read out per block
SELECTIVE_METHODS = ("sequential", "associative", "chunked")


def selective_scan(
    x,
    delta,
    A,
    B,
    C,
    D=None,
    h0=None,
    *,
    method="auto",
    reverse=False,
    resets=None,
    chunk_size=None,
    scan_table=None,
):
    """Mamba's selective scan (Gu and Dao 2023, eqs. 2a-2b with ZOH for A and Euler for B):

        h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ        [batch, D, N]
        y_t = h_t C_t + D ⊙ x_t                            [batch, D]

    a diagonal linear recurrence per channel d and state n, read out through C_t as it runs:
    no [time, batch, D, N] array is ever made, forwards or backwards. Time is cut into blocks
    of `chunk_size` steps scanned one after the other; each block's states exist only while
    that block runs ("sequential": one step at a time, the readout inside the loop body; the
    other methods: the block's states by that `linear_scan` method, then contracted with C).
    Under differentiation each block is rematerialised (`jax.checkpoint`): the forward pass
    keeps only the state entering each block, and the backward pass recomputes one block's
    states at a time, so memory grows with time x D (plus one block's time x D x N), never
    time x D x N. (The adjoint of the recurrence is the reverse recurrence
    g_t = exp(Δ_{t+1} A) ⊙ g_{t+1} + dy_t C_tᵀ, which JAX's transpose of each block computes.)

    Args:
      x: [time, batch, D] real inputs.
      delta: [time, batch, D] step sizes Δ (positive; Mamba's softplus output).
      A: [D, N] the continuous-time state matrix (diagonal per channel; negative in Mamba).
      B, C: [time, batch, N] the input and output projections of each step.
      D: optional [D] skip connection (None: no skip).
      h0: optional [batch, D, N] state before the first step (after the last if `reverse`);
        zero if None.
      method: "sequential" | "associative" | "chunked" | "auto" (`choose_method` at the
        block's shape; never "pallas", whose kernel does not read out).
      reverse: run from the last step to the first: h_t = exp(Δ_t A) ⊙ h_{t+1} + ...
      resets: optional bool [time, batch]: the state restarts from zero at those steps
        (h_t = (Δ_t x_t) B_tᵀ).
      chunk_size: steps per block, default about sqrt(time).
      scan_table: optional `ScanTable` that "auto" chooses from.

    Returns:
      (y [time, batch, D], h_last [batch, D, N]): the outputs and the state after the last step
      (the first if `reverse`), both `accumulation_dtype` of the inputs (at least float32:
      bfloat16 inputs are cast up at the boundary; the caller casts y back if it wants).
    """
    x, delta, A, B, C, D, h0, resets = _validate_selective(x, delta, A, B, C, D, h0, resets)
    _checks.one_of("method", method, (*SELECTIVE_METHODS, "auto"))
    _checks.boolean("reverse", reverse)
    if chunk_size is not None:
        _checks.positive_int("chunk_size", chunk_size)
    check_scan_table(scan_table)
    time, batch, channels = x.shape
    dtype = accumulation_dtype(x, delta, A, B, C, D, h0)
    x, delta, A, B, C = (jnp.asarray(v, dtype) for v in (x, delta, A, B, C))
    h0 = jnp.zeros((batch, channels, A.shape[1]), dtype) if h0 is None else jnp.asarray(h0, dtype)
    if time == 0:  # no steps: no outputs, the state as it was
        return jnp.zeros(x.shape, dtype), h0
    chunk = min(chunk_size or _default_chunk(time), time)
    inputs = (x, delta, B, C, resets)
    if reverse:
        inputs = tuple(_flip_time(v) for v in inputs)
    if method == "auto":  # marked like linear_scan's: each block is a scan of chunk steps
        size = batch * channels * A.shape[1]
        with _auto_scope(chunk, size, dtype):
            method = choose_method(
                chunk, size, dtype=dtype, allow_pallas=False, scan_table=scan_table
            )
            y, h_last = _selective_blocks(method, chunk, A, h0, *inputs)
    else:
        y, h_last = _selective_blocks(method, chunk, A, h0, *inputs)
    y = jnp.flip(y, 0) if reverse else y
    return (y if D is None else y + jnp.asarray(D, dtype) * x), h_last


def selective_step(h, x, delta, A, B, C, D=None, reset=None):
    """One step of `selective_scan`: h [..., D, N], x and delta [..., D], A [D, N], B and C
    [..., N], D optional [D], reset optional bool [...] -> (h' [..., D, N], y [..., D])."""
    decay = jnp.exp(delta[..., None] * A)
    if reset is not None:  # restart: nothing of the previous state is kept
        decay = jnp.where(reset[..., None, None], jnp.zeros((), decay.dtype), decay)
    h = decay * h + (delta * x)[..., None] * B[..., None, :]
    y = jnp.sum(h * C[..., None, :], axis=-1)
    return h, y if D is None else y + D * x


def _flip_time(v):
    return None if v is None else jnp.flip(v, 0)


def _selective_blocks(method, chunk, A, h0, x, delta, B, C, resets):
    """The selective scan (without skip) over blocks of `chunk` steps, one block at a time,
    each rematerialised under differentiation. Returns (y [time, batch, D], h_last)."""
    time = x.shape[0]
    n_blocks = -(-time // chunk)
    pad = n_blocks * chunk - time  # padded steps have Δ = 0: decay 1 and input 0 keep h

    def blocks(v):
        v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
        return v.reshape((n_blocks, chunk) + v.shape[1:])

    if resets is None:
        resets = jnp.zeros(x.shape[:2], bool)  # a mask of [time, batch] only: small
    xs = tuple(blocks(v) for v in (x, delta, B, C, resets))

    def block(h, inputs):
        return _selective_block(method, A, h, *inputs)

    h_last, y = jax.lax.scan(jax.checkpoint(block, prevent_cse=False), h0, xs)
    return y.reshape((n_blocks * chunk,) + y.shape[2:])[:time], h_last


def _selective_block(method, A, h, x, delta, B, C, resets):
    """One block: h [batch, D, N] and the block's inputs [chunk, batch, ...] -> (h after the
    block, y [chunk, batch, D])."""
    if method == "sequential":

        def step(h, inputs):
            return selective_step(h, *inputs[:2], A, *inputs[2:4], reset=inputs[4])

        return jax.lax.scan(step, h, (x, delta, B, C, resets))
    decay = jnp.exp(delta[..., None] * A)
    decay = jnp.where(resets[..., None, None], jnp.zeros((), decay.dtype), decay)
    inputs = (delta * x)[..., None] * B[..., None, :]  # [chunk, batch, D, N]
    hs = _run(decay, inputs, h, True, method, None)
    return hs[-1], jnp.einsum("tbdn,tbn->tbd", hs, C)


def _validate_selective(x, delta, A, B, C, D, h0, resets):
    """The selective scan's arguments as arrays (nested lists converted), checked."""
    names = ("x", "delta", "A", "B", "C")
    x, delta, A, B, C = (
        _checks.array(n, v) for n, v in zip(names, (x, delta, A, B, C), strict=True)
    )
    _checks.rank("x", x, 3, "[time, batch, D]")
    for name, v in (("x", x), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _checks.floating(name, v, allow_complex=False)
    time, batch, channels = x.shape
    _checks.rank("A", A, 2, "[D, N]")
    state = A.shape[1]
    wanted = {
        "delta": (delta, (time, batch, channels), "[time, batch, D] as x"),
        "A": (A, (channels, state), "[D, N] with x's D"),
        "B": (B, (time, batch, state), "[time, batch, N] with x's time and batch and A's N"),
        "C": (C, (time, batch, state), "[time, batch, N] with x's time and batch and A's N"),
    }
    if D is not None:
        D = _checks.array("D", D)
        _checks.floating("D", D, allow_complex=False)
        wanted["D"] = (D, (channels,), "[D] with x's D")
    if h0 is not None:
        h0 = _checks.array("h0", h0)
        _checks.floating("h0", h0, allow_complex=False)
        wanted["h0"] = (h0, (batch, channels, state), "[batch, D, N]")
    if resets is not None:
        resets = _checks.array("resets", resets)
        if resets.dtype != jnp.bool_:
            raise TypeError(f"resets: expected a bool array, got dtype {resets.dtype}")
        wanted["resets"] = (resets, (time, batch), "[time, batch]")
    for name, (v, shape, layout) in wanted.items():
        if tuple(v.shape) != shape:
            raise ValueError(_checks.message(name, f"shape {shape} {layout}", f"{v.shape}"))
    return x, delta, A, B, C, D, h0, resets
