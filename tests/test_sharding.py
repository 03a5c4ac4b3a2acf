"""Scaling out on forced host CPU devices.

One subprocess (tests/sharding_worker.py) starts JAX with 4 CPU devices and trains, restores
and scans there, and train.py runs as two processes of 2 CPU devices each (a 2-host run on one
machine, measuring its scan choices in both); this process (1 device) checks their results
against its own 1-device training, a numpy loop and the plain scan's gradients.
"""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from sharding_cases import SCAN_CASES, scan_inputs, scan_loss, tiny_config

from lru_jax import scan
from lru_jax.training import config as config_lib
from lru_jax.training import loop, sharding
from lru_jax.training.checkpoints import Checkpointer
from lru_jax.training.metrics import read_jsonl
from lru_jax.training.optim import make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = ("data4", "fsdp_seq")  # the worker's runs: 4 data devices; 2 data x 2 seq with FSDP


def _cpu_env(devices: int) -> dict:
    """The environment of a subprocess with `devices` forced host CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args, devices: int, log):
    """A subprocess with `devices` forced host CPU devices, its output going to `log`."""
    env = _cpu_env(devices)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=out, stderr=err)


# Gloo (the CPU collectives) prints "[Gloo] Rank R is connected to N peer ranks. ..." from
# several threads at once, so its messages can arrive interleaved piece by piece (a rank number
# cut off from its message, or glued to the next "[Gloo]"): words from that message and numbers
# are all such output may hold.
GLOO_WORDS = frozenset(
    "[Gloo] Rank is connected to peer ranks. Expected number of connected peer ranks is :".split()
)


def _only_gloo_messages(text: str) -> bool:
    words = text.replace("[Gloo]", " [Gloo] ").split()
    return all(w in GLOO_WORDS or w.isdigit() for w in words)


def _wait(proc, log) -> str:
    """Waits for `proc`; returns its stdout, failing with its stderr if it failed."""
    proc.wait(timeout=900)
    with open(f"{log}.err") as err:
        assert proc.returncode == 0, err.read()[-5000:]
    with open(f"{log}.out") as out:
        return out.read()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Starts the subprocesses at once, to overlap with each other and this process's own
    1-device run: the 4-device worker (tests/sharding_worker.py), and train.py as 2 processes
    of 2 CPU devices each (a 2-host run on one machine)."""
    tmp = tmp_path_factory.mktemp("sharding")
    worker = _start([os.path.join(HERE, "sharding_worker.py"), str(tmp)], 4, tmp / "worker")
    config_file = tmp / "tiny.py"
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {HERE!r})\n"
        "from sharding_cases import tiny_config\n\n\n"
        "def get_config():\n"
        "    c = tiny_config()\n"
        "    c.sharding.update({'params': 'fsdp', 'fsdp_min_size': 64})\n"
        "    c.train.scan_choices = 'measure'  # both processes measure, take process 0's\n"
        "    return c\n"
    )
    address = f"localhost:{_free_port()}"
    processes = [
        _start(
            [os.path.join(ROOT, "train.py"), f"--config={config_file}"]
            + [f"--workdir={tmp / 'two_processes'}", f"--coordinator_address={address}"]
            + ["--num_processes=2", f"--process_id={i}"],
            2,
            tmp / f"process{i}",
        )
        for i in range(2)
    ]
    yield tmp, worker, processes
    for proc in (worker, *processes):  # only if a test failed before waiting for them
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def worker(launched):
    """(out directory, arrays, facts) of the 4-device worker."""
    out, proc, _ = launched
    _wait(proc, out / "worker")
    with np.load(out / "results.npz") as results:
        arrays = dict(results)
    with open(out / "facts.json") as f:
        facts = json.load(f)
    return out, arrays, facts


@pytest.fixture(scope="module")
def two_processes(launched):
    """(workdir, stdout of process 0, stdout of process 1) of the 2-process run."""
    out, _, processes = launched
    stdouts = [_wait(p, out / f"process{i}") for i, p in enumerate(processes)]
    return out / "two_processes", *stdouts


@pytest.fixture(scope="module")
def single(launched, tmp_path_factory):
    """The same training on this process's first device alone (while the others run)."""
    workdir = tmp_path_factory.mktemp("one_device")
    config = tiny_config()
    config.sharding.data = 1
    loop.train_and_evaluate(config, str(workdir))
    return workdir


def _restore_here(workdir):
    """A run's last checkpoint restored onto this process's one device: params as numpy."""
    config = tiny_config()
    config.sharding.data = 1
    task = loop.build_task(config)
    layout = sharding.layout_from_config(config, loop.time_keys(task.spec), jax.devices()[:1])
    model = config_lib.build_model(config.model, task.spec)
    target = loop.abstract_state(model, make_optimizer(config.train), task, config, layout)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), 0)
    state = checkpointer.restore(target)
    checkpointer.close()
    assert {d for leaf in jax.tree.leaves(state) for d in leaf.sharding.device_set} == {
        jax.devices()[0]
    }
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _losses(workdir, split):
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in records if r["split"] == split}


@pytest.mark.parametrize("run", RUNS)
def test_four_device_training_equals_one_device_training(worker, single, run):
    out, _, _ = worker
    ours, theirs = _losses(single, "train"), _losses(out / run, "train")
    assert ours.keys() == theirs.keys() == {2, 4}
    for step in ours:
        np.testing.assert_allclose(theirs[step], ours[step], rtol=1e-5)
    np.testing.assert_allclose(
        _losses(out / run, "valid")[4], _losses(single, "valid")[4], rtol=1e-5
    )
    final_one, final_four = _restore_here(single), _restore_here(out / run)
    assert final_one.keys() == final_four.keys()
    for name, value in final_one.items():
        np.testing.assert_allclose(final_four[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_two_processes_train_like_one_device_and_only_process_0_writes(two_processes, single):
    workdir, stdout0, stdout1 = two_processes
    for split in ("train", "valid"):
        ours, theirs = _losses(single, split), _losses(workdir, split)
        assert ours.keys() == theirs.keys()
        for step in ours:
            np.testing.assert_allclose(theirs[step], ours[step], rtol=1e-5)
    final_one, final_two = _restore_here(single), _restore_here(workdir)
    for name, value in final_one.items():
        np.testing.assert_allclose(final_two[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert "final: valid" in stdout0 and _only_gloo_messages(stdout1)
    assert sorted(os.listdir(workdir)) == [
        "checkpoints",
        "config.json",
        "config_history.jsonl",
        "final_metrics.json",
        "metrics.jsonl",
        "scan_choices.json",
        "tensorboard",
    ]
    for step in os.listdir(workdir / "checkpoints"):  # process 0's manifest of all the shards
        assert (workdir / "checkpoints" / step / "checksums.json").exists()
    with open(workdir / "scan_choices.json") as f:  # the tiny LRU's one scan, both passes:
        entries = json.load(f)["entries"]  # 24 steps, global batch 8 x d_state 8, split 4 ways
    assert {(e["time"], e["state_size"], e["mode"], e["devices"]) for e in entries} == {
        (24, 64, "fwd", 4),
        (24, 64, "fwd+bwd", 4),
    }


def test_checkpoint_saved_on_four_devices_restores_on_one_and_two(worker):
    out, arrays, facts = worker
    assert facts["restored_steps"] == [4]
    assert facts["saved_devices"] == 4 and facts["saved_sharded_leaves"] > 0
    assert facts["restored1_devices"] == [1] and facts["restored2_devices"] == [2]
    assert facts["restored2_sharded_leaves"] > 0  # FSDP on 2 devices: some params split
    here = _restore_here(out / "fsdp_seq")  # and in this 1-device process
    for name, value in here.items():
        np.testing.assert_array_equal(arrays[f"restored1/{name}"], value)
        np.testing.assert_array_equal(arrays[f"restored2/{name}"], value)


def numpy_scan(a, b, h0, reverse=False, resets=None, method=None):
    """h_t = a_t h_{t-1} + b_t one step at a time in float64/complex128."""
    del method
    b = np.asarray(b, np.complex128)
    a = np.broadcast_to(np.asarray(a, np.complex128), b.shape)
    h, out = np.asarray(h0, np.complex128), np.zeros_like(b)
    for t in range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0]):
        decay = a[t] if resets is None else np.where(resets[t][:, None], 0, a[t])
        h = decay * h + b[t]
        out[t] = h
    return out


@functools.cache  # both device counts compare against the same gradients: computed once
def _plain_gradients(case):
    a, b, h0, kwargs = scan_inputs(case)
    return jax.jit(jax.grad(functools.partial(scan_loss, **kwargs), argnums=(0, 1, 2)))(a, b, h0)


@pytest.mark.parametrize("devices", (2, 4))
@pytest.mark.parametrize("case", SCAN_CASES)
def test_sequence_parallel_scan_equals_numpy_loop_and_plain_gradients(worker, case, devices):
    _, arrays, _ = worker
    a, b, h0, kwargs = scan_inputs(case)
    h = arrays[f"scan{devices}/{case}/h"]
    np.testing.assert_allclose(h, numpy_scan(a, b, h0, **kwargs), rtol=1e-5, atol=1e-5)
    plain = _plain_gradients(case)
    for name, expected in zip(("a", "b", "h0"), plain, strict=True):
        got = arrays[f"scan{devices}/{case}/grad_{name}"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4, err_msg=name)


def test_each_process_supplies_its_rows_of_the_global_batch(worker):
    _, arrays, facts = worker
    expected = arrays["batch/inputs"]  # [8, 24]
    for mesh in ("4x1", "2x2"):
        halves = [arrays[f"rows{mesh}/process{p}"] for p in (0, 1)]
        assert [h.shape for h in halves] == [(4, 24), (4, 24)]
        np.testing.assert_array_equal(np.concatenate(halves), expected)
        np.testing.assert_array_equal(arrays[f"rows{mesh}/placed"], expected)
    assert facts["rows4x1/spec"] == str(P("data"))
    assert facts["rows2x2/spec"] == str(P("data", "seq"))


def _mesh(data, seq=1):
    return AbstractMesh((data, seq), ("data", "seq"))


def test_measured_scan_choices_time_each_devices_part_of_the_state(worker):
    """On 2 data x 2 seq devices, `scan_choices.measure(..., axis="data")` times b [8, 1, 6] as
    [8, 1, 3] per device on all 4 (replicated over seq), as a data-parallel step splits its
    scans; a state of 5 elements, which does not split, is timed whole on one device. The
    table's entries record the 2-way split their sizes assume."""
    _, _, facts = worker
    assert facts["measure_timed"] == [[[8, 1, 5], 1], [[8, 1, 3], 4]]
    assert facts["measure_devices"] == [2, 2]


def test_device_counts_that_do_not_fit_are_named():
    train = tiny_config().train
    with pytest.raises(ValueError, match=r"config\.train\.batch_size: .*multiple of the 3"):
        sharding.global_batch_size(train, _mesh(3))
    assert sharding.global_batch_size(train, _mesh(4)) == 8
    train.per_device_batch_size = 3
    assert sharding.global_batch_size(train, _mesh(4)) == 12
    s = tiny_config().sharding
    s.data = 8
    with pytest.raises(ValueError, match=r"config\.sharding\.data: .*8 x 1.*4 devices"):
        sharding.mesh_shape(s, 4)
    s.data, s.sequence = -1, 3
    with pytest.raises(ValueError, match=r"config\.sharding\.sequence: .*divisor of the 4"):
        sharding.mesh_shape(s, 4)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("sequence", 5, r"config\.sharding\.sequence: expected a divisor of the task's seq_len"),
        ("params", "zero3", r"config\.sharding\.params: expected one of"),
        ("data", 0, r"config\.sharding\.data: expected a positive int"),
    ],
)
def test_bad_sharding_config_values_are_named(key, value, match):
    config = tiny_config()
    config.sharding[key] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config)
        config_lib.check_against_task(config, loop.build_task(config).spec)


def test_sequence_parallelism_needs_the_lru():
    config = tiny_config()
    config.model.mixer = "gru"
    config.sharding.sequence = 2
    with pytest.raises(ValueError, match=r"config\.sharding\.sequence: expected 1 for mixer 'gru'"):
        config_lib.validate(config)


def test_fsdp_splits_the_largest_divisible_axis_of_large_parameters():
    assert sharding.param_spec((16, 256), 4, "fsdp", 64) == P(None, "data")
    assert sharding.param_spec((256, 6), 4, "fsdp", 64) == P("data")
    assert sharding.param_spec((250, 6), 4, "fsdp", 64) == P()  # no axis divides
    assert sharding.param_spec((7, 12), 4, "fsdp", 0) == P(None, "data")
    assert sharding.param_spec((32,), 4, "fsdp", 64) == P()  # small: replicated
    assert sharding.param_spec((16, 256), 4, "replicated", 0) == P()


def test_sequence_axis_must_name_a_mesh_axis_dividing_time(worker):
    _, _, facts = worker
    assert "sequence_axis: the 6 time steps do not split into 4 equal blocks" in facts["time6"]
    a, b, h0, _ = scan_inputs("invariant_complex")
    with pytest.raises(ValueError, match=r"sequence_axis: expected an axis of the current mesh"):
        scan.linear_scan(a, b, h0, sequence_axis="seq")
    mesh = jax.make_mesh((1, 1), ("data", "seq"))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"sequence_axis: expected an axis.*'time'"):
            scan.linear_scan(a, b, h0, sequence_axis="time")
