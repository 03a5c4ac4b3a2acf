"""The progress bar counts completed steps, with a smoothed loss, tokens/s and time left
(lru_jax/training/progress.py), and `train.wandb` logs the run's metrics and config to an
offline wandb run (lru_jax/training/metrics.py).

The bar's arithmetic runs on a fake device and a fake clock: steps take known seconds one
after another, and reading a step's loss waits (advances the clock) until it is done.
"""

import glob
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import tiny_config

from lru_jax.training import config as config_lib
from lru_jax.training import loop, progress
from lru_jax.training.metrics import WANDB_ID, MetricsWriter, read_jsonl


class FakeDevice:
    """Runs dispatched steps back to back, each for its seconds of a fake clock."""

    def __init__(self):
        self.now = 0.0  # the host's time
        self.free_at = 0.0  # when the steps dispatched so far are done

    def clock(self) -> float:
        return self.now

    def dispatch(self, seconds: float, loss: float) -> "FakeLoss":
        self.free_at = max(self.free_at, self.now) + seconds
        return FakeLoss(self, self.free_at, loss)


class FakeLoss:
    def __init__(self, device, done_at, value):
        self.device, self.done_at, self.value = device, done_at, value

    def is_ready(self) -> bool:
        return self.device.now >= self.done_at

    def __float__(self) -> float:  # reading waits for the step
        self.device.now = max(self.device.now, self.done_at)
        return self.value


def fake_progress(total, start=0, **kwargs):
    device = FakeDevice()
    return device, progress.Progress(start, total, disable=True, clock=device.clock, **kwargs)


def test_smoothed_is_the_mean_then_an_exponential_average():
    s = progress.Smoothed(0.5)
    assert [s.add(x) for x in (1.0, 3.0, 3.0, 7.0)] == [1.0, 2.0, 2.5, 4.75]


def test_steps_count_when_complete_at_most_ahead_behind_and_the_device_never_idles():
    device, p = fake_progress(10)
    losses = []
    for k in range(1, 11):  # the host dispatches at once; each step takes 1 s
        losses.append(device.dispatch(1.0, float(k)))
        p.dispatched(losses[-1], tokens=100)
        assert p.done == max(0, k - progress.AHEAD)  # counted: done steps, a bounded lag
        assert all(loss.is_ready() for loss in losses[: p.done])
        assert device.free_at > device.now  # steps still queued: the device is busy
        if p.done:
            assert p.step_s.value == 1.0 and p.tokens_per_s() == 100.0
            assert p.remaining_s() == 10 - p.done
    p.wait()
    assert p.done == 10 and device.now == 10.0  # 10 steps of 1 s, no idle time
    assert p.loss.value == np.mean(np.arange(1, 11)) and p.remaining_s() == 0


def test_a_dispatched_step_that_is_already_done_counts_at_once():
    device, p = fake_progress(5)
    p.dispatched(device.dispatch(1.0, 1.0), tokens=1)
    device.now = 1.0  # the host did 1 s of other work meanwhile
    p.dispatched(device.dispatch(1.0, 1.0), tokens=1)
    assert p.done == 1


def test_pauses_are_elapsed_and_spread_over_the_steps_left_and_compiling_is_neither():
    device, p = fake_progress(10)
    for _ in range(4):
        p.dispatched(device.dispatch(2.0, 1.0), tokens=1)
    with p.paused():  # waits for the 4 steps (8 s), then an evaluation of 3 s
        assert p.done == 4 and device.now == 8.0
        device.now += 3.0
        p.off_clock(2.0)  # of which 2 s compiled its program: not expected again
    assert p.elapsed_s() == 11.0
    assert p.remaining_s() == 6 * (2.0 + 1.0 / 4)  # steps left x (step + pause per step)
    assert p.times() == "00:11 elapsed, 00:13 left"
    device.now += 5.0  # compiling a new batch shape between steps
    p.off_clock(5.0)
    p.dispatched(device.dispatch(2.0, 1.0), tokens=1)
    p.wait()
    assert p.step_s.value == 2.0 and p.elapsed_s() == 18.0  # the step time as before


def test_the_time_left_is_stable_under_noisy_steps():
    device, p = fake_progress(200)
    estimates = []
    for k in range(200):
        p.dispatched(device.dispatch(1.0 if k % 2 else 3.0, 1.0), tokens=1)
        if p.done >= 20:
            estimates.append(p.remaining_s() / (200 - p.done))
    # steps of 1 s and 3 s: the step time seen stays near their mean, 2 s
    assert min(estimates) > 1.9 and max(estimates) < 2.1


def slow_train_steps(monkeypatch, dispatched):
    """Makes the run's train step slow on the device (so it is still running when dispatch
    returns) and records each dispatched step's loss."""
    make = loop.make_train_step

    def slow_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def slow(state, batch):
            state, metrics = step(state, batch)
            x = jnp.full((192, 192), 1 / 192) + 0 * metrics["loss"]
            x = jax.lax.fori_loop(0, 40, lambda i, x: jnp.tanh(x @ x), x)
            return state, {**metrics, "loss": metrics["loss"] + 0 * x[0, 0]}

        return jax.jit(slow, donate_argnums=0)

    call = loop.AheadOfTime.__call__

    def recording_call(self, state, batch):
        out = call(self, state, batch)
        if isinstance(out, tuple):  # a train step (state, metrics), not an evaluation
            dispatched.append(out[1]["loss"])
        return out

    monkeypatch.setattr(loop, "make_train_step", slow_make)
    monkeypatch.setattr(loop.AheadOfTime, "__call__", recording_call)


def test_the_bar_of_a_run_counts_only_completed_steps(tmp_path, monkeypatch, capsys):
    """The real loop with slow steps: whenever the bar counts up, every step it counts has
    its loss ready (is complete); it never falls more than AHEAD behind the dispatches; the
    evaluation lines say elapsed and left; and a run without train.wandb imports no wandb."""
    dispatched, violations, bars = [], [], []

    class CheckedBar(progress.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n=1):
            counted = self.n + n
            if not all(loss.is_ready() for loss in dispatched[:counted]):
                violations.append(("not complete", counted, len(dispatched)))
            if counted < len(dispatched) - progress.AHEAD:
                violations.append(("behind", counted, len(dispatched)))
            return super().update(n)

    slow_train_steps(monkeypatch, dispatched)
    monkeypatch.setattr(progress, "tqdm", CheckedBar)
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail
    config = tiny_config(num_steps=8, log_every=1, eval_every=4, checkpoint_every=8)
    loop.train_and_evaluate(config, str(tmp_path))
    assert len(dispatched) == 8 and bars[0].n == 8 and violations == []
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    shown = re.search(r"loss (\d+\.\d+), [\d,]+ tok/s", bars[0].postfix).group(1)
    assert float(shown) == pytest.approx(np.mean(losses), abs=1e-4)  # 8 < 1/weight: the mean
    lines = re.findall(
        r"step (\d+): valid .* \| (\d+):(\d+) elapsed, (\d+):(\d+) left", capsys.readouterr().out
    )
    assert [int(step) for step, *_ in lines] == [4, 8]
    assert lines[-1][3:] == ("00", "00")  # nothing left at the last step
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / WANDB_ID)


# ------------------------------------------------------------------ wandb

WANDB_MISSING = "wandb is not installed (pip install -e '.[wandb]'; the test extra has it)"


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb, offline, silent, with its settings and caches under tmp_path."""
    wandb = pytest.importorskip("wandb", reason=WANDB_MISSING)
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return wandb


def wandb_records(run_dir):
    """The records of the offline run in `run_dir`, read from its .wandb file: a 7-byte header
    (":W&B", ...) then 32 KiB blocks of chunks, each a 7-byte header (checksum, little-endian
    length, type: 1 whole record, 2/3/4 its first/middle/last part) and data, a block's last
    bytes zero when fewer than 7 are left."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, records, pos, parts = 32768, [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def logged(records):
    """(config {key: value}, history {step: {name: value}}) of a run's records."""
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item
            }
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return config, history


def test_train_wandb_logs_the_metrics_and_config_offline(tmp_path, offline_wandb):
    config = tiny_config(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
    config.train.wandb = "lru-jax-test"
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir))
    (run_dir,) = glob.glob(str(workdir / "wandb" / "offline-run-*"))
    saved, history = logged(wandb_records(run_dir))
    assert saved == json.loads(config.to_json())
    expected = {}
    for r in read_jsonl(workdir / "metrics.jsonl"):
        named = {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")}
        expected.setdefault(r["step"], {}).update(named)
    assert sorted(expected) == [2, 4] and history == expected
    assert open(workdir / WANDB_ID).read().strip() in run_dir


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(
    tmp_path, offline_wandb
):
    def session(resume_step):
        writer = MetricsWriter(str(tmp_path), resume_step, wandb_project="p", config={"a": 1})
        writer.write(1 if resume_step is None else resume_step + 1, "train", {"loss": 1.0})
        run_id = writer.wandb.id
        writer.close()
        return run_id

    first = session(None)
    assert session(1) == first  # resumed
    assert session(None) != first  # the workdir trained again from scratch


def test_train_wandb_needs_wandb_installed(monkeypatch):
    config = tiny_config()
    config_lib.validate(config)  # "" by default: no wandb needed
    config.train.wandb = "project"
    monkeypatch.setattr(config_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config_lib.ConfigError, match="where wandb is not installed"):
        config_lib.validate(config)
