"""Checkpoints with orbax-checkpoint's CheckpointManager.

Saves are synchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash leaves either the previous checkpoints or a finished new one.

Sharding-aware: every process takes part in a save, each writing the shards it holds, and a
restore lays each array out as the template's sharding says, so a state saved on one mesh
restores onto another (e.g. saved on 4 devices, restored on 1 or 2).
"""

from __future__ import annotations

import os

import jax
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
        """The state saved at `step` (default: the latest), shaped and sharded like `template`
        (a pytree of jax.Arrays or of jax.ShapeDtypeStructs with shardings)."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(_abstract, template)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError) as err:  # orbax names a shape or key, not the cause
            raise ValueError(
                f"checkpoint: the one at step {step} in {self.manager.directory} does not fit "
                "the model and optimiser this config builds (was it written with other "
                f"settings? use a fresh --workdir, or the run's own config). orbax said: {err}"
            ) from None

    def close(self) -> None:
        self.manager.close()


def _abstract(leaf):
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf
