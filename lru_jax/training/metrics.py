"""Metrics to a JSONL file (one record per line), TensorBoard event files and, for a run that
asks for it (`train.wandb`), Weights & Biases."""

from __future__ import annotations

import json
import os
import sys

WANDB_ID = "wandb_id"  # the workdir's file holding the id of its wandb run


class MetricsWriter:
    """Writes `{"step", "split", **metrics}` records.

    On resume from step s, records after s (written by the interrupted run past its last
    checkpoint) are dropped from the JSONL file and TensorBoard purges them too, so the logs
    read as one uninterrupted run.

    With `wandb_project`, the same metrics, named and stepped as in TensorBoard
    ("train/loss" at step s), and `config` (a dict) also go to a wandb run (`wandb_run`).
    """

    def __init__(
        self,
        workdir: str,
        resume_step: int | None = None,
        *,
        wandb_project: str = "",
        config: dict | None = None,
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            keep = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.tensorboard = _summary_writer(os.path.join(workdir, "tensorboard"), resume_step)
        self.wandb = None
        if wandb_project:
            self.wandb = wandb_run(workdir, wandb_project, config or {}, resume_step is not None)

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))
        if self.wandb is not None:
            named = {f"{split}/{name}": float(value) for name, value in metrics.items()}
            self.wandb.log(named, step=int(step))

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _summary_writer(folder: str, purge_step: int | None):
    """tensorboardX's writer. It imports torch, if installed, only to accept torch tensors; we
    log floats, so torch is kept from loading here (seconds of start-up) unless already loaded."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # an ImportError for tensorboardX's optional import
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter(folder, purge_step=purge_step)


def wandb_run(workdir: str, project: str, config: dict, resume: bool):
    """A wandb run in `project` named after the workdir, with `config`, its files under
    workdir/wandb. A resumed run continues the wandb run it started (the id in
    workdir/wandb_id); wandb drops the steps the interrupted run logged past its checkpoint.

    wandb is imported here only, for runs that ask for it. Its own environment variables
    apply: WANDB_MODE=offline logs without an account (`wandb sync` uploads it later).
    """
    import wandb

    id_path = os.path.join(workdir, WANDB_ID)
    run_id = None
    if resume and os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume="allow",
        dir=workdir,
        config=config,
        allow_val_change=True,
    )
    with open(id_path, "w") as f:
        f.write(run.id + "\n")
    return run


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
