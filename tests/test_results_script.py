"""scripts/results.py keeps the rows it did not rerun."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location(
        "results", os.path.join(ROOT, "scripts", "results.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_partial_rerun_replaces_its_rows_and_keeps_the_others_in_table_order():
    results = load_script()
    row = {
        "config": "c",
        "metric": "mse",
        "reference": "r",
        "samples": [],
        "valid": "1",
        "test": "1",
        "seeds": 1,
        "wall_s": 60.0,
        "measured": "d",
        "machine": "m",
    }
    old = [{**row, "name": "recall-lru"}, {**row, "name": "adding-lru", "test": "old"}]
    new = [{**row, "name": "adding-lru", "test": "new"}, {**row, "name": "adding-mamba"}]
    merged = results.merged_rows(old, new)
    assert [r["name"] for r in merged] == ["adding-lru", "recall-lru", "adding-mamba"]
    assert merged[0]["test"] == "new"
    assert "| [adding-mamba](adding-mamba.png) | `c` |" in results.table(merged)


def test_the_committed_rows_make_the_committed_table():
    results = load_script()
    with open(os.path.join(ROOT, "docs", "results", "rows.json")) as f:
        rows = json.load(f)
    with open(os.path.join(ROOT, "docs", "results", "table.md")) as f:
        assert f.read() == "# Results table\n\n" + results.table(rows)


def test_every_committed_row_names_the_config_its_experiment_runs_now():
    results = load_script()
    with open(os.path.join(ROOT, "docs", "results", "rows.json")) as f:
        rows = json.load(f)
    configs = {name: results.config_text(f, o) for name, f, o, *_ in results.EXPERIMENTS}
    for row in rows:
        assert row["config"] == configs[row["name"]], row["name"]
