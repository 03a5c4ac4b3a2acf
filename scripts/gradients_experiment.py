"""Vanishing and exploding gradients on the adding problem, rerun by one command:

    python scripts/gradients_experiment.py                 # about 20 min on 2 CPU cores
    python scripts/gradients_experiment.py --steps 100     # a quicker, rougher rerun
    python scripts/gradients_experiment.py --replot        # redraw from the saved runs

1. SimpleRNN, LSTM, GRU and LRU (one layer, width 32) on the adding problem at
   T ∈ {50, 200, 1000}: ‖∂h_T/∂h_t‖ against T - t at initialisation and after training, and
   the final test MSE against the 1/6 = 0.167 baseline of always answering 1.
2. Exploding gradients: a SimpleRNN whose recurrent matrix starts at `--gain` times an
   orthogonal matrix (chaotic tanh dynamics), trained with SGD (momentum 0.9) and with AdamW,
   each without and with global-norm clipping at 1.

Writes docs/gradients.md (tables) and docs/gradients_*.png; runs go to --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lru_jax.diagnose import diagnose_state, for_log_axis, load, pyplot  # noqa: E402
from lru_jax.training.checkpoints import Checkpointer  # noqa: E402
from lru_jax.training.loop import NonFiniteLossError, train_and_evaluate  # noqa: E402
from lru_jax.training.metrics import read_jsonl  # noqa: E402
from scripts.results import load_config  # noqa: E402

CELLS = ("simple_rnn", "lstm", "gru", "lru")
LENGTHS = (50, 200, 1000)
BASELINE = 1.0 / 6.0


def experiment_config(cell: str, seq_len: int, steps: int, extra: dict | None = None):
    overrides = {
        "task.seq_len": seq_len,
        "model.mixer": cell,
        "model.d_model": 32,
        "model.lru.d_state": 32,
        "model.num_layers": 1,
        "train.num_steps": steps,
        "train.warmup_steps": max(1, steps // 10),
        "train.log_every": 10,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.eval_batches": 8,
        **(extra or {}),
    }
    return load_config("adding.py", overrides)


def layer_summary(result: dict) -> dict:
    """The single layer's diagnostics, trimmed to what the plots and tables use."""
    ((_, layer),) = result["layers"].items()
    return {
        "jacobian_norm_by_distance": layer["jacobian_norm_by_distance"],
        "grad_norm_per_step": layer["grad_norm_per_step"],
        "spectrum": layer["spectrum"],
    }


def diagnose(config, workdir: str | None) -> dict:
    model, task, state, step = load(config, workdir)
    return layer_summary(diagnose_state(model, task, state.variables(), num_examples=4))


def train(config, directory: str) -> dict:
    """Trains; a non-finite loss ends the run and is reported, not raised."""
    start = time.perf_counter()
    try:
        final = train_and_evaluate(config, directory)
        test_mse, error = final["test"]["mse"], None
    except NonFiniteLossError as err:
        test_mse, error = float("nan"), str(err)
    records = read_jsonl(os.path.join(directory, "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    return {
        "test_mse": test_mse,
        "error": error,
        "wall_s": time.perf_counter() - start,
        "steps": [r["step"] for r in train],
        "loss": [r["loss"] for r in train],
        "grad_norm": [r["grad_norm"] for r in train],
    }


def run_cell(cell: str, seq_len: int, steps: int, workdir: str) -> dict:
    directory = os.path.join(workdir, f"{cell}-T{seq_len}")
    config = experiment_config(cell, seq_len, steps)
    at_init = diagnose(config, None)
    result = train(config, directory)
    result.update({"cell": cell, "seq_len": seq_len, "init": at_init})
    result["trained"] = diagnose(config, directory) if result["error"] is None else None
    return result


def scaled_start(config, directory: str, gain: float) -> None:
    """Seeds `directory` with a step-0 checkpoint whose recurrent matrices are multiplied by
    `gain`, so that train_and_evaluate starts (resumes) from that initialisation."""
    model, task, state, _ = load(config, None)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * gain if path[-1].key == "w_hh" else p, state.params
    )
    checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), 0)
    checkpointer.save(0, state.replace(params=params))
    checkpointer.close()


EXPLODING = (("sgd", 0.0), ("sgd", 1.0), ("adamw", 0.0), ("adamw", 1.0))  # optimiser, clip
EXPLODING_LR = {"sgd": 0.02, "adamw": 2e-3}


def run_exploding(seq_len: int, steps: int, gain: float, optimizer: str, clip: float, workdir):
    directory = os.path.join(workdir, f"exploding-{optimizer}-clip{clip:g}")
    extra = {
        "train.optimizer": optimizer,
        "train.learning_rate": EXPLODING_LR[optimizer],
        "train.grad_clip_norm": clip,
    }
    config = experiment_config("simple_rnn", seq_len, steps, extra)
    shutil.rmtree(directory, ignore_errors=True)
    scaled_start(config, directory, gain)
    at_init = diagnose(config, directory)  # the scaled step-0 checkpoint
    result = train(config, directory)
    result.update(
        {"optimizer": optimizer, "lr": EXPLODING_LR[optimizer], "clip": clip, "init": at_init}
    )
    if result["error"] is None:
        result["trained"] = diagnose(config, directory)
        _, _, state, _ = load(config, directory)
        result["max_abs_w_hh"] = float(np.abs(state.params["blocks_0"]["mixer"]["w_hh"]).max())
    return result


LEGEND_TITLE = "solid: after training, dashed: at initialisation (float32 underflow below 1e-38)"


def plot_distance(results: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(5 * len(LENGTHS), 4), squeeze=False)
    colours = dict(zip(CELLS, ("tab:red", "tab:blue", "tab:green", "tab:purple"), strict=True))
    for ax, seq_len in zip(axes[0], LENGTHS, strict=True):
        ax.set_title(f"T = {seq_len}")
        for r in (r for r in results if r["seq_len"] == seq_len):
            c = colours[r["cell"]]
            ax.semilogy(for_log_axis(r["init"]["jacobian_norm_by_distance"]), "--", color=c)
            if r["trained"] is not None:
                trained = for_log_axis(r["trained"]["jacobian_norm_by_distance"])
                ax.semilogy(trained, "-", color=c, label=r["cell"])
        ax.set(xlabel="distance T - t", ylabel="‖∂h_T/∂h_t‖₂", title=f"T = {seq_len}")
        ax.set_ylim(1e-30, 1e3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CELLS), title=LEGEND_TITLE)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite_or_cap(values) -> np.ndarray:
    """Overflowed (inf) norms drawn at float32's maximum instead of vanishing from the plot."""
    return np.nan_to_num(for_log_axis(values), nan=np.nan, posinf=3.4e38)


def exploding_label(r: dict) -> str:
    clip = f"clip {r['clip']:g}" if r["clip"] else "no clipping"
    return f"{'SGD' if r['optimizer'] == 'sgd' else 'AdamW'}, {clip}"


def plot_exploding(runs: list[dict], path: str) -> None:
    plt = pyplot()
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        style = "-" if r["clip"] else "--"
        left.semilogy(r["steps"], _finite_or_cap(r["grad_norm"]), style, label=exploding_label(r))
        mid.semilogy(r["steps"], _finite_or_cap(r["loss"]), style, label=exploding_label(r))
    right.semilogy(for_log_axis(runs[0]["init"]["jacobian_norm_by_distance"]), color="k")
    left.set(xlabel="step", ylabel="gradient norm before clipping", title="gradient norm")
    mid.axhline(BASELINE, color="grey", ls=":", label="baseline 0.167")
    mid.set(xlabel="step", ylabel="train MSE", title="loss (a line that stops: NaN)")
    right.set(xlabel="distance T - t", ylabel="‖∂h_T/∂h_t‖₂", title="at the large init")
    left.legend(fontsize=8)
    mid.legend(fontsize=8)
    fig.suptitle("10-step means; overflow (inf) drawn at 3.4e38")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def at(values, distance: int) -> float:
    return float(values[min(distance, len(values) - 1)])


def trained_columns(r: dict) -> str:
    if r.get("trained") is None:
        return " | | "
    radius = np.mean(r["trained"]["spectrum"]["spectral_radius"])
    distance10 = at(r["trained"]["jacobian_norm_by_distance"], 10)
    return f"{r['max_abs_w_hh']:.3g} | {radius:.3g} | {distance10:.2e}"


def markdown(results, exploding, settings: dict, total_s: float) -> str:
    lines = [
        "# Vanishing and exploding gradients",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python scripts/gradients_experiment.py "
        f"--steps {settings['steps']}` on a shared {os.cpu_count()}-core CPU, "
        f"jax {jax.__version__}: {total_s / 60:.1f} min in all. One recurrent layer of width 32 "
        f"(LRU state 32) in the residual block, batch 32, {settings['steps']} AdamW steps "
        "with global-norm clipping at 1, "
        "test MSE over 8 fresh batches. The baseline (always answer 1) has MSE 0.167.",
        "",
        "‖∂h_T/∂h_t‖₂ is the largest singular value of the layer's state Jacobian, geometric "
        "mean over 4 sequences; 0 means it underflowed float32. 'below 0.15?': beats the "
        "baseline by 10 %. Gradient norms are of the whole model, means over 10 steps.",
        "",
        "| cell | T | test MSE | below 0.15? | ‖∂h_T/∂h_{T-10}‖ init | ‖∂h_T/∂h_{T-T/2}‖ "
        "init | ‖∂h_T/∂h_{T-10}‖ trained | ‖∂h_T/∂h_{T-T/2}‖ trained | max grad norm | time |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        half = r["seq_len"] // 2
        init = r["init"]["jacobian_norm_by_distance"]
        trained = r["trained"]["jacobian_norm_by_distance"] if r["trained"] else [float("nan")]
        beats = "yes" if r["test_mse"] < 0.9 * BASELINE else "no"
        lines.append(
            f"| {r['cell']} | {r['seq_len']} | {r['test_mse']:.4f} | {beats} | "
            f"{at(init, 10):.2e} | {at(init, half):.2e} | {at(trained, 10):.2e} | "
            f"{at(trained, half):.2e} | {max(r['grad_norm']):.3g} | {r['wall_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        f"Exploding gradients: SimpleRNN at T = {settings['exploding_len']} with the recurrent "
        f"matrix started at {settings['gain']:g} x orthogonal, {settings['steps']} steps.",
        "",
        "| optimiser | lr | clipping | test MSE | median grad norm | max grad norm | "
        "max abs W_hh trained | spectral radius trained | ‖∂h_T/∂h_{T-10}‖ trained | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in exploding:
        clip = f"global norm {r['clip']:g}" if r["clip"] else "none"
        mse = f"{r['test_mse']:.4f}" if np.isfinite(r["test_mse"]) else "diverged"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {clip} | {mse} | {np.median(r['grad_norm']):.3g}"
            f" | {max(r['grad_norm']):.3g} | {trained_columns(r)} | {r['error'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def run_all(args, saved: dict | None) -> dict:
    """Runs the parts `args.part` names; the other part comes from `saved` (an earlier run)."""
    runs = dict(saved or {})
    runs.setdefault("settings", {})
    runs["settings"].update(
        {"steps": args.steps, "gain": args.gain, "exploding_len": args.exploding_len}
    )
    if args.part in ("all", "cells"):
        start = time.perf_counter()
        runs["cells"] = []
        for seq_len in map(int, args.lengths.split(",")):
            for cell in args.cells.split(","):
                r = run_cell(cell, seq_len, args.steps, args.workdir)
                runs["cells"].append(r)
                print(json.dumps({k: r[k] for k in ("cell", "seq_len", "test_mse", "wall_s")}))
        runs["cells_s"] = time.perf_counter() - start
    if args.part in ("all", "exploding"):
        start = time.perf_counter()
        runs["exploding"] = [
            run_exploding(args.exploding_len, args.steps, args.gain, opt, clip, args.workdir)
            for opt, clip in EXPLODING
        ]
        runs["exploding_s"] = time.perf_counter() - start
    return runs


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "gradients"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--gain", type=float, default=3.0, help="recurrent init scale")
    parser.add_argument("--exploding_len", type=int, default=200)
    parser.add_argument(
        "--replot", action="store_true", help="redraw docs from --workdir/gradients.json"
    )
    parser.add_argument(
        "--part",
        choices=("all", "cells", "exploding"),
        default="all",
        help="rerun only one part, keeping the other from --workdir/gradients.json",
    )
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--cells", default=",".join(CELLS))
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    saved = os.path.join(args.workdir, "gradients.json")
    previous = None
    if args.replot or args.part != "all":
        with open(saved) as f:
            previous = json.load(f)
    runs = previous if args.replot else run_all(args, previous)
    if not args.replot:
        os.makedirs(args.workdir, exist_ok=True)
        with open(saved, "w") as f:
            json.dump(runs, f)
    results, exploding = runs["cells"], runs["exploding"]
    os.makedirs(args.docs, exist_ok=True)
    plot_distance(results, os.path.join(args.docs, "gradients_distance.png"))
    plot_exploding(exploding, os.path.join(args.docs, "gradients_exploding.png"))
    text = markdown(results, exploding, runs["settings"], runs["cells_s"] + runs["exploding_s"])
    with open(os.path.join(args.docs, "gradients.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
