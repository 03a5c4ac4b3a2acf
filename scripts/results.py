"""Reruns the README's results suite and rewrites its table.

    python scripts/results.py                  # every experiment (about an hour on 2 cores)
    python scripts/results.py --only adding-lru,jokes-lru
    python scripts/results.py --workdir runs/results --no-readme
    python scripts/results.py --resume         # keep experiments that already finished

Each experiment is a config file plus overrides, trained from scratch in its own directory.
The table (metric, the task's trivial baseline or a published reference, wall time) goes to
docs/results.md and between the results markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import jax
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lru_jax.training import config as config_lib  # noqa: E402
from lru_jax.training.loop import train_and_evaluate  # noqa: E402

# name, config file, overrides, the metric to report, reference shown beside it.
EXPERIMENTS = [
    ("adding-lru", "adding.py", {}, "mse", "baseline 0.167"),
    ("adding-lstm", "adding.py", {"model.mixer": "lstm"}, "mse", "baseline 0.167"),
    ("mnist1d-lru", "mnist1d.py", {}, "accuracy", "GRU 91%, CNN 94% (MNIST-1D paper)"),
    ("mnist1d-gru", "mnist1d.py", {"model.mixer": "gru"}, "accuracy", "GRU 91% (paper)"),
    (
        "mnist1d-attention",
        "mnist1d.py",
        {"model.mixer": "attention"},
        "accuracy",
        "GRU 91% (paper)",
    ),
    ("listops-lru", "listops.py", {}, "accuracy", "majority class"),
    ("listops-attention", "listops.py", {"model.mixer": "attention"}, "accuracy", "majority class"),
    ("jokes-lru", "default.py", {}, "bits_per_char", "unigram entropy"),
    ("copy-lru", "copy.py", {}, "loss", "baseline"),
    ("copy-attention", "copy.py", {"model.mixer": "attention"}, "loss", "baseline"),
    ("selective-copy-lru", "selective_copy.py", {}, "loss", "baseline"),
    ("recall-lru", "associative_recall.py", {}, "loss", "baseline"),
    ("stdlib-lru", "stdlib_text.py", {}, "bits_per_char", "unigram entropy"),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load_config(filename: str, overrides: dict):
    return config_lib.load_config(os.path.join(ROOT, "configs", filename), overrides)


def baseline_text(final: dict, metric: str, reference: str) -> str:
    ((name, value),) = final["baseline"].items()
    if metric == "bits_per_char" and name == "loss":
        return f"{reference}: {value / 0.6931471805599453:.2f} bpc"
    if reference in ("majority class", "baseline"):
        return f"{reference}: {value:.3f}"
    return reference


def run(name, filename, overrides, metric, reference, workdir, resume=False) -> dict:
    directory = os.path.join(workdir, name)
    result_path = os.path.join(directory, "result.json")
    if resume and os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    final = train_and_evaluate(load_config(filename, overrides), directory)
    result = {
        "name": name,
        "config": f"configs/{filename}"
        + "".join(f" --config.{k}={v}" for k, v in overrides.items()),
        "metric": metric,
        "valid": final["valid"][metric],
        "test": final["test"][metric],
        "reference": baseline_text(final, metric, reference),
        "wall_s": time.perf_counter() - start,
        "samples": final.get("samples", []),
    }
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def table(rows: list[dict]) -> str:
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on a {machine} by `python scripts/results.py`.",
        "",
        "| experiment | config | metric | valid | test | reference | wall time |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['config']}` | {r['metric']} | {r['valid']:.4f} | "
            f"{r['test']:.4f} | {r['reference']} | {r['wall_s'] / 60:.1f} min |"
        )
    for r in rows:
        if r["samples"]:
            lines += ["", f"Samples from {r['name']} (temperature 0.8, unedited):", ""]
            if any("\n" in s for s in r["samples"]):  # code: keep its lines as they are
                lines += ["```text", *("\n".join(r["samples"]).splitlines()), "```"]
            else:
                lines += [f"> {s}  " for s in r["samples"]]
    return "\n".join(lines) + "\n"


def write_readme(text: str, start: str = START, end: str = END) -> None:
    """Replaces README.md's text between the markers `start` and `end` with `text`."""
    path = os.path.join(ROOT, "README.md")
    readme = open(path).read()
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} section to fill")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + start + "\n" + text + end + tail)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated experiment names")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "results"))
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    parser.add_argument("--resume", action="store_true", help="reuse finished experiments")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    chosen = [e for e in EXPERIMENTS if not args.only or e[0] in args.only.split(",")]
    rows = []
    for experiment in chosen:
        rows.append(run(*experiment, args.workdir, args.resume))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    text = table(rows)
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    with open(os.path.join(ROOT, "docs", "results.md"), "w") as f:
        f.write("# Results\n\n" + text)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if not args.no_readme:
        write_readme(text)
    print(text)


if __name__ == "__main__":
    main()
