"""Measuring which `linear_scan` method is fastest, as a `ScanTable` to pass to the model.

One call measures a program's own scans and returns the table; passing it down is explicit:

    from lru_jax import scan_choices
    table = scan_choices.measure(scan_choices.queries(loss_fn, params, batch))
    model = models.SequenceModel(..., scan_table=table)   # or nn.LRU(..., scan_table=table)

`queries(fn, *args)` reads off the traced program of `fn` which (dtype, time, state size) its
"auto" scans run at (each is marked in the program, `scan.AUTO_SCOPE`); `measure` times every
method there, forward and forward+backward, and returns the table. Nothing is registered: a
model built without a table runs the built-in rule (`scan.choose_method`). A table saved with
`save` (or the bench's `DIR/scan_choices.json`) is read back with `load`; the file format is in
`lru_jax.scan_table`. With several processes, every process must pass the same table (or they
compile different programs): `measure` takes process 0's times in all of them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lru_jax import scan, timing
from lru_jax.scan_table import (  # noqa: F401  (re-exported: the documented entry points)
    MODES,
    Entry,
    ScanTable,
    for_devices,
    load,
    save,
)


class Query(NamedTuple):
    """One scan "auto" chooses a method for: `time` steps over `state_size` elements of
    `dtype` (a dtype name)."""

    dtype: str
    time: int
    state_size: int


_AUTO_MARK = re.compile(
    re.escape(scan.AUTO_SCOPE)
    .replace(re.escape("{dtype}"), r"(\w+)")
    .replace(re.escape("{time}"), r"(\d+)")
    .replace(re.escape("{state_size}"), r"(\d+)")
)


def queries(fn, *args, **kwargs) -> set[Query]:
    """The `Query`s of every "auto" scan in `fn(*args, **kwargs)`'s traced program.

    Traces `fn` (arrays or `jax.ShapeDtypeStruct`s as arguments; nothing is computed) and reads
    the marks `linear_scan` puts around its "auto" scans, inside jit, grad, scans and shard_map
    alike. The answer depends only on the program, not on what was traced before.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    found: set[Query] = set()
    for name in _name_stacks(closed.jaxpr):
        for dtype, time, size in _AUTO_MARK.findall(name):
            if int(time) > 1:  # one step: nothing to choose
                found.add(Query(dtype, int(time), int(size)))
    return found


def _name_stacks(jaxpr):
    """Every equation's name stack in `jaxpr` and in the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        yield str(eqn.source_info.name_stack)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _name_stacks(sub)


def methods_to_time(backend: str) -> tuple[str, ...]:
    """Every `linear_scan` method worth timing on `backend`: Pallas only on a GPU where its
    kernel compiles and runs (`pallas_available`; else it would fail every shape it is in)."""
    methods = [m for m in scan.METHODS if m != "pallas"]
    if "pallas" in scan.METHODS and backend == "gpu":
        from lru_jax.kernels.pallas_scan import pallas_available  # lazily, as scan does

        if pallas_available():
            methods.append("pallas")
    return tuple(methods)


def scan_inputs(key, time_steps: int, batch: int, state: int, dtype):
    """(a [state], b [time_steps, batch, state]) of `dtype`: |a| in [0.9, 0.999], b normal."""
    ka, kb = jax.random.split(key)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        a = 0.999 * jnp.exp(1j * jax.random.uniform(ka, (state,)))
        b = jax.lax.complex(*jax.random.normal(kb, (2, time_steps, batch, state)))
    else:
        a = jax.random.uniform(ka, (state,), minval=0.9, maxval=0.999)
        b = jax.random.normal(kb, (time_steps, batch, state))
    return a.astype(dtype), b.astype(dtype)


def scan_fn(method: str, mode: str):
    """(a, b) -> the scan ("fwd"), or (a, b, ct) -> the forward scan and its VJP at the
    cotangent ct (the gradients with respect to a and b, "fwd+bwd"). The cotangent is an input,
    as it is when a layer above hands it down, so no loss's own passes over h are timed."""

    def forward(a, b):
        return scan.linear_scan(a, b, method=method)

    if mode == "fwd":
        return forward

    def forward_and_vjp(a, b, ct):
        _, vjp = jax.vjp(forward, a, b)
        return vjp(ct)

    return forward_and_vjp


def scan_args(a, b, mode: str) -> tuple:
    """The arguments `scan_fn(method, mode)` takes: (a, b), and for "fwd+bwd" a cotangent of
    h's shape and dtype."""
    if mode == "fwd":
        return (a, b)
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    return (a, b, jnp.broadcast_to(b, shape).astype(scan.accumulation_dtype(a, b)))


def time_methods(a, b, mode: str, repeats: int) -> list[tuple[str, dict]]:
    """(method, timing) of every method on one b [T, B, N], interleaved (`timing.measure_named`).

    A method whose result differs from the sequential scan's (the first) is left out, so it is
    never chosen. "auto" is not timed: it compiles to exactly the method it names.
    """
    length, batch, state = b.shape
    group = f"{jnp.dtype(b.dtype).name} T={length} B={batch} N={state} {mode}"
    methods = methods_to_time(jax.default_backend())
    args = scan_args(a, b, mode)
    candidates = [(m, (scan_fn(m, mode), args)) for m in methods]
    return timing.measure_named(group, candidates, repeats, timing.agrees_with_first(b.dtype))


def entry(b, mode: str, times_ms: dict[str, float], devices: int = 1) -> Entry:
    """The table entry of methods that took `times_ms` on b [T, B, N] in `mode`."""
    length, batch, state = b.shape
    times = tuple((m, float(t)) for m, t in times_ms.items())
    return Entry(jnp.dtype(b.dtype).name, length, batch * state, mode, times, devices)


def table(entries, machine: dict) -> ScanTable:
    """A `ScanTable` of `entries` measured on `machine` (`timing.machine_description`)."""
    meta = {k: machine.get(k) for k in ("device", "jax", "date")}
    return ScanTable(backend=machine["backend"], entries=tuple(entries), **meta)


def measure(queries, modes=MODES, repeats: int = 5, mesh=None, axis: str | None = None):
    """Times every scan method at each `Query` on this process's default backend, forward and
    forward+backward, and returns the `ScanTable`; pass it to the model (`scan_table=`).

    b [time, 1, state_size], methods interleaved, the median of `repeats` runs after a warm-up.
    With `mesh` and `axis` the state is split over that mesh axis (where it divides), as XLA
    splits the scans of a program whose batch is sharded over it: each device times the part it
    would run. With several processes every process measures and all take process 0's times,
    so every process compiles the same program (call it in all of them).
    """
    queries = _checked_queries(queries)
    if not set(modes) <= set(MODES) or not modes:
        raise ValueError(f"modes: expected a non-empty subset of {MODES}, got {modes!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    if mesh is not None and axis not in mesh.shape:
        raise ValueError(f"axis: expected one of the mesh's axes {tuple(mesh.shape)}, got {axis!r}")
    devices = 1 if mesh is None else mesh.shape[axis]  # the split the sizes assume
    measured = []  # (b, mode, {method: ms})
    for q in queries:
        a, b = scan_inputs(jax.random.key(0), q.time, 1, q.state_size, jnp.dtype(q.dtype))
        if mesh is not None and q.state_size % devices == 0:
            a = jax.device_put(a, NamedSharding(mesh, P(axis)))
            b = jax.device_put(b, NamedSharding(mesh, P(None, None, axis)))
        for mode in modes:
            times = {m: t["median_ms"] for m, t in time_methods(a, b, mode, repeats)}
            measured.append((b, mode, times))
    if jax.process_count() > 1:
        measured = _process_zeros_times(measured)
    entries = [entry(b, mode, times, devices) for b, mode, times in measured]
    return table(entries, timing.machine_description())


def _process_zeros_times(measured):
    """`measured` with every time replaced by process 0's (one table for all processes)."""
    from jax.experimental import multihost_utils

    flat = np.array([t for _, _, times in measured for t in times.values()])
    flat = np.asarray(multihost_utils.broadcast_one_to_all(flat)).tolist()
    out = []
    for b, mode, times in measured:
        out.append((b, mode, dict(zip(times, flat[: len(times)], strict=True))))
        flat = flat[len(times) :]
    return out


def _checked_queries(queries) -> list[Query]:
    """`queries` as sorted, distinct `Query`s, or a ValueError naming the bad one."""
    checked = set()
    for q in queries:
        try:
            dtype, time, state_size = q
            query = Query(jnp.dtype(dtype).name, time, state_size)
        except (TypeError, ValueError):
            query = None
        sizes_ok = query is not None and all(
            isinstance(n, int) and n >= 1 for n in (query.time, query.state_size)
        )
        if not sizes_ok:
            raise ValueError(f"queries: expected (dtype, time, state_size) entries, got {q!r}")
        checked.add(query)
    if not checked:
        raise ValueError("queries: expected at least one (dtype, time, state_size), got none")
    return sorted(checked)
