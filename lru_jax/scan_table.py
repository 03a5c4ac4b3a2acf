"""A table of measured scan times, the value `linear_scan(method="auto")` can choose from.

A `ScanTable` is an immutable, hashable value: pass it to a scan (`linear_scan(...,
scan_table=t)`) or to a module (`nn.LRU(..., scan_table=t)`, `models.SequenceModel(...)`), and
every "auto" scan in it runs the method that was fastest at the nearest measured shape on the
table's backend. Nothing is registered anywhere: the same call with the same table always
builds the same program. Tables come from `lru_jax.scan_choices.measure` (at a program's own
shapes), from the bench (`python -m lru_jax.bench --suite scan --out DIR` writes
`DIR/scan_choices.json`) or from a file (`load`).

File format (JSON), unchanged since the first tables were written:

    {"backend": "gpu", "device": "...", "jax": "0.10.2", "date": "2026-11-29",
     "entries": [{"dtype": "complex64", "time": 4096, "state_size": 4096, "mode": "fwd+bwd",
                  "times_ms": {"sequential": 59.0, "associative": 101.0, "chunked": 138.0}}]}

`state_size` is the number of elements scanned per step (batch x state) of the whole scan; an
entry's optional `"devices"` (default 1) is the number of devices the measured program split
that state over (where a size did not divide, it was timed whole, as such a scan would run).

Lookup (`ScanTable.fastest`): entries of the query's kind (real or complex) if the table has
any, then entries of the query's pass if it has any (forward+backward for a scan that is
differentiated, forward for one that is not), then the entry nearest in (log2 time, log2
state_size); its fastest method among those allowed wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Entry:
    """The times of the scan methods at one shape and pass.

    `times_ms`: ((method, median ms), ...), in the order they were measured.
    """

    dtype: str
    time: int
    state_size: int
    mode: str
    times_ms: tuple[tuple[str, float], ...]
    devices: int = 1

    def to_json(self) -> dict:
        fields = ("dtype", "time", "state_size", "mode")
        return {
            **{k: getattr(self, k) for k in fields},
            "times_ms": dict(self.times_ms),
            "devices": self.devices,
        }


@dataclasses.dataclass(frozen=True)
class ScanTable:
    """Measured scan times on one backend (see the module docstring)."""

    backend: str
    entries: tuple[Entry, ...]
    device: str | None = None
    jax: str | None = None
    date: str | None = None

    def __post_init__(self):
        if not self.entries:
            raise ValueError(f"entries: expected at least one Entry, got {self.entries!r}")

    def fastest(
        self,
        time: int,
        state_size: int,
        is_complex: bool | None,
        allowed: tuple[str, ...],
        mode: str = "fwd+bwd",
    ) -> str | None:
        """The fastest allowed method at the measured shape nearest to (time, state_size),
        among the entries of `mode` ("fwd" or "fwd+bwd") if the table has any, else the other
        mode's; None if no entry timed an allowed method."""
        entries = [e for e in self.entries if any(m in allowed for m, _ in e.times_ms)]
        if is_complex is not None:
            same_kind = [e for e in entries if e.dtype.startswith("complex") == is_complex]
            entries = same_kind or entries
        entries = [e for e in entries if e.mode == mode] or entries
        if not entries:
            return None

        def distance(e):
            log_time = math.log2(e.time) - math.log2(time)
            return math.hypot(log_time, math.log2(e.state_size) - math.log2(state_size))

        times = {m: t for m, t in min(entries, key=distance).times_ms if m in allowed}
        return min(times, key=times.get)

    def to_json(self) -> dict:
        meta = {k: getattr(self, k) for k in ("backend", "device", "jax", "date")}
        return {**meta, "entries": [e.to_json() for e in self.entries]}

    @classmethod
    def from_json(cls, table, source: str = "table") -> ScanTable:
        """The table in the JSON object `table` (the file format above), checked: a ValueError
        naming `source` and the bad field if it is not one."""
        _check(table, source)
        entries = tuple(
            Entry(
                dtype=e["dtype"],
                time=e["time"],
                state_size=e["state_size"],
                mode=e["mode"],
                times_ms=tuple((m, float(t)) for m, t in e["times_ms"].items()),
                devices=e.get("devices", 1),
            )
            for e in table["entries"]
        )
        meta = {k: table.get(k) for k in ("device", "jax", "date")}
        return cls(backend=table["backend"], entries=entries, **meta)


def load(path: str, devices: int = 1) -> ScanTable:
    """The table in the scan_choices.json file `path`, for a program that splits its scans'
    state over `devices` devices (a data-parallel run's data axis, see `for_devices`)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"scan choices: cannot read {path!r} as JSON: {e}") from e
    return for_devices(ScanTable.from_json(table, path), devices)


def save(table: ScanTable, path: str) -> None:
    """Writes `table` as JSON to `path` atomically (a crash leaves the old file or none)."""
    if not isinstance(table, ScanTable):
        raise TypeError(f"table: expected a ScanTable, got {type(table).__name__}")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table.to_json(), f, indent=1)
    os.replace(tmp, path)


def for_devices(table: ScanTable, devices: int) -> ScanTable:
    """`table` for a program that splits each scan's state over `devices` devices.

    An entry of `state_size` measured for a split over d devices timed state_size / d elements
    per device; under the new split a scan of global size state_size * devices / d gives each
    device that much, so that becomes its key. "auto" is asked about a scan's global shape, so
    it then compares what each device runs with what each device ran when the entry was timed.
    A table measured for the same split comes back unchanged (a resumed run chooses as before).
    """
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices: expected a positive int, got {devices!r}")
    if all(e.devices == devices for e in table.entries):
        return table
    entries = tuple(
        dataclasses.replace(
            e, state_size=max(1, round(e.state_size * devices / e.devices)), devices=devices
        )
        for e in table.entries
    )
    return dataclasses.replace(table, entries=entries)


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
