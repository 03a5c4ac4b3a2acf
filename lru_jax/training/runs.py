"""A trained run read back from its workdir: its config, and its model with the parameters of
the latest checkpoint. The one way every tool (diagnose, attention_maps, scripts) loads a run.
"""

from __future__ import annotations

import json
import os

from lru_jax.training import autotune, record
from lru_jax.training import config as config_lib
from lru_jax.training.checkpoints import Checkpointer
from lru_jax.training.loop import build_task, one_device_state
from lru_jax.training.optim import make_optimizer


def read_config(workdir: str):
    """The config a run in `workdir` trains with (its config.json), in today's layout."""
    path = os.path.join(workdir, record.CONFIG_FILE)
    if not os.path.exists(path):
        raise record.WorkdirError(
            f"workdir: expected a training run with {record.CONFIG_FILE}, got {workdir!r}"
        )
    with open(path) as f:
        return config_lib.upgrade(json.load(f))  # runs saved before today's layout too


def load(config, workdir: str | None = None):
    """(model, task, state, step): the config's model and training state from the newest
    checkpoint in `workdir` that verifies (step > 0; see `checkpoints`), or freshly
    initialised (step 0). The config is the run's (`read_config`): its model and optimiser
    decide what the checkpoint holds. The model's "auto" scans choose from the run's scan
    table, as its training did."""
    config_lib.validate(config)
    task = build_task(config)
    config_lib.check_against_task(config, task.spec)
    scan_table = autotune.replayed_table(config, workdir)
    model = config_lib.build_model(config.model, task.spec, scan_table=scan_table)
    state = one_device_state(model, make_optimizer(config.train), task, config)
    directory = None if workdir is None else os.path.join(workdir, "checkpoints")
    if directory is None or not os.path.isdir(directory):
        return model, task, state, 0
    checkpointer = Checkpointer(directory, keep=0, writes=False)  # reads only
    try:
        step = checkpointer.latest_step()
        if step is not None:
            state = checkpointer.restore(state, step)
    finally:
        checkpointer.close()
    return model, task, state, step or 0
