"""The train suite (train-step throughput of configs/) and the memory suite (BPTT with and
without rematerialisation)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from lru_jax import timing
from lru_jax.bench import report
from lru_jax.bench.report import Row
from lru_jax.training import config as config_lib
from lru_jax.training.config import load_config
from lru_jax.training.loop import build_task, one_device_state
from lru_jax.training.optim import make_optimizer
from lru_jax.training.steps import make_train_step


def _train_step_setup(config):
    config_lib.validate(config)
    task = build_task(config)
    model = config_lib.build_model(config.model, task.spec)
    tx = make_optimizer(config.train)
    state = one_device_state(model, tx, task, config)
    step = make_train_step(model, tx, task.spec, seed=0, tbptt_length=config.train.tbptt_length)
    batch = task.batch("train", 0, config.train.batch_size)
    return task, step, state, batch


def _time_train_step(step, state, batch, repeats) -> dict:
    """Like `timing.measure`, for an already-jitted train step (state is threaded through)."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, _ = timing.block(compiled(state, batch))
    wall, cpu = [], []
    for _ in range(repeats):
        state, _ = timing.timed_call(compiled, (state, batch), wall, cpu)
    return timing.summary(wall, cpu, compile_s, compiled)


TRAIN_CONFIGS = (
    ("default (jokes, LRU)", "configs/default.py", {}),
    ("adding T=1000, LRU", "configs/adding.py", {}),
    ("adding T=1000, LSTM", "configs/adding.py", {"model.mixer": "lstm"}),
    ("mnist1d, LRU", "configs/mnist1d.py", {}),
    ("listops, LRU", "configs/listops.py", {}),
    ("adding T=1000, 4-layer LRU", "configs/adding.py", {"model.num_layers": 4}),
)


def train_suite(config_dir: str, repeats: int) -> list[Row]:
    """Train-step throughput for the configs in TRAIN_CONFIGS."""
    rows = []
    for name, path, overrides in TRAIN_CONFIGS:
        config = load_config(os.path.join(config_dir, os.path.basename(path)), overrides)
        task, step, state, batch = _train_step_setup(config)
        timing = _time_train_step(step, state, batch, repeats)
        row = report.row("train", name, name, timing)
        tokens = config.train.batch_size * task.spec.seq_len
        row.work = {"tokens": tokens, "config": path, "overrides": overrides}
        row.rate = f"{tokens / row.median_ms * 1e3:,.0f} tokens/s"
        rows.append(row)
    return rows


def memory_suite(length: int, repeats: int) -> list[Row]:
    """BPTT of 4-layer LRU and LSTM regressors at `length`, with and without remat."""
    from lru_jax import models

    rows = []
    x = jax.random.normal(jax.random.key(0), (1, length, 1))
    for mixer in ("lru", "lstm"):
        group = f"4-layer {mixer} B=1 T={length} d_model=64 fwd+bwd"
        for remat in (False, True):
            model = models.SequenceModel(
                num_outputs=1,
                mixer=mixer,
                d_model=64,
                num_layers=4,
                d_state=64,
                pooling="none",
                remat=remat,
            )
            params = jax.jit(model.init)(jax.random.key(1), x)["params"]  # one compile, not per op

            def loss(p, v, model=model):
                return jnp.mean(model.apply({"params": p}, v) ** 2)

            name = "remat" if remat else "no remat"
            rows.append(
                report.row(
                    "memory", group, name, timing.measure(jax.grad(loss), (params, x), repeats)
                )
            )
    report.set_speedups(rows, lambda r: r.name == "no remat")
    return rows
