"""Train a model: `python train.py --config=configs/<name>.py --config.<key>=<value> --workdir=DIR`.

With no flags it runs configs/default.py (character-level joke generation with an LRU) in a
fresh directory under runs/. A --workdir that holds a checkpoint resumes from it.
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from lru_jax.training.loop import NonFiniteLossError, train_and_evaluate

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
    workdir = _WORKDIR.value
    if workdir is None:
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"workdir: {workdir}")
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, TypeError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
