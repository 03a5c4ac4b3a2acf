"""Training: truncated BPTT, non-finite losses, scan choices, config checks, optimiser groups
and a run of train.py (resumes after kills, damaged checkpoints and train.py's mistakes are
in test_faults.py)."""

import functools
import json
import os
import subprocess
import sys

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tiny_configs import tiny_config

from lru_jax import nn as lnn
from lru_jax import scan, scan_choices, tasks
from lru_jax.training import autotune, loop, runs, steps
from lru_jax.training import config as config_lib
from lru_jax.training.metrics import read_jsonl
from lru_jax.training.optim import average_params, averaged_params, make_optimizer, param_groups
from lru_jax.training.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if r["split"] == "train"
    }


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config()
    config.task = {"name": "adding", "seq_len": 10}
    config.model.pooling = "last"
    original = loop.build_task

    def poisoned(config):
        task = original(config)
        batch = task.batch

        def with_nan(split, index, batch_size):
            out = batch(split, index, batch_size)
            if split == "train" and index == 5:
                out["inputs"] = np.full_like(out["inputs"], np.nan)
            return out

        task.batch = with_nan
        return task

    monkeypatch.setattr(loop, "build_task", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="at step 6"):
        loop.train_and_evaluate(config, str(tmp_path))
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == [4]


@functools.cache  # the same model, batch and full gradients for every segment length k
def _tbptt_setup(mixer):
    task = tasks.get_task("text", corpus="jokes", seq_len=20)
    config = tiny_config()
    config.model.dropout_rate = 0.0
    config.model.mixer = mixer
    model = config_lib.build_model(config.model, task.spec)
    batch = jax.tree.map(jnp.asarray, task.batch("train", 0, 3))
    tx = make_optimizer(config.train)
    # jitted: run eagerly, op by op, these take several times longer than compiling them
    state = TrainState.create(jax.jit(model.init)(jax.random.key(0), batch["inputs"]), tx)
    key = jax.random.key(1)
    full = jax.jit(steps.gradients, static_argnums=(0, 1))(model, task.spec, state, batch, key)
    return model, task.spec, state, batch, key, full


def _tbptt_parts(k, mixer="lru"):
    model, spec, state, batch, key, full = _tbptt_setup(mixer)
    truncated = jax.jit(steps._truncated_bptt, static_argnums=(0, 1, 5))(
        model, spec, state, batch, key, k
    )
    return full, truncated


@pytest.mark.parametrize("k", [20, 64])
def test_truncated_bptt_equals_full_when_one_segment_covers_the_sequence(k):
    (g_full, s_full, *_), (g_trunc, s_trunc, *_) = _tbptt_parts(k)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_trunc), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(s_full["loss_sum"]), float(s_trunc["loss_sum"]), rtol=1e-6)


@pytest.mark.parametrize("mixer, recurrent", [("lru", "nu_log"), ("mamba", "A_log")])
def test_truncated_bptt_carries_state_but_cuts_gradients(mixer, recurrent):
    """Mamba's carry is its state and its convolution's window: both cross the boundaries."""
    (g_full, s_full, *_), (g_trunc, s_trunc, *_) = _tbptt_parts(6, mixer)  # segments 6+6+6+2
    # The forward pass is the same computation: the carry crosses segment boundaries.
    np.testing.assert_allclose(float(s_full["loss_sum"]), float(s_trunc["loss_sum"]), rtol=1e-5)
    # The recurrent parameters' gradients lose the paths that cross a boundary.
    full = np.asarray(g_full["blocks_0"]["mixer"][recurrent])
    truncated = np.asarray(g_trunc["blocks_0"]["mixer"][recurrent])
    assert not np.allclose(full, truncated, rtol=1e-3)


class _Signalling(flax.linen.Module):
    """A linear classifier of the inputs' mean whose weights add a penalty to the objective and
    that counts its training calls: the training signals with no attention in sight."""

    @flax.linen.compact
    def __call__(self, x, lengths=None, *, initial_carry=None, return_carry=False,
                 deterministic=True):  # fmt: skip
        calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        w = self.param("w", flax.linen.initializers.normal(1.0), (x.shape[-1], 3))
        if not deterministic:
            lnn.add_loss(self, "penalty", 0.5 * jnp.sum(w**2))
            calls.value = calls.value + 1
        out = jnp.mean(x, axis=1) @ w
        return (None, out) if return_carry else out


def test_a_layers_loss_term_and_state_reach_the_train_step():
    spec = tasks.base.TaskSpec("toy", "classification", 4, 3, input_dim=2)
    x = np.random.default_rng(0).normal(size=(5, 4, 2)).astype(np.float32)
    batch = {"inputs": x, "targets": np.array([0, 1, 2, 1, 0], np.int32)}
    model, tx = _Signalling(), optax.sgd(0.1)
    state = TrainState.create(model.init(jax.random.key(0), x), tx)
    assert state.model_state == {"counters": {"calls": 0}}
    w = np.asarray(state.params["w"], np.float64)
    state, metrics = steps.make_train_step(model, tx, spec, seed=0)(state, batch)
    # d/dw of mean cross-entropy + 0.5 |w|^2, by hand
    mean_x = x.astype(np.float64).mean(1)
    logits = mean_x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = mean_x.T @ (p - np.eye(3)[batch["targets"]]) / 5 + w
    np.testing.assert_allclose(np.asarray(state.params["w"]), w - 0.1 * grad, atol=1e-6)
    assert float(metrics["losses/penalty"]) == pytest.approx(0.5 * np.sum(w**2), rel=1e-6)
    assert int(state.model_state["counters"]["calls"]) == 1
    assert state.variables()["counters"] == state.model_state["counters"]


def test_measured_scan_choices_are_the_runs_shapes_and_a_resumed_run_reuses_them(
    tmp_path, monkeypatch
):
    def no_clear_caches():
        raise AssertionError("jax.clear_caches was called")

    monkeypatch.setattr(jax, "clear_caches", no_clear_caches)
    workdir = str(tmp_path / "run")
    measure = tiny_config(num_steps=4, eval_every=4, scan_choices="measure")
    loop.train_and_evaluate(measure, workdir)
    saved = os.path.join(workdir, "scan_choices.json")
    with open(saved) as f:
        table = json.load(f)
    # the tiny LRU scans 24 steps over batch 4 x d_state 8 complex states, in training and eval
    shapes = {(e["dtype"], e["time"], e["state_size"], e["mode"]) for e in table["entries"]}
    assert shapes == {("complex64", 24, 32, "fwd"), ("complex64", 24, 32, "fwd+bwd")}

    def measure_again(queries, *args, **kwargs):
        raise AssertionError("a resumed run measured again")

    loaded, load = [], scan_choices.load
    monkeypatch.setattr(scan_choices, "measure", measure_again)
    monkeypatch.setattr(
        scan_choices, "load", lambda path, *a: loaded.append(path) or load(path, *a)
    )
    measure.train.num_steps = 8
    loop.train_and_evaluate(measure, workdir)
    assert loaded == [saved]


def test_auto_scan_choices_measure_only_where_the_built_in_rule_is_not_measured(
    tmp_path, monkeypatch
):
    """The default `train.scan_choices="auto"`: measure unless the run has its own table or the
    built-in rule is a measured one (CPU); a path or the run's own file is the table."""
    backend = jax.default_backend()
    entry = {"dtype": "complex64", "time": 24, "state_size": 32, "mode": "fwd",
             "times_ms": {"sequential": 2.0, "associative": 1.0}}  # fmt: skip
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"backend": backend, "entries": [entry]}))
    fresh = str(tmp_path / "a")
    monkeypatch.setattr(scan, "MEASURED_RULE_BACKENDS", (backend,))  # as on CPU
    assert autotune.run_table("auto", fresh) == (None, False)
    assert autotune.run_table("", fresh) == (None, False)
    assert autotune.run_table("measure", fresh) == (None, True)
    monkeypatch.setattr(scan, "MEASURED_RULE_BACKENDS", ())  # as on a GPU: a guessed rule
    assert autotune.run_table("auto", fresh) == (None, True)
    assert autotune.run_table("", fresh) == (None, False)  # "": never measures
    from_file, measure = autotune.run_table(str(table_file), fresh)
    assert not measure and from_file.to_json()["entries"] == [{**entry, "devices": 1}]

    run = tmp_path / "run"  # a resumed run reads its own table, for "auto" and "measure"
    run.mkdir()
    (run / "scan_choices.json").write_text(table_file.read_text())
    for setting in ("auto", "measure"):
        assert autotune.run_table(setting, str(run)) == (from_file, False)
    config = tiny_config()
    assert autotune.replayed_table(config, str(run)) == from_file
    assert autotune.replayed_table(config, None) is None


def test_a_scan_choices_file_decides_what_auto_runs(tmp_path, monkeypatch):
    built_in = scan.choose_method(24, 32, dtype=jnp.complex64)  # the rule without a table
    preferred = "sequential" if built_in == "associative" else "associative"
    entries = [
        {"dtype": "complex64", "time": 24, "state_size": 32, "mode": mode,
         "times_ms": {built_in: 2.0, preferred: 1.0}}
        for mode in ("fwd", "fwd+bwd")
    ]  # fmt: skip
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"backend": jax.default_backend(), "entries": entries}))
    ran, run = [], scan._scan
    monkeypatch.setattr(
        scan, "_scan", lambda method, *a, **k: ran.append(method) or run(method, *a, **k)
    )
    config = tiny_config(num_steps=2, eval_every=2, scan_choices=str(path))
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert ran and set(ran) == {preferred}  # not the built-in rule's choice


def test_truncated_bptt_trains_end_to_end(tmp_path):
    result = loop.train_and_evaluate(tiny_config(tbptt_length=8), str(tmp_path))
    assert np.isfinite(result["valid"]["loss"])


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("model", "d_model", -4, r"config.model.d_model: expected a positive int, got -4"),
        ("model", "mixer", "transformer", "config.model.mixer: expected one of"),
        ("model", "dropout_rate", 1.0, "config.model.dropout_rate"),
        ("model.rnn", "grad_chunk", -1, "config.model.rnn.grad_chunk: expected a non-negative int"),
        ("model.lru", "r_max", 1.5, "config.model.lru.r_min, r_max"),
        ("train", "learning_rate", -1.0, "config.train.learning_rate"),
        ("train", "batch_size", 0, "config.train.batch_size"),
        ("generate", "temperature", -0.5, "config.generate.temperature"),
        ("train", "scan_choices", "no/such.json", "config.train.scan_choices: expected 'auto'"),
        ("model.lru", "layer_rings", ((0.0, 1.0, 1.0),) * 2, r"layer_rings: expected \(\) or 1"),
        ("model.lru", "layer_rings", ((0.0, 1.0),), "layer_rings: expected a tuple of 3-tuples"),
        ("train", "length_curriculum", ((10, 0),), r"length_curriculum\[0\].steps: expected"),
        ("model.seq2seq", "hard_estimator", "score", "config.model.seq2seq.hard_estimator"),
        ("model.seq2seq", "baseline_decay", 1.0, "config.model.seq2seq.baseline_decay"),
        ("model.seq2seq", "entropy_weight", -0.1, "config.model.seq2seq.entropy_weight"),
        ("train", "ema_decay", 1.0, "config.train.ema_decay"),
    ],
)
def test_bad_config_values_are_named(section, key, value, match):
    config = tiny_config()
    group = config
    for name in section.split("."):
        group = group[name]
    group[key] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config)


# The model section of a config.json saved before its keys were grouped (written out by hand).
OLD_MODEL_SECTION = {
    "cell": "gru", "d_model": 16, "num_layers": 1, "d_state": 8, "r_min": 0.5, "r_max": 0.9,
    "max_phase": 1.0, "scan_method": "sequential", "norm": "layer", "prenorm": True,
    "ffn": "gelu", "dropout_rate": 0.0, "pooling": "none", "remat": False, "remat_chunk": 32,
    "num_heads": 2, "max_len": 64, "attention": "hard", "attention_score": "dot",
    "bidirectional": False, "hard_temperature": 0.5,
}  # fmt: skip


def test_a_config_saved_before_the_model_keys_were_grouped_upgrades_key_by_key():
    saved = json.loads(tiny_config().to_json())
    saved["model"] = dict(OLD_MODEL_SECTION)  # no grad_chunk: saved before it existed
    with pytest.raises(ValueError, match=r"config.model.cell: renamed config.model.mixer \("):
        config_lib.validate(ml_collections.ConfigDict(saved))
    written_for_the_old_layout = tiny_config()
    written_for_the_old_layout.model.update({"d_state": 4})
    with pytest.raises(ValueError, match="config.model.d_state: renamed config.model.lru.d_state"):
        config_lib.validate(written_for_the_old_layout)
    config = config_lib.upgrade(saved)
    config_lib.validate(config)
    m = config.model
    assert (m.mixer, m.d_model, m.num_layers, m.ffn, m.remat_chunk) == ("gru", 16, 1, "gelu", 32)
    assert m.lru.to_dict() == {"d_state": 8, "r_min": 0.5, "r_max": 0.9, "max_phase": 1.0,
                               "layer_rings": (), "scan_method": "sequential"}  # fmt: skip
    assert m.attention.to_dict() == {"num_heads": 2, "max_len": 64}
    assert m.seq2seq.to_dict() == {"attention": "hard", "attention_score": "dot",
                                   "bidirectional": False, "hard_temperature": 0.5,
                                   # added since: Gumbel straight-through, as it trained
                                   "hard_estimator": "gumbel", "baseline_decay": 0.9,
                                   "entropy_weight": 0.0}  # fmt: skip
    assert m.rnn.grad_chunk == 16  # the default, as before the key existed
    assert sorted(m.keys()) == sorted(config_lib.default_config().model.keys())
    # the other sections as saved, tuple-valued keys tuples again after JSON's lists
    assert config.train.to_dict() == {**saved["train"], "length_curriculum": ()}
    assert config_lib.upgrade(config).to_dict() == config.to_dict()  # today's layout: as is


def test_a_saved_config_gets_the_keys_added_since():
    saved = json.loads(tiny_config().to_json())
    del saved["model"]["norm_bias"], saved["model"]["lru"]["layer_rings"]
    del saved["train"]["length_curriculum"]
    config = config_lib.upgrade(saved)
    config_lib.validate(config)
    assert config.model.norm_bias is True and config.model.lru.layer_rings == ()
    assert config.train.length_curriculum == ()
    assert config.model.lru.d_state == saved["model"]["lru"]["d_state"]


def test_a_length_curriculum_draws_each_stage_from_its_seq_len():
    config = tiny_config(length_curriculum=((6, 3), (12, 2)))
    config.task = {"name": "adding", "seq_len": 20}
    task = loop.build_task(config)
    stages = loop.curriculum_stages(config)
    lengths = [loop.train_task_at(stages, task, step).spec.seq_len for step in range(7)]
    assert lengths == [6, 6, 6, 12, 12, 20, 20]
    stage = loop.train_task_at(stages, task, 4)
    expected = tasks.get_task("adding", seq_len=12, seed=config.seed).batch("train", 4, 3)
    np.testing.assert_array_equal(stage.batch("train", 4, 3)["inputs"], expected["inputs"])
    config.task = {"name": "text", "corpus": "jokes"}
    with pytest.raises(ValueError, match="config.train.length_curriculum: expected \\(\\) for"):
        config_lib.check_against_task(config, task.spec)


def test_training_with_a_curriculum_starts_as_a_run_at_its_first_length(tmp_path):
    settings = {"num_steps": 3, "log_every": 1, "eval_every": 3, "checkpoint_every": 3}
    curriculum = tiny_config(length_curriculum=((8, 2),), **settings)
    loop.train_and_evaluate(curriculum, str(tmp_path / "curriculum"))
    short = tiny_config(**settings)
    short.task.seq_len = 8
    loop.train_and_evaluate(short, str(tmp_path / "short"))
    first, second = _train_losses(tmp_path / "curriculum"), _train_losses(tmp_path / "short")
    assert [first[1], first[2]] == [second[1], second[2]]
    assert first[3] != second[3]  # step 3 trains at the task's own seq_len, 24


def test_choices_that_depend_on_the_task():
    text = tasks.get_task("text", corpus="jokes", seq_len=24).spec
    adding = tasks.get_task("adding", seq_len=10).spec
    config = tiny_config()
    config.model.pooling = "last"
    with pytest.raises(ValueError, match="config.model.pooling: expected 'none'"):
        config_lib.check_against_task(config, text)
    config.model.pooling = "none"
    with pytest.raises(ValueError, match="'last' or 'mean'"):
        config_lib.check_against_task(config, adding)
    config.model.pooling = "last"
    config.train.tbptt_length = 5
    with pytest.raises(ValueError, match="truncated BPTT needs per-step targets"):
        config_lib.check_against_task(config, adding)
    config.train.tbptt_length = 0
    config.model.bidirectional_blocks = True
    config_lib.check_against_task(config, adding)
    config.model.pooling = "none"
    with pytest.raises(ValueError, match="bidirectional_blocks: expected False for the"):
        config_lib.check_against_task(config, text)


def test_optimizer_groups_and_lru_learning_rate_factor():
    task = tasks.get_task("text", corpus="jokes", seq_len=12)
    config = tiny_config(lru_lr_factor=0.0, weight_decay=0.0)
    model = config_lib.build_model(config.model, task.spec)
    batch = task.batch("train", 0, 2)
    variables = model.init(jax.random.key(0), batch["inputs"])
    groups = param_groups(variables["params"])
    mixer = groups["blocks_0"]["mixer"]
    assert {mixer[k] for k in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im")} == {"recurrent"}
    assert mixer["C_re"] == "default" and mixer["D"] == "no_decay"
    assert groups["head"]["bias"] == "no_decay" and groups["head"]["kernel"] == "default"
    # With factor 0 the recurrent group stays put while the rest moves.
    tx = make_optimizer(config.train)
    before = jax.tree.map(np.array, variables["params"]["blocks_0"]["mixer"])
    state = TrainState.create(variables, tx)
    step = steps.make_train_step(model, tx, task.spec, seed=0)
    for i in range(3):
        state, _ = step(state, task.batch("train", i, 2))  # donates (deletes) the old state
    after = state.params["blocks_0"]["mixer"]
    for name in ("nu_log", "B_im"):
        np.testing.assert_array_equal(np.asarray(before[name]), np.asarray(after[name]))
    assert not np.allclose(np.asarray(before["C_re"]), np.asarray(after["C_re"]))


def test_the_parameter_average_follows_its_recurrence():
    """Against a numpy loop of SGD on 0.5 ||p - target||^2 and a <- d a + (1 - d) p."""
    decay, lr, target = 0.8, 0.3, np.array([1.0, -2.0, 0.5])
    tx = optax.chain(optax.sgd(lr), average_params(decay))
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    p, average = np.zeros(3), np.zeros(3)
    for _ in range(5):
        updates, opt_state = tx.update({"w": params["w"] - target}, opt_state, params)
        params = optax.apply_updates(params, updates)
        p = p - lr * (p - target)
        average = decay * average + (1 - decay) * p
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(averaged_params(opt_state)["w"]), average, rtol=1e-6)
    assert averaged_params(optax.sgd(lr).init(params)) is None


def test_evaluation_reads_the_parameter_average(tmp_path):
    """With train.ema_decay the final metrics are those of the averaged parameters, which a
    checkpoint keeps; the live parameters score differently."""
    config = tiny_config(ema_decay=0.7, num_steps=8)
    final = loop.train_and_evaluate(config, str(tmp_path))
    model, task, state, step = runs.load(runs.read_config(str(tmp_path)), str(tmp_path))
    assert step == 8
    evaluate = steps.make_eval_step(model, task.spec)

    def valid_loss(state):
        return loop.evaluate(evaluate, state, task, "valid", 4, 1)["loss"]

    np.testing.assert_allclose(valid_loss(state.for_evaluation()), final["valid"]["loss"], 1e-6)
    assert abs(valid_loss(state) - final["valid"]["loss"]) > 1e-4


def test_batchnorm_averages_are_re_estimated_for_the_parameter_average(tmp_path):
    """BatchNorm's running averages were gathered under the live parameters; evaluation of
    the averaged ones replaces them by the mean statistics of training batches: on copies of
    one batch, that batch's statistics of the first norm's input (the embedding rows of its
    tokens, computed here in numpy); and the final metrics are those of the re-estimated
    state."""
    config = tiny_config(ema_decay=0.7, num_steps=8, ema_bn_batches=3)
    config.model.update({"norm": "batch", "dropout_rate": 0.0})
    final = loop.train_and_evaluate(config, str(tmp_path))
    model, task, state, _ = runs.load(runs.read_config(str(tmp_path)), str(tmp_path))
    averaged = state.for_evaluation()
    statistics_step = steps.make_statistics_step(model, config.seed + 2)

    batch = task.batch("train", 0, 4)
    recalibrated = steps.recalibrated(statistics_step, averaged, [batch] * 3)
    rows = np.asarray(averaged.params["encoder"]["embedding"])[np.asarray(batch["inputs"])]
    stats = recalibrated.model_state["batch_stats"]["blocks_0"]["norm_layer"]
    np.testing.assert_allclose(stats["mean"], rows.mean(axis=(0, 1)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(stats["var"], rows.var(axis=(0, 1)), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(  # the parameters stay the average
        recalibrated.params["encoder"]["embedding"], averaged.params["encoder"]["embedding"]
    )
    two = [task.batch("train", index, 4) for index in (1, 2)]  # weighted equally
    embedded = [np.asarray(averaged.params["encoder"]["embedding"])[b["inputs"]] for b in two]
    stats = steps.recalibrated(statistics_step, averaged, two).model_state["batch_stats"]
    want = np.mean([e.mean(axis=(0, 1)) for e in embedded], axis=0)
    np.testing.assert_allclose(stats["blocks_0"]["norm_layer"]["mean"], want, rtol=1e-3, atol=1e-4)

    last_steps = [task.batch("train", index, 4) for index in (7, 6, 5)]
    evaluated = steps.recalibrated(statistics_step, averaged, last_steps)
    evaluate = steps.make_eval_step(model, task.spec)
    got = loop.evaluate(evaluate, evaluated, task, "valid", 4, 1)["loss"]
    np.testing.assert_allclose(got, final["valid"]["loss"], rtol=1e-6)
    assert abs(loop.evaluate(evaluate, averaged, task, "valid", 4, 1)["loss"] - got) > 1e-5


def _train_py(*args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_py_runs_a_config_file_with_overrides(tmp_path):
    run = _train_py(
        f"--config={ROOT}/configs/default.py",
        "--config.task.seq_len=16",
        "--config.model.d_model=8",
        "--config.model.num_layers=1",
        "--config.train.num_steps=3",
        "--config.train.batch_size=2",
        "--config.train.warmup_steps=1",
        "--config.generate.num_samples=2",
        "--config.generate.length=10",
        f"--workdir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["steps"] == 3 and len(final["samples"]) == 2
    assert (tmp_path / "run" / "samples.txt").exists()
    # the share of sampled words that are words of the training text (jokes and prose)
    config = config_lib.load_config(f"{ROOT}/configs/default.py")
    task = tasks.CharText(**{k: v for k, v in config.task.items() if k != "name"})
    share, count = task.known_word_share(final["samples"])
    assert final["sample_word_share"] == share
    assert f"{share:.0%} of the samples' {count} words are words of the training text" in run.stdout
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tensorboard"))
