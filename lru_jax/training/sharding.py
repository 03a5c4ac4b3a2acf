"""Scaling out with JAX's SPMD machinery: the device mesh, shardings and per-process data.

The mesh has two axes:
  "data": the batch is split over its devices (data parallelism). With `params="fsdp"` each
          large parameter (and its optimiser moments) is split over them too (FSDP-style);
          XLA gathers a parameter where a step needs it whole.
  "seq":  time is split over its devices: the LRU's scans run sequence-parallel
          (`lru_jax.scan.linear_scan(..., sequence_axis="seq")`).

Shardings are explicit: the state is created with `out_shardings`, the train step is compiled
with `in_shardings`/`out_shardings`, and batches are assembled as global arrays from each
process's rows with `jax.make_array_from_process_local_data`. On one host with one device the
mesh has a single device and everything behaves as without sharding.

Config (`config.sharding`, see `lru_jax.training.config.default_config`):
  data:          devices on the "data" axis; -1: all devices not used by "seq".
  sequence:      devices on the "seq" axis (1: no sequence parallelism).
  params:        "replicated" | "fsdp".
  fsdp_min_size: parameters with fewer elements stay replicated under "fsdp".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lru_jax import _checks

DATA, SEQ = "data", "seq"
PARAM_MODES = ("replicated", "fsdp")


def mesh_shape(sharding_config, num_devices: int) -> tuple[int, int]:
    """(data, seq) devices for `num_devices` available; ValueError naming the config key."""
    data, seq = sharding_config.data, sharding_config.sequence
    if data == -1:
        if num_devices % seq:
            _checks.fail("config.sharding.sequence", f"a divisor of the {num_devices} devices", seq)
        data = num_devices // seq
    if data * seq > num_devices:
        expected = f"data x sequence devices ({data} x {seq}) at most the {num_devices} devices"
        _checks.fail("config.sharding.data", expected, data)
    return data, seq


def make_mesh(sharding_config, devices=None) -> Mesh:
    """The ("data", "seq") mesh over `devices` (default: all, across every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sharding_config, len(devices))
    # Auto axes: the compiler propagates shardings between the explicit ones we give.
    return jax.make_mesh(shape, (DATA, SEQ), (AxisType.Auto, AxisType.Auto), devices=devices)


def global_batch_size(train_config, mesh: Mesh) -> int:
    """The batch of one step over all devices: `per_device_batch_size` x data devices if set,
    else `batch_size`, which must then split evenly over the data axis."""
    devices = mesh.shape[DATA]
    if train_config.per_device_batch_size:
        return train_config.per_device_batch_size * devices
    if train_config.batch_size % devices:
        expected = f"a multiple of the {devices} devices on the mesh's data axis"
        _checks.fail("config.train.batch_size", expected, train_config.batch_size)
    return train_config.batch_size


def param_spec(shape: tuple[int, ...], data_devices: int, mode: str, min_size: int) -> P:
    """Where one parameter (or optimiser moment) lives.

    "fsdp": the largest axis that splits evenly over the data devices is sharded over "data";
    parameters below `min_size` elements (norm scales, biases, the LRU's per-state vectors)
    or with no such axis stay replicated, since gathering them costs more than it saves.
    """
    if mode == "replicated" or data_devices == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % data_devices == 0:
            return P(*([None] * axis), DATA)
    return P()


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a training run is laid out on a mesh.

    time_keys: names of the batch arrays with a time axis at position 1 (split over "seq").
    """

    mesh: Mesh
    params: str = "replicated"
    fsdp_min_size: int = 0
    time_keys: tuple[str, ...] = ("inputs",)

    @property
    def sequence_axis(self) -> str | None:
        """The mesh axis the model's scans split time over, or None."""
        return SEQ if self.mesh.shape[SEQ] > 1 else None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def state_shardings(self, abstract_state):
        """NamedShardings for every leaf of a (possibly abstract) state pytree."""
        data = self.mesh.shape[DATA]

        def one(leaf):
            spec = param_spec(tuple(leaf.shape), data, self.params, self.fsdp_min_size)
            return NamedSharding(self.mesh, spec)

        return jax.tree.map(one, abstract_state)

    def batch_shardings(self, batch: dict) -> dict[str, NamedSharding]:
        """Rows over "data", and time over "seq" for the arrays in `time_keys`.

        A batch whose rows do not split evenly (the tail of a finite split) is replicated.
        """
        shardings = {}
        for name, array in batch.items():
            if array.shape[0] % self.mesh.shape[DATA]:
                shardings[name] = self.replicated
                continue
            time = SEQ if self.sequence_axis and name in self.time_keys else None
            shardings[name] = NamedSharding(self.mesh, P(DATA, time) if time else P(DATA))
        return shardings

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch as sharded arrays, each process supplying only its own rows."""
        out = {}
        for name, sharding in self.batch_shardings(batch).items():
            array = np.asarray(batch[name])
            local = local_rows(array, sharding)
            out[name] = jax.make_array_from_process_local_data(sharding, local, array.shape)
        return out


def row_blocks(sharding: NamedSharding, shape: tuple[int, ...], devices) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of an array of `shape` [rows, ...] that `devices` hold,
    sorted."""
    num_rows = shape[0]
    index_map = sharding.devices_indices_map(tuple(shape))
    blocks = set()
    for device in devices:
        rows = index_map[device][0]
        blocks.add((rows.start or 0, num_rows if rows.stop is None else rows.stop))
    return sorted(blocks)


def local_rows(array: np.ndarray, sharding: NamedSharding, devices=None) -> np.ndarray:
    """The rows of the global `array` [rows, ...] that `devices` (default: this process's
    devices in the sharding's mesh) hold, in row order: one process's share of a batch."""
    if devices is None:
        devices = [d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index()]
    blocks = row_blocks(sharding, array.shape, devices)
    return np.concatenate([array[start:stop] for start, stop in blocks])


def layout_from_config(config, time_keys: tuple[str, ...], devices=None) -> Layout:
    """The mesh and shardings `config.sharding` asks for (over `devices`, default all)."""
    s = config.sharding
    return Layout(make_mesh(s, devices), s.params, s.fsdp_min_size, time_keys)


def abstract_state(create, key, layout: Layout):
    """What `create(key)` returns, as jax.ShapeDtypeStructs carrying the layout's shardings."""
    abstract = jax.eval_shape(create, key)
    shardings = layout.state_shardings(abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def init_state(create, key, layout: Layout):
    """Runs `create(key) -> state` compiled with the layout's state shardings.

    Returns (state, shardings): the state is born sharded, never whole on one device.
    """
    shardings = layout.state_shardings(jax.eval_shape(create, key))
    return jax.jit(create, out_shardings=shardings)(key), shardings
