"""The scan suite: every `linear_scan` method over lengths x (batch, state) sizes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lru_jax import scan_choices
from lru_jax.bench import report
from lru_jax.bench.report import Row
from lru_jax.timing import Limits


def scan_suite(
    lengths: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    dtypes: Sequence[str],
    repeats: int,
    limits: Limits,
    max_elements: int,
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
) -> list[Row]:
    """Every method at every (length, batch, state, dtype, mode) with T*B*N <= max_elements."""
    rows = []
    for dtype_name in dtypes:
        for batch, state in sizes:
            for length in lengths:
                if length * batch * state > max_elements:
                    continue
                a, b = scan_choices.scan_inputs(
                    jax.random.key(0), length, batch, state, jnp.dtype(dtype_name)
                )
                for mode in modes:
                    rows += scan_group(a, b, mode, repeats, limits)
    report.set_speedups(rows, lambda r: r.name == "sequential")
    return rows


def scan_group(a, b, mode: str, repeats: int, limits: Limits | None = None) -> list[Row]:
    """Every method on one b [T, B, N], interleaved (`scan_choices.time_methods`; `mode` "fwd"
    or "fwd+bwd"); the bandwidth as a fraction of `limits` if given. "auto" has no row: it
    compiles to exactly the method `choose_method` names (`report.scan_summary` shows which)."""
    length, batch, state = b.shape
    dtype_name = jnp.dtype(b.dtype).name
    group = f"{dtype_name} T={length} B={batch} N={state} {mode}"
    # minimum traffic: read b, write h (and read h, b's cotangent, write two grads in backward)
    passes = 2 if mode == "fwd" else 5
    rows = []
    for method, timing in scan_choices.time_methods(a, b, mode, repeats):
        row = report.row("scan", group, method, timing)
        row.work = {
            "bytes": passes * b.nbytes,
            "length": length,
            "batch": batch,
            "state": state,
            "dtype": dtype_name,
            "mode": mode,
        }
        report.bandwidth(row, limits)
        rows.append(row)
    return rows


def table_of(rows: list[Row], machine: dict) -> scan_choices.ScanTable:
    """The `ScanTable` of the scan suite's `rows` (the fastest method per shape)."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    entries = []
    for group in groups.values():
        w = group[0].work
        times = {r.name: r.median_ms for r in group}
        entries.append(
            scan_choices.Entry(
                w["dtype"], w["length"], w["batch"] * w["state"], w["mode"], tuple(times.items())
            )
        )
    return scan_choices.table(entries, machine)
