"""Attention heatmaps of a trained encoder-decoder: what each output step read.

    python -m lru_jax.attention_maps --workdir=runs/reverse [--out=DIR] [--max_images=4]

Loads the run's config (its config.json) and newest checkpoint that verifies, decodes
`num_examples` held-out examples greedily step by step and writes a PNG for each of the first
`max_images` (rows: output steps, columns: source steps, colour: attention weight; for hard
attention the distribution its positions are drawn from, whose argmax it reads at evaluation)
into `out` (default: WORKDIR/attention). Exit codes and errors as train.py's
(lru_jax/training/commands.py).

A task can add to both (the cocktail party does: each source column tinted by the speaker who
really said it, and the share of attention on the cued speaker in `summary.json`):
`task.source_annotations(batch)` gives per example a colour per source step and a caption,
`task.attention_summary(weights, batch)` extra numbers for the summary.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lru_jax import models  # noqa: E402
from lru_jax.tasks.seq2seq import BOS, EOS, NUM_SPECIAL, PAD  # noqa: E402
from lru_jax.training import commands, record, runs  # noqa: E402


def load_run(workdir: str):
    """(config, task, model, variables) of the latest checkpoint of a seq2seq run in `workdir`
    (the parameter average if the run kept one)."""
    config = runs.read_config(workdir)
    model, task, state, step = runs.load(config, workdir)
    if task.spec.kind != "seq2seq":
        raise record.WorkdirError(
            f"workdir: expected a run of a seq2seq task (an encoder-decoder), got the "
            f"{task.spec.kind} task {task.spec.name!r}"
        )
    if step == 0:
        raise record.WorkdirError(f"workdir: expected a run with a checkpoint, got {workdir!r}")
    return config, task, model, jax.device_get(state.for_evaluation().variables())


def token_label(token: int, num_cues: int = 0) -> str:
    """A short name for a token of the seq2seq layout: "·" PAD, "<" BOS, ">" EOS, cues
    "c0".., symbols numbered from 0."""
    names = {PAD: "·", BOS: "<", EOS: ">"}
    if token in names:
        return names[token]
    if token < NUM_SPECIAL + num_cues:
        return f"c{token - NUM_SPECIAL}"
    return str(token - NUM_SPECIAL - num_cues)


def plot_example(path, weights, source, output, colours=None, num_cues=0, title=""):
    """Writes one heatmap: weights [T_out, S]; source int [S]; output int [T_out];
    colours: None, or a colour name (or None) per source step to tint its column and tick;
    num_cues: how many cue tokens the vocabulary has (for the tick labels)."""
    fig, ax = plt.subplots(figsize=(0.3 * len(source) + 1.5, 0.3 * len(output) + 1.2))
    ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source)), [token_label(int(t), num_cues) for t in source], fontsize=7)
    ax.set_yticks(range(len(output)), [token_label(int(t), num_cues) for t in output], fontsize=7)
    ax.set_xlabel("source step (input token)")
    ax.set_ylabel("output step (decoded token)")
    for step, colour in enumerate(colours or []):
        if colour is not None:
            ax.get_xticklabels()[step].set_color(colour)
            ax.axvspan(step - 0.5, step + 0.5, color=colour, alpha=0.12, lw=0)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_maps(
    workdir: str,
    out: str | None = None,
    num_examples: int = 64,
    max_images: int = 4,
    split: str = "test",
):
    """Decodes `num_examples` examples of `split` and writes heatmaps of the first
    `max_images` into `out`.

    Returns the summary written to out/summary.json: the decoded sequences' exact-match rate
    and the task's `attention_summary`, if it has one.
    """
    config, task, model, variables = load_run(workdir)
    if config.model.seq2seq.attention == "none":
        raise record.WorkdirError(
            "workdir: the model has no attention (model.seq2seq.attention 'none')"
        )
    out = out or os.path.join(workdir, "attention")
    os.makedirs(out, exist_ok=True)
    batch = task.batch(split, 0, num_examples)
    spec = task.spec
    tokens, weights = models.greedy_decode(
        model,
        variables,
        batch["inputs"],
        batch["lengths"],
        spec.target_len,
        **spec.special_tokens._asdict(),
    )
    exact = np.all((tokens == batch["targets"]) | (batch["mask"] == 0), axis=1)
    summary = {"workdir": workdir, "split": split, "examples": num_examples}
    summary["exact_match"] = float(exact.mean())
    if hasattr(task, "attention_summary"):
        summary.update(task.attention_summary(weights, batch))
    annotations = getattr(task, "source_annotations", lambda _: None)(batch)
    paths = []
    for i in range(min(num_examples, max_images)):
        length = int(batch["lengths"][i])
        shown = int(np.argmax(tokens[i] == EOS)) + 1 if (tokens[i] == EOS).any() else None
        path = os.path.join(out, f"{spec.name}_{i}.png")
        colours, caption = (None, "") if annotations is None else annotations[i]
        title = f"{spec.name} {config.model.seq2seq.attention} attention, example {i}"
        title += ("" if exact[i] else " (decoded wrongly)") + (f" ({caption})" if caption else "")
        plot_example(
            path,
            weights[i, :shown, :length],
            batch["inputs"][i, :length],
            tokens[i, :shown],
            None if colours is None else colours[:length],
            getattr(task, "num_sources", 0),
            title=title,
        )
        paths.append(path)
    summary["images"] = paths
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def parser() -> commands.Parser:
    p = commands.Parser(
        prog="python -m lru_jax.attention_maps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="a training run of a seq2seq task")
    p.add_argument("--out", default=None, help="where the PNGs go (WORKDIR/attention)")
    p.add_argument("--num_examples", type=int, default=64, help="decoded for the summary")
    p.add_argument("--max_images", type=int, default=4, help="PNGs written")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    return p


def command(args, overrides) -> None:
    """The command (`commands.run` calls it): the maps of `args.workdir`, summary printed."""
    summary = attention_maps(args.workdir, args.out, args.num_examples, args.max_images, args.split)
    print(json.dumps(summary, indent=2))


def main(argv=None) -> int:
    """Writes the maps `argv` (default: the command line) asks for; returns the exit code."""
    return commands.run(command, parser(), argv, overrides=False)


if __name__ == "__main__":
    commands.exit_with(command, parser(), overrides=False)
