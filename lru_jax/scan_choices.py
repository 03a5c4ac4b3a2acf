"""Measured method choices for `linear_scan(method="auto")`.

`python -m lru_jax.bench --suite scan --out DIR` (or `--suite gpu`) times every scan method on
this machine and writes `DIR/scan_choices.json`. Loading that file makes "auto" run, for each
scan, the method that was fastest at the nearest measured shape on this backend:

    from lru_jax import scan_choices
    scan_choices.load("DIR/scan_choices.json")

or set the environment variable `LRU_JAX_SCAN_CHOICES=DIR/scan_choices.json` before the first
scan is traced. Without a table for the current backend, `scan.choose_method` uses its built-in
rule. `measure(queries)` times the methods at exactly the shapes a program asks "auto" about
(collected while tracing it under `recording()`) and registers that table: train.py does this
by default where the built-in rule is not measured (`config.train.scan_choices`). The choice is
made when a function is traced; loading, registering or clearing a table that changes what is
loaded drops JAX's trace caches (`jax.clear_caches()`), so functions jitted before retrace on
their next call and choose from the new table. With several processes, every process must load
the same table (or they compile different programs).

File format (JSON):

    {"backend": "gpu", "device": "...", "jax": "0.10.2", "date": "2026-11-29",
     "entries": [{"dtype": "complex64", "time": 4096, "state_size": 4096, "mode": "fwd+bwd",
                  "times_ms": {"sequential": 59.0, "associative": 101.0, "chunked": 138.0}}]}

`state_size` is the number of elements scanned per step (batch x state), of the whole scan; an
entry's optional `"devices"` (default 1) is the number of devices the measured program split
that state over (`measure` on a mesh; where a size does not divide, it was timed whole, as such
a scan would run). Lookup: entries of
the query's kind (real or complex) if the table has any, then entries of the query's pass if it
has any (forward+backward for a scan that is differentiated, forward for one that is not; "auto"
compiles the forward choice and differentiates through the forward+backward one, see
`scan.choose_method`), then the entry nearest in (log2 time, log2 state_size); its fastest
method among those allowed wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ENV_VAR = "LRU_JAX_SCAN_CHOICES"
MODES = ("fwd", "fwd+bwd")

_tables: dict[str, dict] = {}  # backend -> table
_env_loaded = False
_recorders: list[set] = []  # open `recording()` contexts


def load(path: str, devices: int = 1) -> dict:
    """Reads a scan_choices.json and makes it the table for its backend; returns the table.

    `devices`: how many devices the program splits its scans' state over (a data-parallel
    run's data axis). The table's entries are rescaled to that split (`for_devices`), so that
    "auto", asked about a scan's global shape, compares what each device runs with what each
    device ran when the entry was timed.
    """
    table = for_devices(_read(path), devices)
    register(table, source=path)
    return table


def for_devices(table: dict, devices: int) -> dict:
    """`table` for a program that splits each scan's state over `devices` devices.

    An entry of `state_size` measured for a split over d devices (its "devices", 1 if absent)
    timed state_size / d elements per device; under the new split a scan of global size
    state_size * devices / d gives each device that much, so that becomes its key. A table
    measured for the same split comes back unchanged (a resumed run chooses as before).
    """
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices: expected a positive int, got {devices!r}")
    if all(e.get("devices", 1) == devices for e in table["entries"]):
        return table
    entries = []
    for e in table["entries"]:
        size = max(1, round(e["state_size"] * devices / e.get("devices", 1)))
        entries.append({**e, "state_size": size, "devices": devices})
    return {**table, "entries": entries}


def register(table: dict, source: str = "table") -> None:
    """Makes `table` (the format above) the measured choices for `table["backend"]`."""
    _check(table, source)
    _replace_tables({**_tables, table["backend"]: table})


def clear() -> None:
    """Forgets every loaded table (and re-reads the environment variable on next use)."""
    global _env_loaded
    _replace_tables({})
    _env_loaded = False


@contextlib.contextmanager
def restored():
    """Puts every table back as it was before the block: tables loaded for one run end with it."""
    global _env_loaded
    tables, env_loaded = dict(_tables), _env_loaded
    try:
        yield
    finally:
        _replace_tables(tables)
        _env_loaded = env_loaded


def table_for(backend: str) -> dict | None:
    """The loaded table for `backend`, reading $LRU_JAX_SCAN_CHOICES the first time."""
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        path = os.environ.get(ENV_VAR)
        if path:  # read while the first "auto" scan traces: nothing chose without it yet
            table = _read(path)
            _tables[table["backend"]] = table
    return _tables.get(backend)


def _replace_tables(tables: dict[str, dict]) -> None:
    """Makes `tables` the loaded ones. Where that changes them, JAX's caches of traced functions
    are dropped, so that a function jitted before retraces on its next call and its "auto"
    scans choose from the new tables (instead of keeping the choices of its first trace)."""
    if tables != _tables:
        _tables.clear()
        _tables.update(tables)
        jax.clear_caches()


def _read(path: str) -> dict:
    """The table in the JSON file `path`, checked (a ValueError naming the file if it is not)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"scan choices: cannot read {path!r} as JSON: {e}") from e
    _check(table, path)
    return table


def save(table: dict, path: str) -> None:
    """Writes `table` as JSON to `path` atomically (a crash leaves the old file or none)."""
    _check(table, path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


class Query(NamedTuple):
    """One question "auto" was asked while tracing: a scan of `time` steps over `state_size`
    elements of `dtype` (a dtype name)."""

    dtype: str
    time: int
    state_size: int


@contextlib.contextmanager
def recording():
    """Collects the `Query`s that `scan.choose_method` gets while the block traces something:

    with scan_choices.recording() as queries:
        jax.eval_shape(train_step, state, batch)
    scan_choices.measure(queries)  # the next call of train_step retraces with the table
    """
    queries: set[Query] = set()
    _recorders.append(queries)
    try:
        yield queries
    finally:
        _recorders.remove(queries)


def note(time: int, state_size: int, dtype) -> None:
    """Called by `scan.choose_method`: adds its question to every open `recording()`."""
    if _recorders and dtype is not None and time > 1:
        query = Query(jnp.dtype(dtype).name, int(time), int(state_size))
        for queries in _recorders:
            queries.add(query)


def measure(queries, modes=MODES, repeats: int = 5, mesh=None, axis: str | None = None) -> dict:
    """Times every scan method at each `Query` on this process's default backend, forward and
    forward+backward, and registers (and returns) the table: "auto" then chooses from it.

    The timing is the bench's scan suite (`lru_jax.bench`): b [time, 1, state_size], methods
    interleaved, the median of `repeats` runs after a warm-up. With `mesh` and `axis` the state
    is split over that mesh axis (where it divides), as XLA splits the scans of a program whose
    batch is sharded over it: each device times the part it would run. With several processes
    every process measures and all take process 0's times, so every process compiles the same
    program (call it in all of them).
    """
    from lru_jax import bench  # lazily: the bench imports this module

    queries = _checked_queries(queries)
    if not set(modes) <= set(MODES) or not modes:
        raise ValueError(f"modes: expected a non-empty subset of {MODES}, got {modes!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    if mesh is not None and axis not in mesh.shape:
        raise ValueError(f"axis: expected one of the mesh's axes {tuple(mesh.shape)}, got {axis!r}")
    rows = []
    for q in queries:
        a, b = bench.scan_inputs(jax.random.key(0), q.time, 1, q.state_size, jnp.dtype(q.dtype))
        if mesh is not None and q.state_size % mesh.shape[axis] == 0:
            a = jax.device_put(a, NamedSharding(mesh, P(axis)))
            b = jax.device_put(b, NamedSharding(mesh, P(None, None, axis)))
        for mode in modes:
            rows += bench.scan_group(a, b, mode, repeats)
    if jax.process_count() > 1:  # one table for all, or they would compile different programs
        from jax.experimental import multihost_utils

        times = multihost_utils.broadcast_one_to_all(np.array([r.median_ms for r in rows]))
        for row, ms in zip(rows, np.asarray(times).tolist(), strict=True):
            row.median_ms = ms
    table = from_rows([dataclasses.asdict(r) for r in rows], bench.machine_description(None))
    for e in table["entries"]:  # the split the entries' sizes assume (see `for_devices`)
        e["devices"] = 1 if mesh is None else mesh.shape[axis]
    register(table, source="measured")
    return table


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


def fastest(
    table: dict,
    time: int,
    state_size: int,
    is_complex: bool | None,
    allowed: tuple[str, ...],
    mode: str = "fwd+bwd",
) -> str | None:
    """The fastest allowed method at the measured shape nearest to (time, state_size), among
    the entries of `mode` ("fwd" or "fwd+bwd") if the table has any, else the other mode's."""
    entries = [e for e in table["entries"] if any(m in allowed for m in e["times_ms"])]
    if is_complex is not None:
        same_kind = [e for e in entries if _is_complex(e["dtype"]) == is_complex]
        entries = same_kind or entries
    entries = [e for e in entries if e["mode"] == mode] or entries
    if not entries:
        return None

    def distance(e):
        log_time = math.log2(e["time"]) - math.log2(time)
        return math.hypot(log_time, math.log2(e["state_size"]) - math.log2(state_size))

    nearest = min(entries, key=distance)
    times = {m: t for m, t in nearest["times_ms"].items() if m in allowed}
    return min(times, key=times.get)


def from_rows(rows: list[dict], machine: dict) -> dict:
    """A table from the bench's scan rows (dicts of `bench.Row`) and its machine description."""
    groups: dict[str, dict] = {}
    for r in rows:
        w = r["work"]
        entry = groups.setdefault(
            r["group"],
            {
                "dtype": w["dtype"],
                "time": w["length"],
                "state_size": w["batch"] * w["state"],
                "mode": w["mode"],
                "times_ms": {},
            },
        )
        entry["times_ms"][r["name"]] = r["median_ms"]
    keys = ("backend", "device", "jax", "date")
    return {**{k: machine.get(k) for k in keys}, "entries": list(groups.values())}


def _is_complex(dtype: str) -> bool:
    return dtype.startswith("complex")


def _check(table, source: str) -> None:
    def fail(what):
        raise ValueError(f"scan choices ({source}): {what}")

    if not isinstance(table, dict) or not isinstance(table.get("backend"), str):
        fail("expected an object with a 'backend' string")
    entries = table.get("entries")
    if not isinstance(entries, list) or not entries:
        fail("expected a non-empty 'entries' list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            fail(f"entries[{i}]: expected an object, got {type(e).__name__}")
        for key in ("time", "state_size"):
            if not isinstance(e.get(key), int) or e[key] < 1:
                fail(f"entries[{i}].{key}: expected a positive int, got {e.get(key)!r}")
        if e.get("mode") not in MODES:
            fail(f"entries[{i}].mode: expected one of {MODES}, got {e.get('mode')!r}")
        if not isinstance(e.get("devices", 1), int) or e.get("devices", 1) < 1:
            fail(f"entries[{i}].devices: expected a positive int, got {e.get('devices')!r}")
        if not isinstance(e.get("dtype"), str):
            fail(f"entries[{i}].dtype: expected a dtype name, got {e.get('dtype')!r}")
        times = e.get("times_ms")
        if not isinstance(times, dict) or not times:
            fail(f"entries[{i}].times_ms: expected {{method: ms}}, got {times!r}")
        for method, ms in times.items():
            if not isinstance(ms, int | float) or not ms > 0:
                fail(f"entries[{i}].times_ms[{method!r}]: expected a positive time, got {ms!r}")
