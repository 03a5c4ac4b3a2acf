"""Metrics to a JSONL file (one record per line) and TensorBoard event files."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes `{"step", "split", **metrics}` records.

    On resume from step s, records after s (written by the interrupted run past its last
    checkpoint) are dropped from the JSONL file and TensorBoard purges them too, so the logs
    read as one uninterrupted run.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            keep = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.tensorboard = SummaryWriter(
            os.path.join(workdir, "tensorboard"), purge_step=resume_step
        )

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        self.tensorboard.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
