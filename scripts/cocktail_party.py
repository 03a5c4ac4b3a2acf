"""Trains the encoder-decoder experiments and writes their table and attention heatmaps.

    python scripts/cocktail_party.py            # about 10 minutes on 2 CPU cores
    python scripts/cocktail_party.py --resume   # keep experiments that already finished

The cocktail party with no, soft and hard attention (configs/cocktail_party.py), and reverse
and sort with soft attention (configs/reverse.py), each trained from scratch. Writes
docs/cocktail_party.md (the table, with every test metric), heatmaps under docs/attention/
(`python -m lru_jax.attention_maps`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from absl import logging

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import results  # noqa: E402  (scripts/results.py: load and run an experiment)

from lru_jax.attention_maps import attention_maps  # noqa: E402

# name, config file, overrides, heatmaps to keep (0: none).
EXPERIMENTS = [
    ("cocktail-none", "cocktail_party.py", {"model.seq2seq.attention": "none"}, 0),
    ("cocktail-soft", "cocktail_party.py", {"model.seq2seq.attention": "soft"}, 2),
    ("cocktail-hard", "cocktail_party.py", {"model.seq2seq.attention": "hard"}, 2),
    ("reverse-soft", "reverse.py", {}, 1),
    ("sort-soft", "reverse.py", {"task.name": "sort"}, 1),
]
DOCS = os.path.join(ROOT, "docs")


def run(name, filename, overrides, images, workdir, resume) -> dict:
    row = results.run(name, filename, overrides, "sequence_accuracy", "baseline", workdir, resume)
    directory = os.path.join(workdir, name)
    with open(os.path.join(directory, "final_metrics.json")) as f:
        final = json.load(f)
    row["test_metrics"] = final["test"]
    row["baseline_loss"] = final["baseline"]["loss"]
    if images:
        out = os.path.join(DOCS, "attention", name)
        shutil.rmtree(out, ignore_errors=True)
        summary = attention_maps(directory, out, num_examples=256, max_images=images, split="test")
        row["attention"] = {k: v for k, v in summary.items() if k not in ("workdir", "images")}
        row["images"] = [os.path.relpath(p, ROOT) for p in summary["images"]]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on a {os.cpu_count()}-core CPU by "
        "`python scripts/cocktail_party.py` (one seed each; test split, 256 examples).",
        "",
        "| experiment | config | test loss | token accuracy | sequence accuracy | "
        "attention on the cued speaker | baseline loss | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["test_metrics"]
        share = r.get("attention", {}).get("attention_on_cued_speaker")
        share = "" if share is None else f"{share:.1%}"
        lines.append(
            f"| {r['name']} | `{r['config']}` | {m['loss']:.4f} | {m['accuracy']:.1%} | "
            f"{m['sequence_accuracy']:.1%} | {share} | {r['baseline_loss']:.3f} | "
            f"{r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "cocktail_party"))
    parser.add_argument("--resume", action="store_true", help="reuse finished experiments")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    rows = []
    for experiment in EXPERIMENTS:
        rows.append(run(*experiment, args.workdir, args.resume))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    text = table(rows)
    images = [
        f"![{r['name']}]({os.path.relpath(p, 'docs')})" for r in rows for p in r.get("images", [])
    ]
    with open(os.path.join(DOCS, "cocktail_party.md"), "w") as f:
        f.write("# Encoder-decoder experiments: cocktail party, reverse, sort\n\n" + text)
        f.write("\n" + "\n\n".join(images) + "\n")
    with open(os.path.join(args.workdir, "cocktail_party.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
