"""Train a model: `python train.py --config=configs/<name>.py --config.<key>=<value> --workdir=DIR`.

With no flags it runs configs/default.py (character-level joke generation with an LRU) in a
fresh directory under runs/. A --workdir that holds a checkpoint resumes from it.

Several hosts: start the same command on every host with --distributed (TPU pods and SLURM
find each other), or with --coordinator_address=HOST:PORT --num_processes=N --process_id=I,
and a shared --workdir. `config.sharding` says how the devices are used (docs/scaling.md).
"""

import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lru_jax.training.config import MOVED_MODEL_KEYS
from lru_jax.training.loop import NonFiniteLossError, train_and_evaluate


def refuse_moved_keys(argv) -> None:
    """Exits with one line for an override of a model key that moved to a group."""
    for arg in argv[1:]:
        key = arg.split("=", 1)[0].removeprefix("--config.model.")
        if arg.startswith("--config.model.") and key in MOVED_MODEL_KEYS:
            sys.exit(f"error: --config.model.{key}: renamed --config.model.{MOVED_MODEL_KEYS[key]}")


if __name__ == "__main__":  # before the config flag, which applies the overrides it is given
    refuse_moved_keys(sys.argv)

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(HERE, "configs", "default.py"),
    "Experiment config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics); default: runs/<config>-<time>."
)

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Run as one of several processes: call jax.distributed.initialize() first (it finds the "
    "others on TPU pods and under SLURM; elsewhere give the three flags below).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (implies --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes in all (implies --distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (implies --distributed)."
)


def initialize_distributed() -> bool:
    """Joins the other processes if asked to (before JAX touches any device)."""
    given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _DISTRIBUTED.value and all(v is None for v in given):
        return False
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
    if os.environ.get("LRU_JAX_SCAN_CHOICES"):  # the variable earlier versions read
        raise app.UsageError(
            "LRU_JAX_SCAN_CHOICES: no longer read; pass the table as "
            "--config.train.scan_choices=PATH instead"
        )
    workdir = _WORKDIR.value
    if initialize_distributed() and workdir is None:
        raise app.UsageError("--workdir: required with several processes (one shared directory)")
    if workdir is None:
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        print(f"workdir: {workdir}")
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, TypeError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
