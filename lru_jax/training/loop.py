"""The training loop, top to bottom: config -> task -> model -> state -> steps -> logs.

Everything random is a function of (seed, step): the batch at step s is `task.batch("train",
s, ...)` (during a `train.length_curriculum` stage, that of the task at the stage's seq_len) and
the dropout key is `fold_in(key, s)`. So a run resumed from a checkpoint repeats
exactly what an uninterrupted run would have done. A resume continues from the newest
checkpoint that verifies (`checkpoints`), with a config the run's record accepts (`record`).

On several devices or hosts (see lru_jax/training/sharding.py) the same loop runs in every
process on a mesh from `config.sharding`: each process supplies its rows of every global batch,
all take part in every step and checkpoint, and only process 0 writes logs and files.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import models, scan_choices, tasks
from lru_jax import nn as lnn
from lru_jax.training import autotune, record, sharding
from lru_jax.training import config as config_lib
from lru_jax.training.checkpoints import Checkpointer
from lru_jax.training.metrics import MetricsWriter
from lru_jax.training.optim import make_optimizer, schedule
from lru_jax.training.progress import Progress
from lru_jax.training.state import TrainState
from lru_jax.training.steps import (
    make_eval_step,
    make_statistics_step,
    make_train_step,
    model_inputs,
    recalibrated,
    summarise,
)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def build_task(config, **overrides):
    """The task `config.task` names (with `overrides` of its arguments); its argument errors
    are ConfigErrors naming the key ("config.task.seq_len: expected a positive int, got -3")."""
    kwargs = {k: v for k, v in config.task.items() if k != "name"} | overrides
    try:
        return tasks.get_task(config.task.name, seed=config.seed, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        argument = message.split(":", 1)[0]
        where = f"config.task.{message}" if argument.isidentifier() else f"config.task: {message}"
        raise config_lib.ConfigError(where) from None


def curriculum_stages(config) -> list[tuple[int, object]]:
    """(the step the stage ends before, its task) for each stage of `train.length_curriculum`."""
    stages, end = [], 0
    for seq_len, steps in config_lib.length_curriculum(config):
        end += steps
        stages.append((end, build_task(config, seq_len=seq_len)))
    return stages


def train_task_at(stages, task, step: int):
    """The task training draws step `step`'s batch from: its curriculum stage's, else `task`."""
    return next((stage for end, stage in stages if step < end), task)


def _creator(model, tx, task, config):
    """`create(key) -> TrainState` for the model and optimiser."""
    batch = task.batch("train", 0, config.train.batch_size)

    def create(key):
        variables = model.init(key, *model_inputs(batch))
        return TrainState.create(variables, tx)

    return create


def init_state(model, tx, task, config, layout: sharding.Layout):
    """(state, its shardings): the state created directly in the layout's shardings."""
    create = _creator(model, tx, task, config)
    return sharding.init_state(create, jax.random.key(config.seed), layout)


def one_device_state(model, tx, task, config):
    """The initial state on this process's first device, for tools that load a run's
    checkpoint (diagnose, attention maps, the bench)."""
    devices = jax.local_devices()[:1]
    layout = sharding.layout_from_config(config, time_keys(task.spec), devices)
    return init_state(model, tx, task, config, layout)[0]


def abstract_state(model, tx, task, config, layout: sharding.Layout):
    """The state's shapes, dtypes and layout shardings (jax.ShapeDtypeStruct leaves), without
    computing it: a restore target for `Checkpointer.restore`."""
    create = _creator(model, tx, task, config)
    return sharding.abstract_state(create, jax.random.key(config.seed), layout)


def time_keys(spec) -> tuple[str, ...]:
    """The batch arrays with a time axis (at position 1)."""
    return ("inputs", "targets", "mask", "resets") if spec.kind == "per_step" else ("inputs",)


def evaluate(eval_step, state, task, split: str, batch_size: int, num_batches: int, put=None):
    """Metrics over `num_batches` batches of `split` (0: the whole split once, if finite).

    `put` places each numpy batch on devices (e.g. `Layout.put_batch`); default: as is.
    """
    put = put or (lambda batch: batch)
    n = task.num_examples(split) if num_batches == 0 else None
    if num_batches == 0:
        num_batches = 1 if n is None else math.ceil(n / batch_size)
    total = None
    for index in range(num_batches):
        batch = task.batch(split, index, batch_size)
        if n is not None and index == num_batches - 1:  # the split's tail, without wrapping
            remainder = n - index * batch_size
            batch = {name: array[:remainder] for name, array in batch.items()}
        sums = eval_step(state, put(batch))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {k: float(v) for k, v in summarise(task.spec, total).items()}


class AheadOfTime:
    """A jitted step compiled ahead of time for each batch shape it meets (one, or one per
    `train.length_curriculum` stage), the seconds spent compiling kept apart in `seconds`."""

    def __init__(self, step):
        self.step, self.programs, self.seconds = step, {}, 0.0

    def program(self, state, batch):
        """The compiled program for `batch`'s shapes (compiled now if new)."""
        key = tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(batch))
        if key not in self.programs:
            start = time.perf_counter()
            self.programs[key] = self.step.lower(state, batch).compile()
            self.seconds += time.perf_counter() - start
        return self.programs[key]

    def __call__(self, state, batch):
        return self.program(state, batch)(state, batch)


class _PendingMetrics:
    """Train metrics kept on device until a log point, then checked and averaged at once."""

    def __init__(self):
        self.items: list[tuple[int, dict]] = []

    def add(self, step: int, metrics) -> None:
        self.items.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        if not self.items:
            return None
        steps = [s for s, _ in self.items]
        values = jax.device_get([m for _, m in self.items])
        self.items = []
        for step, m in zip(steps, values, strict=True):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(f"non-finite loss {m['loss']} at step {step}")
        return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains as `config` says, in `workdir` (resuming from its latest checkpoint).

    Returns the final metrics: {"valid": {...}, "test": {...}, "steps": the step the model
    reached, "train_time_s": t (compilation apart), "compile_time_s": c}. Runs on the devices
    `config.sharding` asks for (all of them by default).
    """
    config_lib.validate(config)
    task = build_task(config)
    config_lib.check_against_task(config, task.spec)
    layout = sharding.layout_from_config(config, time_keys(task.spec))
    with jax.set_mesh(layout.mesh):  # the context of the sequence-parallel scans
        return _train_and_evaluate(config, workdir, task, layout)


def _train_and_evaluate(config, workdir: str, task, layout: sharding.Layout) -> dict:
    spec = task.spec
    tc = config.train
    main = jax.process_index() == 0  # the one process that writes logs and files
    record.prepare_workdir(workdir)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        tc.keep_checkpoints,
        tc.get("on_damaged_checkpoint", "fallback"),
        writes=main,
    )
    try:
        # the resume's checks first: a refused one compiles nothing
        start = checkpointer.latest_step()
        changes = None if start is None else record.check_resume(workdir, config, start)
        data_devices = layout.mesh.shape[sharding.DATA]
        scan_setting = tc.get("scan_choices", "auto")
        table, measure_scans = autotune.run_table(scan_setting, workdir, data_devices)
        model = config_lib.build_model(config.model, spec, layout.sequence_axis, table)
        batch_size = sharding.global_batch_size(tc, layout.mesh)
        tx = make_optimizer(tc)
        state, state_shardings = init_state(model, tx, task, config, layout)
        if start is not None:
            state = checkpointer.restore(state, start)
    except BaseException:
        checkpointer.close()
        raise
    if main and start is not None:
        print(f"Resuming from the checkpoint at step {start} in {workdir}")
    if main:  # after the restore: a refused resume leaves the run's record as it was
        record.write(workdir, config, start or 0, changes)
    writer = _NoWriter()
    if main:
        tracking = {"wandb_project": tc.get("wandb", ""), "config": config.to_dict()}
        writer = MetricsWriter(workdir, resume_step=start, **tracking)
    start = start or 0
    if start >= tc.num_steps and main:
        print(f"the checkpoint at step {start} is at or past train.num_steps={tc.num_steps}")

    stages = curriculum_stages(config)

    def next_batch(split, index):
        source = train_task_at(stages, task, index) if split == "train" else task
        return layout.put_batch(source.batch(split, index, batch_size))

    batch_shardings = layout.batch_shardings(task.batch("train", 0, batch_size))

    def steps(model):  # (train step, eval step) of `model`
        train_step = make_train_step(
            model,
            tx,
            spec,
            seed=config.seed + 1,
            tbptt_length=tc.tbptt_length,
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, layout.replicated),
        )
        return train_step, make_eval_step(model, spec)

    train_step, compiled_eval = steps(model)
    if measure_scans:  # at the shapes the first train step and evaluation scan
        asked = scan_choices.queries(train_step, state, next_batch("train", start))
        asked |= scan_choices.queries(compiled_eval, state, next_batch("valid", 0))
        table = autotune.measure_run(asked, workdir, main, layout.mesh)
        if table is not None:
            model = model.clone(scan_table=table)
            train_step, compiled_eval = steps(model)

    # compiled before the clock starts, and each curriculum stage's shape apart from the
    # clock: the logged tokens/s and the bar's ETA are the training's, not the compiler's
    train_step = AheadOfTime(train_step)
    if start < tc.num_steps:
        train_step.program(state, next_batch("train", start))

    lr = schedule(tc)
    pending = _PendingMetrics()
    progress = Progress(start, tc.num_steps, disable=not main)

    eval_step = AheadOfTime(compiled_eval)  # its compilation kept off the progress clock

    statistics_step = make_statistics_step(model, config.seed + 2)
    evaluated_at = {}  # {step: the state evaluation reads at that step}

    def for_evaluation(state, step: int):
        """The parameter average (with train.ema_decay), BatchNorm's averages re-estimated
        for it as the mean statistics of the training batches of the last ema_bn_batches
        steps."""
        if step not in evaluated_at:
            evaluated = state.for_evaluation()
            if evaluated is not state and lnn.BATCH_STATS in state.model_state:
                indices = [max(step - 1 - i, 0) for i in range(tc.ema_bn_batches)]
                batches = (next_batch("train", index) for index in indices)
                evaluated = recalibrated(statistics_step, evaluated, batches)
            evaluated_at.clear()  # older entries share buffers the train step has donated
            evaluated_at[step] = evaluated
        return evaluated_at[step]

    def run_eval(state, split, step: int):
        compiling = eval_step.seconds
        evaluated = for_evaluation(state, step)
        metrics = evaluate(
            eval_step, evaluated, task, split, batch_size, tc.eval_batches, layout.put_batch
        )
        progress.off_clock(eval_step.seconds - compiling)
        return metrics

    tick, tick_step, train_time, valid = time.perf_counter(), start, 0.0, None
    tick_compiling = train_step.seconds
    reached = start  # the step of `state`
    try:
        for step in range(start, tc.num_steps):
            compiling = train_step.seconds
            state, metrics = train_step(state, next_batch("train", step))
            progress.off_clock(train_step.seconds - compiling)
            seq_len = train_task_at(stages, task, step).spec.seq_len
            progress.dispatched(metrics["loss"], batch_size * seq_len)
            done = reached = step + 1
            pending.add(done, metrics)
            log = done % tc.log_every == 0 or done == tc.num_steps
            save = done % tc.checkpoint_every == 0 or done == tc.num_steps
            evaluate_now = done % tc.eval_every == 0 or done == tc.num_steps
            if not (log or save or evaluate_now):
                continue
            progress.wait()  # each step's completion timed before the flush waits for all
            means = pending.flush()  # raises before any save of a non-finite state
            elapsed = time.perf_counter() - tick - (train_step.seconds - tick_compiling)
            train_time += elapsed
            means["tokens_per_s"] = batch_size * seq_len * (done - tick_step) / elapsed
            means["learning_rate"] = float(lr(done - 1))
            with progress.paused():  # evaluation, saving and logging off the step clock
                writer.write(done, "train", means)
                valid = run_eval(state, "valid", done) if evaluate_now else None
                if valid is not None:
                    writer.write(done, "valid", valid)
            if valid is not None:  # after the pause: the times include this evaluation
                progress.write(f"step {done}: valid {_format(valid)} | {progress.times()}")
            if save:
                with progress.paused():
                    checkpointer.save(done, state)
            tick, tick_step, tick_compiling = time.perf_counter(), done, train_step.seconds
    finally:
        progress.close()
        writer.close()
        checkpointer.close()

    final = {
        "steps": reached,
        "train_time_s": train_time,
        "compile_time_s": train_step.seconds,
        "valid": valid or run_eval(state, "valid", reached),
        "test": run_eval(state, "test", reached),
        "baseline": {spec.baseline_metric: spec.baseline},
    }
    if main:
        print("final: valid " + _format(final["valid"]) + " | test " + _format(final["test"]))
    if spec.is_language_model and config.generate.num_samples:  # every process generates
        final["samples"] = write_samples(
            model, for_evaluation(state, reached), task, config.generate, workdir, main
        )
        if hasattr(task, "known_word_share"):  # text: how many sampled words are real ones
            continuations = [s[len(config.generate.prompt) :] for s in final["samples"]]
            share, count = task.known_word_share(continuations)
            final["sample_word_share"] = share
            if main:
                print(f"{share:.0%} of the samples' {count} words are words of the training text")
    if main:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
    return final


class _NoWriter:
    """The metrics writer of processes other than 0: they log nothing."""

    def write(self, step: int, split: str, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def write_samples(model, state, task, gen, workdir: str, write: bool = True) -> list[str]:
    """Generates `gen.num_samples` continuations of `gen.prompt`, prints and saves them
    (if `write`).

    An empty prompt starts from a newline, i.e. at the start of a new document (a new joke).
    """
    prompt_text = gen.prompt or "\n"
    prompt = np.tile(task.encode(prompt_text)[None], (gen.num_samples, 1))
    tokens = models.generate(
        model,
        state.variables(),
        prompt,
        gen.length,
        temperature=gen.temperature,
        top_k=gen.top_k,
        seed=gen.seed,
    )
    samples = [(gen.prompt + task.decode(row)) for row in tokens]
    if not gen.prompt:  # one document per sample: stop at its end
        samples = [s.split("\n")[0] for s in samples]
    if not write:
        return samples
    print("samples:")
    for s in samples:
        print("  " + s)
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write("\n".join(samples) + "\n")
    return samples
