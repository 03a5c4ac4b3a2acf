"""Gradient-flow diagnostics of a fresh or trained model, as JSON and PNG plots.

    python -m lru_jax.diagnose --config=configs/adding.py --config.task.seq_len=200 --out=DIR
    python -m lru_jax.diagnose --workdir=runs/x --out=DIR [--config.task.seq_len=400]

With --workdir (a run of train.py) the run's own config.json is read and the parameters of its
newest checkpoint that verifies are restored; --config.KEY=VALUE may change its task (e.g. a
longer seq_len) but not its model. With --config instead, the model is freshly initialised
exactly as training would start. Exit codes and errors as train.py's
(lru_jax/training/commands.py). Writes to --out:

  diagnostics.json            everything below, per recurrent layer
  grad_per_step.png           ‖∂L/∂h_t‖ against t (batch mean)
  jacobian_by_distance.png    ‖∂h_T/∂h_t‖₂ against T - t (geometric mean over examples)
  spectrum.png                spectral radius of ∂h_t/∂h_{t-1} at visited states (RNN cells)
                              or |λ| and phase of the eigenvalues (LRU)
  grad_norms_training.png     per-parameter-group gradient norms during training (--workdir
                              with metrics.jsonl only)
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, diagnostics
from lru_jax.training import commands
from lru_jax.training.metrics import read_jsonl
from lru_jax.training.runs import load
from lru_jax.training.steps import loss_sums


def diagnose_state(
    model,
    task,
    variables,
    *,
    batch_size: int = 16,
    num_examples: int = 4,
    spectrum_every: int = 10,
    split: str = "valid",
) -> dict:
    """`diagnostics.model_diagnostics` on batch 0 of `split`, with the task's training loss."""
    _checks.positive_int("batch_size", batch_size)
    if num_examples > batch_size:
        raise ValueError(
            f"num_examples: expected at most batch_size ({batch_size}), got {num_examples}"
        )
    batch = {k: jnp.asarray(v) for k, v in task.batch(split, 0, batch_size).items()}

    def loss_fn(outputs):
        sums = loss_sums(task.spec, outputs, batch)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)

    result = diagnostics.model_diagnostics(
        model,
        variables,
        batch["inputs"],
        loss_fn,
        batch.get("lengths"),
        num_examples=num_examples,
        spectrum_every=spectrum_every,
    )
    result.update({"batch_size": batch_size, "num_examples": num_examples, "split": split})
    return result


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when first plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def for_log_axis(values) -> np.ndarray:
    """Values for a log axis: zeros (underflow) drawn at the float64 floor, not dropped."""
    return np.maximum(np.asarray(values, np.float64), 1e-300)


def plot_grad_per_step(result: dict, path: str, title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, layer in result["layers"].items():
        ax.semilogy(for_log_axis(layer["grad_norm_per_step"]), label=f"{name} ({layer['kind']})")
    ax.set(xlabel="time step t", ylabel="‖∂L/∂h_t‖ (batch mean)", title=title or "∂L/∂h_t")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_jacobian_by_distance(result: dict, path: str, title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, layer in result["layers"].items():
        ax.semilogy(
            for_log_axis(layer["jacobian_norm_by_distance"]), label=f"{name} ({layer['kind']})"
        )
    ax.set(xlabel="distance T - t", ylabel="‖∂h_T/∂h_t‖₂", title=title or "∂h_T/∂h_t")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectrum(result: dict, path: str) -> None:
    plt = pyplot()
    layers = result["layers"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(8, 2.8 * len(layers)), squeeze=False)
    for (name, layer), (left, right) in zip(layers.items(), axes, strict=True):
        s = layer["spectrum"]
        if layer["kind"] == "lru":
            left.hist(s["abs"], bins=30)
            left.set(xlabel="|λ|", ylabel="count", title=f"{name}: |λ|")
            right.hist(s["phase"], bins=30)
            right.set(xlabel="arg λ (radians)", title=f"{name}: phase")
        else:
            left.hist(np.ravel(s["spectral_radius"]), bins=30)
            left.set(xlabel="spectral radius of ∂h_t/∂h_{t-1}", ylabel="count", title=name)
            right.hist(np.ravel(s["spectral_norm"]), bins=30)
            right.set(xlabel="‖∂h_t/∂h_{t-1}‖₂", title=f"{name} ({layer['kind']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_grad_norms(records: list[dict], path: str) -> bool:
    """Gradient norms per parameter group against step; False if the log has none."""
    train = [r for r in records if r["split"] == "train" and "grad_norm" in r]
    if not train:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = ["grad_norm"] + sorted({k for r in train for k in r if k.startswith("grad_norm/")})
    for key in keys:
        rows = [r for r in train if key in r]
        ax.semilogy([r["step"] for r in rows], for_log_axis([r[key] for r in rows]), label=key)
    ax.set(xlabel="step", ylabel="gradient norm (mean over the log interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: str, workdir: str | None = None) -> list[str]:
    """Writes diagnostics.json and the PNGs into `out`; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, n) for n in ("diagnostics.json", "grad_per_step.png")]
    with open(paths[0], "w") as f:
        json.dump(result, f)
    plot_grad_per_step(result, paths[1])
    paths.append(os.path.join(out, "jacobian_by_distance.png"))
    plot_jacobian_by_distance(result, paths[-1])
    paths.append(os.path.join(out, "spectrum.png"))
    plot_spectrum(result, paths[-1])
    metrics = None if workdir is None else os.path.join(workdir, "metrics.jsonl")
    if metrics is not None and os.path.exists(metrics):
        path = os.path.join(out, "grad_norms_training.png")
        if plot_training_grad_norms(read_jsonl(metrics), path):
            paths.append(path)
    return paths


def diagnose(args, overrides) -> None:
    """The command (`commands.run` calls it): load, diagnose, write, report."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax reports every file it reads
    config = commands.run_config(args.config, args.workdir, overrides)
    model, task, state, step = load(config, args.workdir)
    result = diagnose_state(
        model,
        task,
        state.variables(),
        batch_size=args.batch_size,
        num_examples=args.num_examples,
        spectrum_every=args.spectrum_every,
    )
    result["step"] = step
    out = args.out or os.path.join(args.workdir or "runs", "diagnostics")
    for path in write_outputs(result, out, args.workdir):
        print(path)
    print(f"diagnosed the model at step {step} ({'trained' if step else 'fresh'})")


def parser() -> commands.Parser:
    p = commands.Parser(prog="python -m lru_jax.diagnose", description=__doc__.split("\n\n")[0])
    commands.add_config_flag(
        p, None, "config file of a fresh model (not with --workdir, whose config.json is read)"
    )
    p.add_argument("--workdir", help="a training run whose latest checkpoint to diagnose")
    p.add_argument("--out", help="output directory (default: <workdir>/diagnostics)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences in the diagnosed batch")
    p.add_argument("--num_examples", type=int, default=4, help="sequences for the Jacobians")
    p.add_argument("--spectrum_every", type=int, default=10, help="spectra every this many steps")
    return p


def main(argv=None) -> int:
    """Diagnoses as `argv` (default: the command line) says; returns the exit code."""
    return commands.run(diagnose, parser(), argv)


if __name__ == "__main__":
    commands.exit_with(diagnose, parser())
