"""The scan table a run's model is built with (`config.train.scan_choices`), measured or read.

A run keeps the table it chose as workdir/scan_choices.json, so that a resumed run, and the
tools that replay a trained model (diagnose, attention maps), build the same program.
"""

from __future__ import annotations

import os

import jax

from lru_jax import scan, scan_choices
from lru_jax.scan_table import ScanTable
from lru_jax.training import sharding

SCAN_CHOICES = "scan_choices.json"  # a run's measured scan table


def run_table(setting: str, workdir: str, devices: int = 1) -> tuple[ScanTable | None, bool]:
    """(the table to build the run's model with, whether to measure one first) for
    `config.train.scan_choices` = `setting`.

    "auto" and "measure": the run's own workdir/scan_choices.json if it has one, so that a
    resumed run compiles what it compiled before. Without one, "measure" measures and "auto"
    measures only where the built-in rule is not a measured one (`scan.MEASURED_RULE_BACKENDS`:
    not on CPU). "": no table (the built-in rule), never measured. A path: the table in that
    file. `devices`: the run's data-parallel size, which a read table is rescaled to
    (`scan_table.for_devices`).
    """
    if setting in ("auto", "measure"):
        saved = os.path.join(workdir, SCAN_CHOICES)
        if os.path.exists(saved):
            return scan_choices.load(saved, devices), False
        measure = setting == "measure" or jax.default_backend() not in scan.MEASURED_RULE_BACKENDS
        return None, measure
    if setting:
        return scan_choices.load(setting, devices), False  # a bad file: a ValueError naming it
    return None, False


def replayed_table(config, workdir: str | None) -> ScanTable | None:
    """The table the run in `workdir` built its model with: its saved scan_choices.json, or the
    file its `config.train.scan_choices` names. For tools that re-run a trained model on one
    device (diagnose, attention maps), so that their scans run the methods training ran for the
    same per-device sizes."""
    if workdir is None:
        return None
    return run_table(config.train.get("scan_choices", "auto"), workdir)[0]


def measure_run(queries, workdir: str, write: bool, mesh) -> ScanTable | None:
    """Times every scan method at the run's `queries` (`scan_choices.queries` of its steps) and
    saves the table as workdir/scan_choices.json (if `write`); None if nothing runs "auto".

    The state is split over the mesh's data axis while timing, as in training (the batch is
    split over it; inside a sequence-parallel block too). With several processes all take
    process 0's times.
    """
    if not queries:  # nothing runs "auto": another cell, or a method named in the config
        return None
    if write:
        shapes = "; ".join(f"{q.dtype}, {q.time} steps x {q.state_size}" for q in sorted(queries))
        print(f'Timing the scan methods "auto" chooses from at the run\'s shapes ({shapes})')
    table = scan_choices.measure(queries, mesh=mesh, axis=sharding.DATA)
    if write:
        path = os.path.join(workdir, SCAN_CHOICES)
        scan_choices.save(table, path)
        print(f"Saved those timings as {path}")
    return table
