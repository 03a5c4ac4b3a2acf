"""Gradient-flow diagnostics of a fresh or trained model, as JSON and PNG plots.

    python -m lru_jax.diagnose --config=configs/adding.py --config.task.seq_len=200 --out=DIR
    python -m lru_jax.diagnose --config=configs/adding.py --workdir=runs/x --out=DIR

With --workdir holding a checkpoint (from train.py), the trained parameters are restored (give
the run's config and model overrides; the optimiser settings do not matter); otherwise the model
is freshly initialised exactly as training would start. Writes to --out:

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
import sys

import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, diagnostics
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


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flag = flags.FLAGS
    try:
        model, task, state, step = load(_CONFIG.value, flag.workdir)
        result = diagnose_state(
            model,
            task,
            state.variables(),
            batch_size=flag.batch_size,
            num_examples=flag.num_examples,
            spectrum_every=flag.spectrum_every,
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result["step"] = step
    out = flag.out or os.path.join(flag.workdir or "runs", "diagnostics")
    for path in write_outputs(result, out, flag.workdir):
        print(path)
    print(f"diagnosed the model at step {step} ({'trained' if step else 'fresh'})")
    return 0


_CONFIG = None


def _define_flags():
    global _CONFIG
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "Run directory whose latest checkpoint to restore.")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/diagnostics).")
    flags.DEFINE_integer("batch_size", 16, "Sequences in the diagnosed batch.")
    flags.DEFINE_integer("num_examples", 4, "Sequences used for the Jacobian diagnostics.")
    flags.DEFINE_integer("spectrum_every", 10, "One-step spectra at every this many steps.")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from absl import app, logging

    _define_flags()
    logging.set_verbosity(logging.ERROR)  # orbax warns about the optimiser state it skips
    app.run(main)
