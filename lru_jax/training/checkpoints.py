"""Checkpoints with orbax-checkpoint's CheckpointManager.

Saves are synchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash leaves either the previous checkpoints or a finished new one.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic saves into `directory`, keeping the newest `keep` (0 keeps all)."""

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=False, create=True
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """The state saved at `step` (default: the latest), shaped like `template`."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore(template))

    def close(self) -> None:
        self.manager.close()
