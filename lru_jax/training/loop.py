"""The training loop, top to bottom: config -> task -> model -> state -> steps -> logs.

Everything random is a function of (seed, step): the batch at step s is `task.batch("train",
s, ...)` and the dropout key is `fold_in(key, s)`. So a run resumed from a checkpoint repeats
exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lru_jax import models, tasks
from lru_jax.training import config as config_lib
from lru_jax.training.checkpoints import Checkpointer
from lru_jax.training.metrics import MetricsWriter
from lru_jax.training.optim import make_optimizer, schedule
from lru_jax.training.state import TrainState
from lru_jax.training.steps import make_eval_step, make_train_step, model_inputs, summarise


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def build_task(config):
    kwargs = {k: v for k, v in config.task.items() if k != "name"}
    return tasks.get_task(config.task.name, seed=config.seed, **kwargs)


def init_state(model, tx, task, config):
    batch = task.batch("train", 0, config.train.batch_size)
    variables = jax.jit(model.init)(jax.random.key(config.seed), *model_inputs(batch))
    return TrainState.create(variables, tx)


def evaluate(eval_step, state, task, split: str, batch_size: int, num_batches: int):
    """Metrics over `num_batches` batches of `split` (0: the whole split once, if finite)."""
    n = task.num_examples(split) if num_batches == 0 else None
    if num_batches == 0:
        num_batches = 1 if n is None else math.ceil(n / batch_size)
    total = None
    for index in range(num_batches):
        batch = task.batch(split, index, batch_size)
        if n is not None and index == num_batches - 1:  # the split's tail, without wrapping
            remainder = n - index * batch_size
            batch = {name: array[:remainder] for name, array in batch.items()}
        sums = eval_step(state, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {k: float(v) for k, v in summarise(task.spec, total).items()}


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

    Returns the final metrics: {"valid": {...}, "test": {...}, "steps": n, "train_time_s": t}.
    """
    config_lib.validate(config)
    task = build_task(config)
    spec = task.spec
    config_lib.check_against_task(config, spec)
    model = config_lib.build_model(config.model, spec)
    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    tx = make_optimizer(tc)
    state = init_state(model, tx, task, config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is not None:
        state = checkpointer.restore(state)
        print(f"Resuming from the checkpoint at step {start} in {workdir}")
    writer = MetricsWriter(workdir, resume_step=start)
    start = start or 0

    train_step = make_train_step(
        model, tx, spec, seed=config.seed + 1, tbptt_length=tc.tbptt_length
    )
    eval_step = make_eval_step(model, spec)
    lr = schedule(tc)
    tokens_per_batch = tc.batch_size * spec.seq_len
    pending = _PendingMetrics()
    bar = tqdm(total=tc.num_steps, initial=start, desc="train", dynamic_ncols=True)
    tick, tick_step, train_time, valid = time.perf_counter(), start, 0.0, None
    try:
        for step in range(start, tc.num_steps):
            state, metrics = train_step(state, task.batch("train", step, tc.batch_size))
            done = step + 1
            pending.add(done, metrics)
            bar.update(1)
            log = done % tc.log_every == 0 or done == tc.num_steps
            save = done % tc.checkpoint_every == 0 or done == tc.num_steps
            if log or save or done % tc.eval_every == 0:
                means = pending.flush()  # raises before any save of a non-finite state
                elapsed = time.perf_counter() - tick
                train_time += elapsed
                means["tokens_per_s"] = tokens_per_batch * (done - tick_step) / elapsed
                means["learning_rate"] = float(lr(done - 1))
                writer.write(done, "train", means)
                bar.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{means['tokens_per_s']:.0f}")
            valid = None
            if done % tc.eval_every == 0 or done == tc.num_steps:
                valid = evaluate(eval_step, state, task, "valid", tc.batch_size, tc.eval_batches)
                writer.write(done, "valid", valid)
                bar.write(f"step {done}: valid " + _format(valid))
            if save:
                checkpointer.save(done, state)
            if log or save or done % tc.eval_every == 0:  # time evaluation and saving apart
                tick, tick_step = time.perf_counter(), done
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    final = {
        "steps": tc.num_steps,
        "train_time_s": train_time,
        "valid": valid or evaluate(eval_step, state, task, "valid", tc.batch_size, tc.eval_batches),
        "test": evaluate(eval_step, state, task, "test", tc.batch_size, tc.eval_batches),
        "baseline": {spec.baseline_metric: spec.baseline},
    }
    print("final: valid " + _format(final["valid"]) + " | test " + _format(final["test"]))
    if spec.is_language_model and config.generate.num_samples:
        final["samples"] = write_samples(model, state, task, config.generate, workdir)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(final, f, indent=2)
    return final


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def write_samples(model, state, task, gen, workdir: str) -> list[str]:
    """Generates `gen.num_samples` continuations of `gen.prompt`, prints and saves them.

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
    print("samples:")
    for s in samples:
        print("  " + s)
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write("\n".join(samples) + "\n")
    return samples
