"""Reruns the results suite and writes its table to docs/results/table.md.

    python scripts/results.py                  # every experiment (hours on 2 cores)
    python scripts/results.py --only mnist1d-lru,jokes-lru
    python scripts/results.py --workdir runs/results
    python scripts/results.py --resume         # keep runs that already finished

Each experiment is a config file plus overrides, trained from scratch in its own directory,
once per seed (the headline rows, and the Transformer and LSTM rows the ListOps target is a
margin over, run seeds 0, 1, 2 and report mean ± standard deviation).
The table (metric, the task's trivial baseline or a published reference, wall time) goes to
docs/results/table.md, each experiment's validation curve to docs/results/<name>.png. The rows
are kept in docs/results/rows.json: a run with --only replaces its own rows and keeps the rest.
docs/results.md is written by hand around them: what the numbers mean and how they were found.
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
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lru_jax.training import config as config_lib  # noqa: E402
from lru_jax.training.loop import build_task, train_and_evaluate  # noqa: E402

HEADLINE = ("adding-lru", "mnist1d-lru", "listops-lru", "stdlib-lru")  # run with 3 seeds
# rows a headline target is a margin over: as many seeds as the headline row they are set against
MARGIN_BASELINES = ("listops-attention", "listops-lstm")
# name, config file, overrides, the metric to report, reference shown beside it.
EXPERIMENTS = [
    ("adding-lru", "adding.py", {}, "mse", "baseline 0.167"),
    ("adding-lstm", "adding.py", {"model.mixer": "lstm"}, "mse", "baseline 0.167"),
    ("adding-gru", "adding.py", {"model.mixer": "gru"}, "mse", "baseline 0.167"),
    ("mnist1d-lru", "mnist1d.py", {}, "accuracy", "GRU 91%, CNN 94% (MNIST-1D paper)"),
    ("mnist1d-gru", "mnist1d.py", {"model.mixer": "gru"}, "accuracy", "GRU 91% (paper)"),
    (
        "mnist1d-attention",
        "mnist1d.py",
        {"model.mixer": "attention"},
        "accuracy",
        "GRU 91% (paper)",
    ),
    ("mnist1d-shuffled-lru", "mnist1d_shuffled.py", {}, "accuracy", "GRU 57% (paper)"),
    (
        "mnist1d-shuffled-gru",
        "mnist1d_shuffled.py",
        {"model.mixer": "gru"},
        "accuracy",
        "GRU 57% (paper)",
    ),
    ("listops-lru", "listops.py", {}, "accuracy", "majority class"),
    (
        "listops-attention",
        "listops.py",
        {"model.mixer": "attention", "train.num_steps": 4500},
        "accuracy",
        "majority class",
    ),
    (
        "listops-lstm",
        "listops.py",
        {"model.mixer": "lstm", "train.num_steps": 5500},
        "accuracy",
        "majority class",
    ),
    ("jokes-lru", "default.py", {}, "bits_per_char", "compressors"),
    ("copy-lru", "copy.py", {}, "loss", "baseline"),
    ("copy-attention", "copy.py", {"model.mixer": "attention"}, "loss", "baseline"),
    ("selective-copy-lru", "selective_copy.py", {}, "loss", "baseline"),
    ("recall-lru", "associative_recall.py", {}, "loss", "baseline"),
    ("recall-attention", "associative_recall.py", {"model.mixer": "attention"}, "loss", "baseline"),
    ("stdlib-lru", "stdlib_text.py", {}, "bits_per_char", "compressors"),
]
# ListOps gives every mixer about the LRU's 18.5 minutes of training: the slower LSTM and
# Transformer rows above train for fewer steps. The diagonal recurrences' rows below are the
# shorter recipe measured before it (3,000 steps, dropout 0.1); Mamba's is older still
# (blocks reading forwards only, 10,000 training expressions, 500 valid and test).
LISTOPS_3000_STEPS = {
    "train.num_steps": 3000,
    "train.eval_every": 500,
    "model.dropout_rate": 0.1,
}
LISTOPS_FORWARDS_ONLY = {
    "model.bidirectional_blocks": False,
    "task.num_train": 10000,
    "task.num_valid": 500,
    "task.num_test": 500,
}


def _mixer_overrides(task: str, mixer: str) -> dict:
    if (task, mixer) == ("adding", "rglru"):  # it stays at the mean for about 1,000 steps
        return {"model.mixer": mixer, "train.num_steps": 3000}
    if (task, mixer) == ("listops", "mamba"):
        return {"model.mixer": mixer, **LISTOPS_3000_STEPS, **LISTOPS_FORWARDS_ONLY}
    if task == "listops":
        return {"model.mixer": mixer, **LISTOPS_3000_STEPS}
    return {"model.mixer": mixer}


# The diagonal recurrences (and Mamba) on the adding problem, ListOps and associative recall.
DIAGONAL_MIXERS = ("mingru", "minlstm", "hgrn", "rglru", "s5", "mamba")
EXPERIMENTS += [
    (f"{task}-{mixer}", filename, _mixer_overrides(task, mixer), metric, reference)
    for mixer in DIAGONAL_MIXERS
    for task, filename, metric, reference in (
        ("adding", "adding.py", "mse", "baseline 0.167"),
        ("listops", "listops.py", "accuracy", "majority class"),
        ("recall", "associative_recall.py", "loss", "baseline"),
    )
]
OUT = os.path.join(ROOT, "docs", "results")


def load_config(filename: str, overrides: dict):
    return config_lib.load_config(os.path.join(ROOT, "configs", filename), overrides)


def config_text(filename: str, overrides: dict) -> str:
    """The command-line form of an experiment's config, as its table row names it."""
    flags = "".join(f" --config.{k}={v}" for k, v in overrides.items() if k != "seed")
    return f"configs/{filename}{flags}"


def compressor_text(config) -> str:
    """What bz2 and `xz -9e` spend per byte of the test text once they have read the training
    text, computed here from the task's own splits."""
    task = build_task(config)
    bz2, xz = (task.compressor_bits_per_byte("test", c) for c in ("bz2", "xz"))
    return f"test given train: bz2 {bz2:.3f}, xz -9e {xz:.3f} bpc"


def baseline_text(final: dict, metric: str, reference: str, config=None) -> str:
    if reference == "compressors":
        return compressor_text(config)
    ((name, value),) = final["baseline"].items()
    if metric == "bits_per_char" and name == "loss":
        return f"{reference}: {value / 0.6931471805599453:.2f} bpc"
    if reference in ("majority class", "baseline"):
        return f"{reference}: {value:.3f}"
    return reference


def run(name, filename, overrides, metric, reference, workdir, resume=False, seed=None) -> dict:
    """One training run of an experiment (with `seed`, if given, in its own directory); its
    result.json is kept in that directory."""
    directory = os.path.join(workdir, name if seed is None else f"{name}-seed{seed}")
    if seed is not None:
        overrides = {**overrides, "seed": seed}
    result_path = os.path.join(directory, "result.json")
    if resume and os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    config = load_config(filename, overrides)
    final = train_and_evaluate(config, directory)
    result = {
        "name": name,
        "seed": config.seed,
        "config": config_text(filename, overrides),
        "metric": metric,
        "valid": final["valid"][metric],
        "test": final["test"][metric],
        "reference": baseline_text(final, metric, reference, config),
        "wall_s": time.perf_counter() - start,
        "samples": final.get("samples", []),
        "sample_word_share": final.get("sample_word_share"),
        "curve": validation_curve(os.path.join(directory, "metrics.jsonl"), metric),
    }
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def validation_curve(metrics_path: str, metric: str) -> list[tuple[int, float]]:
    """[(step, validation metric)] from a run's metrics.jsonl."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[metric]) for r in rows if r.get("split") == "valid" and metric in r]


def plot_curves(name: str, runs: list[dict], path: str) -> None:
    """Validation metric against step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in runs:
        steps, values = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(steps, values, marker="o", label=f"seed {r['seed']}")
    ax.set(title=name, xlabel="step", ylabel=f"validation {runs[0]['metric']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(runs: list[dict]) -> dict:
    """One table row from an experiment's runs: mean and (with several seeds) std."""
    row = {k: runs[0][k] for k in ("name", "config", "metric", "reference", "samples")}
    for split in ("valid", "test"):
        values = np.array([r[split] for r in runs])
        row[split] = f"{values.mean():.4f}" + (
            f" ± {values.std(ddof=1):.4f}" if len(runs) > 1 else ""
        )
    row["seeds"] = len(runs)
    shares = [r["sample_word_share"] for r in runs if r.get("sample_word_share") is not None]
    if shares:
        row["sample_word_share"] = float(np.mean(shares))
    row["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
    row["measured"] = time.strftime("%Y-%m-%d")
    row["machine"] = f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}"
    return row


def merged_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` rows with those of `new` replaced or added, in the order of EXPERIMENTS."""
    by_name = {r["name"]: r for r in old} | {r["name"]: r for r in new}
    order = [e[0] for e in EXPERIMENTS]
    return sorted(by_name.values(), key=lambda r: order.index(r["name"]))


def table(rows: list[dict]) -> str:
    machines = sorted({r["machine"] for r in rows})
    lines = [
        f"Measured by `python scripts/results.py` on a {' / '.join(machines)}.",
        "Several seeds: mean ± standard deviation; wall time per run.",
        "",
        "| experiment | config | metric | seeds | valid | test | reference | wall time "
        "| measured |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| [{r['name']}]({r['name']}.png) | `{r['config']}` | {r['metric']} | {r['seeds']} | "
            f"{r['valid']} | {r['test']} | {r['reference']} | {r['wall_s'] / 60:.1f} min | "
            f"{r['measured']} |"
        )
    for r in rows:
        if r["samples"]:
            words = ""
            if r.get("sample_word_share") is not None:
                share = r["sample_word_share"]
                words = f"; {share:.0%} of their words are words of the training text"
            lines += ["", f"Samples from {r['name']} (temperature 0.8, unedited{words}):", ""]
            if any("\n" in s for s in r["samples"]):  # code: keep its lines as they are
                lines += ["```text", *("\n".join(r["samples"]).splitlines()), "```"]
            else:
                lines += [f"> {s}  " for s in r["samples"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated experiment names")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "results"))
    parser.add_argument("--resume", action="store_true", help="reuse finished runs")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    names = [e[0] for e in EXPERIMENTS]
    unknown = [n for n in args.only.split(",") if n and n not in names]
    if unknown:
        parser.error(f"--only: unknown experiments {unknown}; expected some of {names}")
    chosen = [e for e in EXPERIMENTS if not args.only or e[0] in args.only.split(",")]
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for experiment in chosen:
        seeds = range(3) if experiment[0] in HEADLINE + MARGIN_BASELINES else range(1)
        runs = [run(*experiment, args.workdir, args.resume, seed) for seed in seeds]
        plot_curves(experiment[0], runs, os.path.join(OUT, f"{experiment[0]}.png"))
        rows.append(summary(runs))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    rows_path = os.path.join(OUT, "rows.json")
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            rows = merged_rows(json.load(f), rows)
    with open(rows_path, "w") as f:
        json.dump(rows, f, indent=1)
    text = table(rows)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write("# Results table\n\n" + text)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
