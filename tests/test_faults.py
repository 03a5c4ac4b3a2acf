"""Fault injection: a run killed at several points resumes bit for bit; every kind of checkpoint
damage ends in a fallback to a checkpoint that verifies or in a one-line error, never in
silently wrong numbers; a resume keeps the run's record honest; every command-line mistake is
one short line with its exit code. (The README's code blocks: test_readme.py.)

One tiny run is trained once (the `trained` fixture) and copied for each case; every run here
compiles the same small programs, which a persistent compilation cache (this module's only)
loads after the first time instead of compiling again.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from tiny_configs import tiny_config

from lru_jax import diagnose
from lru_jax.bench import __main__ as bench_cli
from lru_jax.training import checkpoints, loop, sharding
from lru_jax.training import config as config_lib
from lru_jax.training.checkpoints import Checkpointer, CheckpointError
from lru_jax.training.metrics import read_jsonl
from lru_jax.training.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    before = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    path = str(tmp_path_factory.mktemp("jax_cache"))
    for name, value in zip(CACHE_SETTINGS, (path, 0, 0), strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def config(**train):
    """8 steps of a tiny LRU language model, checkpoints at 4 and 8; `train` overrides."""
    c = tiny_config(**{"num_steps": 8, "checkpoint_every": 4, "eval_every": 4, "log_every": 2,
                       **train})  # fmt: skip
    c.task = {"name": "text", "corpus": "jokes", "seq_len": 8}
    c.model.update({"d_model": 8, "lru": {"d_state": 4}})
    c.train.batch_size = 2
    return c


def quietly(run, *args):
    """run(*args) with its progress bar and prints kept out of the test's output."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run(*args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, final metrics) of the uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    return workdir, quietly(loop.train_and_evaluate, config(), workdir)


@pytest.fixture(scope="module")
def template():
    """The train state's shapes and shardings, a restore target."""
    c = config()
    task = loop.build_task(c)
    model = config_lib.build_model(c.model, task.spec)
    layout = sharding.layout_from_config(c, loop.time_keys(task.spec))
    return loop.abstract_state(model, make_optimizer(c.train), task, c, layout)


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained run's workdir for one case to damage."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir


def restored(workdir, template, step=None, on_damaged="fallback"):
    """(step, numpy leaves) of the checkpoint a resume would use."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), 2, on_damaged)
    try:
        step = checkpointer.latest_step() if step is None else step
        return step, jax.tree.leaves(jax.device_get(checkpointer.restore(template, step)))
    finally:
        checkpointer.close()


def assert_leaves_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def train_losses(workdir):
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


class Killed(Exception):
    pass


def kill_at_batch(monkeypatch, index):
    """The run dies as it asks for the training batch of step `index`."""
    original = loop.build_task

    def build(c):
        task = original(c)
        batch = task.batch

        def dying(split, i, batch_size):
            if split == "train" and i == index:
                raise Killed(f"killed before step {i}")
            return batch(split, i, batch_size)

        task.batch = dying
        return task

    monkeypatch.setattr(loop, "build_task", build)


def kill_in_save(monkeypatch, step):
    """The run dies after orbax has written step `step` and before its checksums are."""
    original = checkpoints.write_manifest

    def dying(folder):
        if os.path.basename(folder) == str(step):
            raise Killed(f"killed while saving step {step}")
        original(folder)

    monkeypatch.setattr(checkpoints, "write_manifest", dying)


def test_a_run_killed_at_any_point_resumes_bit_for_bit(trained, template, tmp_path, monkeypatch):
    """Killed before the first checkpoint, between checkpoints, and inside a save: each resume
    continues from the newest complete checkpoint, and the run ends where the uninterrupted
    one did, to the bit."""
    workdir, straight = trained
    resumed = str(tmp_path / "resumed")
    for kill in (lambda m: kill_at_batch(m, 2), lambda m: kill_at_batch(m, 6)):
        with monkeypatch.context() as m:
            kill(m)
            with pytest.raises(Killed):
                quietly(loop.train_and_evaluate, config(), resumed)
    assert max(train_losses(resumed)) == 6  # the second kill came after the checkpoint at 4
    with monkeypatch.context() as m:
        kill_in_save(m, 8)
        with pytest.raises(Killed):
            quietly(loop.train_and_evaluate, config(), resumed)
    final = quietly(loop.train_and_evaluate, config(), resumed)

    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["4", "8", "8.damaged"]
    assert train_losses(resumed) == train_losses(workdir)
    logged = [(r["step"], r["split"]) for r in read_jsonl(os.path.join(resumed, "metrics.jsonl"))]
    assert logged == sorted(logged, key=lambda r: r[0]) and len(set(logged)) == len(logged)
    assert final["test"] == straight["test"] and final["steps"] == 8
    assert_leaves_equal(restored(resumed, template)[1], restored(workdir, template)[1])


def largest_data_file(workdir, step=8):
    folder = os.path.join(workdir, "checkpoints", str(step), "default", "ocdbt.process_0", "d")
    return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


def overwrite_16_bytes(workdir):
    path = largest_data_file(workdir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 16)


def truncate(workdir):
    path = largest_data_file(workdir)
    os.truncate(path, os.path.getsize(path) // 2)


def delete_a_file(workdir):
    os.remove(largest_data_file(workdir))


def empty_the_metadata(workdir):
    open(os.path.join(workdir, "checkpoints", "8", "default", "_METADATA"), "w").close()


def delete_the_item_folder(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8", "default"))


def add_an_empty_step_folder(workdir):
    os.mkdir(os.path.join(workdir, "checkpoints", "50"))


DAMAGE = {  # how the newest checkpoint is damaged -> the step set aside, what the warning says
    "overwritten": (overwrite_16_bytes, "8", "does not match its checksum"),
    "truncated": (truncate, "8", "bytes, "),
    "deleted file": (delete_a_file, "8", "is missing"),
    "emptied metadata": (empty_the_metadata, "8", "default/_METADATA has 0 bytes"),
    "no item folder": (delete_the_item_folder, "8", "is missing"),
    "empty folder": (add_an_empty_step_folder, "50", "incomplete: no checksums.json"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoints_fall_back_to_one_that_verifies(kind, trained, template, copy, capfd):
    damage, bad, said = DAMAGE[kind]
    damage(copy)
    good = "4" if bad == "8" else "8"
    step, leaves = restored(copy, template)
    warning = capfd.readouterr().err
    assert step == int(good)
    assert_leaves_equal(leaves, restored(trained[0], template, int(good))[1])
    lines = [line for line in warning.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and f"step {bad} in" in lines[0] and said in lines[0]
    assert f"kept as {bad}.damaged" in lines[0]
    kept = sorted(os.listdir(os.path.join(copy, "checkpoints")))
    assert f"{bad}.damaged" in kept and bad not in kept


def test_with_on_damaged_stop_a_damaged_checkpoint_stops_the_run(template, copy):
    overwrite_16_bytes(copy)
    with pytest.raises(CheckpointError) as refused:
        restored(copy, template, on_damaged="stop")
    message = str(refused.value)
    assert "\n" not in message and "step 8" in message and "does not match its checksum" in message
    assert "8" in os.listdir(os.path.join(copy, "checkpoints"))  # left where it was


def test_unverified_checkpoints_fail_in_one_line_when_the_storage_layer_does(template, copy):
    """A run saved before manifests restores unverified; a truncated file there is one
    CheckpointError line, not tensorstore's dump."""
    for step in ("4", "8"):
        os.remove(os.path.join(copy, "checkpoints", step, checkpoints.MANIFEST))
    truncate(copy)
    with pytest.raises(CheckpointError) as failed:
        restored(copy, template)
    assert "\n" not in str(failed.value) and "step 8" in str(failed.value)
    assert "could not be read" in str(failed.value)


def test_a_resume_from_a_damaged_checkpoint_trains_to_the_same_numbers(trained, copy):
    """The overwritten Adam moment of the issue: the run resumes from step 4, not from the
    damaged step 8, and ends at the uninterrupted run's numbers instead of a NaN."""
    overwrite_16_bytes(copy)
    final = quietly(loop.train_and_evaluate, config(num_steps=8), copy)
    assert final["test"] == trained[1]["test"]
    assert train_losses(copy) == train_losses(trained[0])


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays(template, copy):
    """Caught before orbax reads anything: shapes from the metadata, compared leaf by leaf."""
    other = config()
    other.model.d_model = 12
    task = loop.build_task(other)
    model = config_lib.build_model(other.model, task.spec)
    layout = sharding.layout_from_config(other, loop.time_keys(task.spec))
    wider = loop.abstract_state(model, make_optimizer(other.train), task, other, layout)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit .*: params/\S+ float32\[.*\] saved, float32\[.*\] built",
    ):
        restored(copy, wider, 8)


def small_state(batch_stats, scale=1.0):
    """A TrainState of two parameters, Adam's state and `batch_stats` ({} for none)."""
    import jax.numpy as jnp
    import optax

    from lru_jax.training.state import TrainState

    params = {"w": scale * jnp.arange(6.0).reshape(2, 3), "b": scale * jnp.ones(3)}
    model_state = {"batch_stats": batch_stats} if batch_stats else {}
    return TrainState(jnp.int32(5 * scale), params, optax.adam(0.1).init(params), model_state)


@pytest.mark.parametrize("with_batch_norm", [True, False])
def test_a_checkpoint_saved_before_model_state_restores(with_batch_norm, tmp_path):
    """Checkpoints written before TrainState.model_state held {step, params, opt_state,
    batch_stats} (BatchNorm's averages, {} without BatchNorm) at the top level."""
    import jax.numpy as jnp

    stats = {"norm": {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 3.0)}}
    saved = small_state(stats if with_batch_norm else {}, scale=2.0)
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    old_layout = {"step": saved.step, "params": saved.params, "opt_state": saved.opt_state,
                  "batch_stats": saved.model_state.get("batch_stats", {})}  # fmt: skip
    checkpointer.save(5, old_layout)
    template = small_state(jax.tree.map(jnp.zeros_like, stats) if with_batch_norm else {})
    got = checkpointer.restore(template)
    assert set(got.model_state) == ({"batch_stats"} if with_batch_norm else set())
    assert_leaves_equal(jax.tree.leaves(got), jax.tree.leaves(saved))
    with_baseline = template.replace(model_state={**template.model_state, "baselines": {}})
    with pytest.raises(CheckpointError, match="saved before models kept state baselines"):
        checkpointer.restore(with_baseline)
    checkpointer.close()


def test_a_resume_refuses_another_model_and_records_other_changes(copy):
    other = config()
    other.model.d_model = 12
    with pytest.raises(config_lib.ConfigError, match="model.d_model 8 -> 12: the run in"):
        loop.train_and_evaluate(other, copy)
    with open(os.path.join(copy, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 8  # the run's own config is kept

    changed = config(num_steps=6, learning_rate=1e-3)  # fewer steps than the checkpoint's 8
    final = quietly(loop.train_and_evaluate, changed, copy)
    assert final["steps"] == 8  # the step the model reached, not train.num_steps
    history = read_jsonl(os.path.join(copy, "config_history.jsonl"))
    assert [h["step"] for h in history] == [0, 8] and history[0]["changed"] == {}
    assert history[1]["changed"] == {"train.learning_rate": [3e-3, 1e-3], "train.num_steps": [8, 6]}
    assert history[1]["config"]["train"]["learning_rate"] == 1e-3
    with open(os.path.join(copy, "config.json")) as f:
        assert json.load(f)["train"]["learning_rate"] == 1e-3


def test_the_first_interval_is_timed_without_compilation(tmp_path, monkeypatch):
    """Compilation ahead of the clock: a second added to it shows in compile_time_s, not in
    the first logged tokens/s (a tiny step takes milliseconds)."""
    import time

    lower = jax.stages.Lowered.compile

    def slow(self, *args, **kwargs):
        time.sleep(1.0)
        return lower(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", slow)
    final = quietly(loop.train_and_evaluate, config(log_every=1), str(tmp_path))
    first = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]
    assert final["compile_time_s"] >= 1.0
    assert first["step"] == 1 and first["tokens_per_s"] > 2 * 8 / 1.0  # < 1 s for the step


# ------------------------------------------------------------------ the command line


def train_py():
    spec = importlib.util.spec_from_file_location("train_py", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_FLAGS = ["--config.task.seq_len=8", "--config.model.d_model=8", "--config.model.num_layers=1"]


def mistakes(tmp_path, copy):
    """(argv, exit code, the one error line's expected text) of train.py."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [
        (
            ["--config.model.d_modle=3"],
            2,
            "--config.model.d_modle: no such key (did you mean --config.model.d_model?)",
        ),  # fmt: skip
        (["--config.task.bogus=1"], 2, "--config.task.bogus: no such key (config.task has"),
        (["--config.model.cell=lstm"], 2, "--config.model.cell: renamed --config.model.mixer"),
        (["--config.model.d_model=3.5"], 2, "--config.model.d_model: expected an int, got '3.5'"),
        (["--config=missing.py"], 2, "--config: expected a config file (a .py file), got "),
        (["stray"], 2, "unexpected argument 'stray'"),
        ([f"--workdir={a_file}"], 2, "workdir: expected a directory that can be written, got"),
        ([f"--workdir={a_file}/run"], 2, "workdir: expected a directory that can be written"),
        (["--config.task.seq_len=-3"], 2, "config.task.seq_len: expected a positive int, got -3"),
        (["--config.model.d_model=-4"], 2, "config.model.d_model: expected a positive int"),
        (["--config.model.d_model=12", f"--workdir={copy}"], 2, "model.d_model 8 -> 12"),
    ]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_train_py_names_every_mistake_in_one_line(tmp_path, copy, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = train_py().main
    for argv, code, said in mistakes(tmp_path, copy):
        assert main([*TINY_FLAGS, "--config.train.num_steps=8", *argv]) == code, argv
        assert said in one_error_line(capsys), argv
        assert not os.path.exists(tmp_path / "runs"), argv  # nothing written for a mistake
    overwrite_16_bytes(copy)  # a failure, not a usage error: exit code 1
    stop = ["--config.train.on_damaged_checkpoint=stop", f"--workdir={copy}"]
    assert main([*TINY_FLAGS, "--config.train.num_steps=8", *stop]) == 1
    assert "step 8" in one_error_line(capsys)
    assert main(["--help"]) == 0 and "--workdir" in capsys.readouterr().out
    monkeypatch.setenv("LRU_JAX_SCAN_CHOICES", "scan_choices.json")  # read by earlier versions
    assert main([]) == 2 and "--config.train.scan_choices=PATH" in one_error_line(capsys)


def test_the_tools_read_the_runs_config_and_name_their_mistakes(tmp_path, copy, capsys):
    cases = [
        (diagnose.main, ["--workdir", copy, f"--config={ROOT}/configs/adding.py"], 2, "not with"),
        (diagnose.main, ["--workdir", copy, "--config.model.d_model=12"], 2, "model.d_model 8"),
        (diagnose.main, ["--workdir", str(tmp_path)], 2, "expected a training run with config"),
        (diagnose.main, [], 2, "--config: expected a config file, or --workdir"),
    ]
    for main, argv, code, said in cases:
        assert main(argv) == code, argv
        assert said in one_error_line(capsys), argv
    assert diagnose.main(["--help"]) == 0
    for dtypes, said in (("float64", "needs 64-bit JAX"), ("bogus", "expected a comma-separated")):
        with pytest.raises(SystemExit) as exited:
            bench_cli.parse_args([f"--dtypes={dtypes}"])
        assert exited.value.code == 2 and said in capsys.readouterr().err


def test_a_refused_resume_is_one_line_and_exit_code_2_in_a_fresh_process(copy):
    """The issue's case: the right error, then hundreds of lines of asyncio noise at exit."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *TINY_FLAGS, f"--workdir={copy}"]
        + ["--config.model.d_model=12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines[:5]
    assert lines[0].startswith("error: config: model.d_model 8 -> 12")
