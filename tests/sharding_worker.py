"""Runs the multi-device checks of tests/test_sharding.py in a process of its own.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_worker.py OUT

JAX fixes its device count when it starts, and the test process has already started it with one
CPU device; so this script starts with 4 forced CPU devices, runs everything that needs them
and writes the results (arrays and facts) to OUT/results.npz and OUT/facts.json. The test
process then checks them against its own 1-device runs and numpy references.
"""

import json
import os
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

from lru_jax import scan  # noqa: E402
from lru_jax.training import config as config_lib  # noqa: E402
from lru_jax.training import loop, sharding  # noqa: E402
from lru_jax.training.checkpoints import Checkpointer  # noqa: E402
from lru_jax.training.optim import make_optimizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharding_cases import SCAN_CASES, scan_inputs, scan_loss, tiny_config  # noqa: E402

# Training runs: name -> config.sharding changes. All see the same global batch of 8.
RUNS = {
    "data4": {"data": 4},
    "fsdp_seq": {"data": 2, "sequence": 2, "params": "fsdp", "fsdp_min_size": 64},
}


def train_runs(out: str) -> None:
    for name, changes in RUNS.items():
        config = tiny_config()
        config.sharding.update(changes)
        loop.train_and_evaluate(config, os.path.join(out, name))


def restore_on(devices, config, directory: str):
    """The checkpoint in `directory` restored onto a mesh over `devices` (config's sharding)."""
    task = loop.build_task(config)
    layout = sharding.layout_from_config(config, loop.time_keys(task.spec), devices)
    model = config_lib.build_model(config.model, task.spec)
    template = loop.abstract_state(model, make_optimizer(config.train), task, config, layout)
    checkpointer = Checkpointer(directory, 0)
    state = checkpointer.restore(template)
    checkpointer.close()
    return state


def restore_checks(out: str, arrays: dict, facts: dict) -> None:
    """The FSDP checkpoint saved on 4 devices, restored on 1 and on 2."""
    config = tiny_config()
    config.sharding.update({"params": "fsdp", "fsdp_min_size": 64})
    directory = os.path.join(out, "fsdp_seq", "checkpoints")
    saved_steps = set()
    for devices in (1, 2):
        config.sharding.data = devices
        state = restore_on(jax.devices()[:devices], config, directory)
        leaves = jax.tree_util.tree_leaves_with_path(state.params)
        for path, leaf in leaves:
            arrays[f"restored{devices}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        facts[f"restored{devices}_devices"] = sorted(
            {len(leaf.sharding.device_set) for _, leaf in leaves}
        )
        facts[f"restored{devices}_sharded_leaves"] = sum(
            not leaf.sharding.is_fully_replicated for _, leaf in leaves
        )
        saved_steps.add(int(state.step))
    facts["restored_steps"] = sorted(saved_steps)
    config.sharding.update({"data": 2, "sequence": 2})  # the layout the run saved from
    task = loop.build_task(config)
    layout = sharding.layout_from_config(config, loop.time_keys(task.spec))
    model = config_lib.build_model(config.model, task.spec)
    saved = loop.abstract_state(model, make_optimizer(config.train), task, config, layout)
    facts["saved_devices"] = len(layout.mesh.devices.flat)
    facts["saved_sharded_leaves"] = sum(
        not x.sharding.is_fully_replicated for x in jax.tree.leaves(saved.params)
    )


def _states_and_grads(cases):
    """One compiled program giving every case's states and gradients on the current mesh."""

    @jax.jit
    def run(arrays):
        out = []
        for (a, b, h0), (*_, kwargs) in zip(arrays, cases, strict=True):

            def loss(a, b, h0, kwargs=kwargs):
                return scan_loss(a, b, h0, sequence_axis="seq", **kwargs)

            h = scan.linear_scan(a, b, h0, sequence_axis="seq", **kwargs)
            out.append((h, jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)))
        return out

    return run


def scan_checks(arrays: dict, facts: dict) -> None:
    """The sequence-parallel scan and its gradients, on 2 and 4 sequence devices."""
    for seq in (2, 4):
        mesh = sharding.make_mesh(_sharding(4 // seq, seq))
        with jax.set_mesh(mesh):
            cases = [scan_inputs(case) for case in SCAN_CASES]
            results = _states_and_grads(cases)([(a, b, h0) for a, b, h0, _ in cases])
            for case, (h, grads) in zip(SCAN_CASES, results, strict=True):
                arrays[f"scan{seq}/{case}/h"] = np.asarray(h)
                for name, g in zip(("a", "b", "h0"), grads, strict=True):
                    arrays[f"scan{seq}/{case}/grad_{name}"] = np.asarray(g)
            if seq == 4:
                a, b, h0, _ = cases[-1]
                try:
                    scan.linear_scan(a, b[:6], h0, sequence_axis="seq")
                    facts["time6"] = "no error"
                except ValueError as err:
                    facts["time6"] = str(err)


def _sharding(data: int, seq: int):
    c = config_lib.default_config().sharding
    c.update({"data": data, "sequence": seq})
    return c


def data_checks(arrays: dict, facts: dict) -> None:
    """Per-process rows of a batch, simulating 2 processes of 2 devices each."""
    from lru_jax import tasks

    task = tasks.get_task("text", corpus="jokes", seq_len=24, seed=0)
    batch = task.batch("train", 3, 8)
    arrays["batch/inputs"] = batch["inputs"]
    for data, seq in ((4, 1), (2, 2)):
        mesh = sharding.make_mesh(_sharding(data, seq))
        layout = sharding.Layout(mesh, time_keys=loop.time_keys(task.spec))
        inputs_sharding = layout.batch_shardings(batch)["inputs"]
        devices = list(mesh.devices.flat)
        for process in (0, 1):  # process p owns devices 2p and 2p + 1 of the mesh
            mine = devices[2 * process : 2 * process + 2]
            local = sharding.local_rows(batch["inputs"], inputs_sharding, mine)
            arrays[f"rows{data}x{seq}/process{process}"] = local
        placed = layout.put_batch(batch)
        arrays[f"rows{data}x{seq}/placed"] = np.asarray(placed["inputs"])
        facts[f"rows{data}x{seq}/spec"] = str(placed["inputs"].sharding.spec)


def measure_checks(facts: dict) -> None:
    """What each device times when `scan_choices.measure` splits the state over "data" (a mesh
    of 2 data x 2 seq devices): [per-device shape of b, devices] per timed group."""
    from lru_jax import scan_choices

    timed, time_methods = [], scan_choices.time_methods

    def spy(a, b, mode, repeats):
        timed.append([list(b.addressable_shards[0].data.shape), len(b.sharding.device_set)])
        return time_methods(a, b, mode, repeats)

    scan_choices.time_methods = spy
    mesh = sharding.make_mesh(_sharding(2, 2))
    queries = [("float32", 8, 6), ("float32", 8, 5)]  # 5 elements do not split over 2
    try:
        table = scan_choices.measure(queries, ("fwd",), 1, mesh=mesh, axis=sharding.DATA)
    finally:
        scan_choices.time_methods = time_methods
    facts["measure_timed"] = timed
    facts["measure_devices"] = [e.devices for e in table.entries]


def main(out: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    arrays, facts = {}, {}
    train_runs(out)
    restore_checks(out, arrays, facts)
    scan_checks(arrays, facts)
    data_checks(arrays, facts)
    measure_checks(facts)
    np.savez(os.path.join(out, "results.npz"), **arrays)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1])
