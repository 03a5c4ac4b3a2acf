"""A trained run read back from its workdir: its config, and its model with the parameters of
the latest checkpoint. The one way every tool (diagnose, attention_maps, scripts) loads a run.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from lru_jax.training import autotune
from lru_jax.training import config as config_lib
from lru_jax.training.loop import build_task, one_device_state
from lru_jax.training.optim import make_optimizer


def read_config(workdir: str):
    """The config a run in `workdir` was trained with (its config.json), in today's layout."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir: expected a training run with config.json, got {workdir!r}")
    with open(path) as f:
        return config_lib.upgrade(json.load(f))  # runs saved before today's layout too


def load(config, workdir: str | None = None):
    """(model, task, state, step): the config's model with the parameters (and BatchNorm
    statistics) of the latest checkpoint in `workdir` (step > 0), or freshly initialised
    (step 0). Only parameters are restored, so the optimiser settings need not match the
    run's. The model's "auto" scans choose from the run's scan table, as its training did."""
    config_lib.validate(config)
    task = build_task(config)
    config_lib.check_against_task(config, task.spec)
    scan_table = autotune.replayed_table(config, workdir)
    model = config_lib.build_model(config.model, task.spec, scan_table=scan_table)
    state = one_device_state(model, make_optimizer(config.train), task, config)
    directory = None if workdir is None else os.path.abspath(os.path.join(workdir, "checkpoints"))
    if directory is None or not os.path.isdir(directory):
        return model, task, state, 0
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    if step is not None:
        template = {"params": state.params, "batch_stats": state.batch_stats}
        restore = ocp.args.PyTreeRestore(item=template, partial_restore=True)
        try:
            restored = manager.restore(step, args=restore)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"workdir: the checkpoint at step {step} in {directory} does not fit the "
                f"config's model (pass the run's config and model overrides): {err}"
            ) from None
        state = state.replace(**restored)
    manager.close()
    return model, task, state, step or 0
