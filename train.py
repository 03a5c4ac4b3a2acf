"""Train a model: `python train.py --config=configs/<name>.py --config.<key>=<value> --workdir=DIR`.

With no flags it runs configs/default.py (character-level joke generation with an LRU) in a
fresh directory under runs/. A --workdir that holds a checkpoint resumes from it.

Several hosts: start the same command on every host with --distributed (TPU pods and SLURM
find each other), or with --coordinator_address=HOST:PORT --num_processes=N --process_id=I,
and a shared --workdir. `config.sharding` says how the devices are used (docs/scaling.md).

Exit codes: 0 done, 2 a usage error (a flag, config key or value, or path), 1 a failure while
training (a damaged checkpoint with train.on_damaged_checkpoint='stop', a non-finite loss);
either is one line on stderr (lru_jax/training/commands.py).
"""

import os
import time

import jax
from absl import logging

from lru_jax.training import commands
from lru_jax.training.loop import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def parser() -> commands.Parser:
    p = commands.Parser(prog="train.py", description=__doc__.split("\n\n")[0])
    commands.add_config_flag(p, os.path.join(HERE, "configs", "default.py"))
    p.add_argument(
        "--workdir", help="run directory (checkpoints, metrics); default: runs/<config>-<time>"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run as one of several processes: call jax.distributed.initialize() first (it "
        "finds the others on TPU pods and under SLURM; elsewhere give the three flags below)",
    )
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (implies --distributed)")
    p.add_argument("--num_processes", type=int, help="processes in all (implies --distributed)")
    p.add_argument("--process_id", type=int, help="this process's index (implies --distributed)")
    return p


def initialize_distributed(args) -> bool:
    """Joins the other processes if asked to (before JAX touches any device)."""
    given = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in given):
        return False
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    return True


def train(args, overrides) -> None:
    """The tool `commands.run` calls: config, workdir, then training."""
    if os.environ.get("LRU_JAX_SCAN_CHOICES"):  # the variable earlier versions read
        raise commands.UsageError(
            "LRU_JAX_SCAN_CHOICES: no longer read; pass the table as "
            "--config.train.scan_choices=PATH instead"
        )
    config = commands.config_from_file(args.config, overrides)
    logging.set_verbosity(logging.ERROR)  # orbax reports every file it reads and writes
    workdir = args.workdir
    if initialize_distributed(args) and workdir is None:
        raise commands.UsageError("--workdir: required with several processes (one shared one)")
    if workdir is None:
        name = os.path.splitext(os.path.basename(args.config))[0]
        workdir = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        print(f"workdir: {workdir}")
    train_and_evaluate(config, workdir)


def main(argv=None) -> int:
    """Trains as `argv` (default: the command line) says; returns the exit code."""
    return commands.run(train, parser(), argv)


if __name__ == "__main__":
    commands.exit_with(train, parser())
