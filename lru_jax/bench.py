"""Profiler of scans, layers and train steps: `python -m lru_jax.bench --suite scan`.

Suites (`--suite`, repeatable; `all` runs every CPU-sized one):
  scan    every `linear_scan` method over lengths x (batch, state) sizes, real and complex,
          forward ("fwd") and forward+backward ("fwd+bwd"); baseline: "sequential".
  layers  our SimpleRNN/LSTM/GRU against flax.linen's nn.RNN cells (and PyTorch's nn.RNN/LSTM/
          GRU on CPU where torch is installed), and our LRU (each method) against an
          associative-scan-only LRU written from the paper's pseudocode; fwd+bwd.
  train   train-step throughput (tokens/s) and compile time for configs in configs/.
  memory  peak memory and time of BPTT with and without rematerialisation (4-layer models).
  gpu     the scan suite at accelerator sizes (lengths up to 65,536), meant for a GPU.

Every row reports the median time and its spread (25th-75th percentile) over `--repeats` runs
after a warm-up, the speedup against the row group's baseline measured in the same run, the
compile time, the memory the backend reports (peak bytes on GPU; XLA's buffer plan on CPU) and
the achieved bandwidth or FLOP rate as a fraction of this machine's limits, which the tool
measures itself (a large elementwise copy and a large matmul). Output: a table on stdout, JSON
(`--out DIR/bench.json`), a PNG of time against length for the scan suite, and with
`--trace DIR` a `jax.profiler` trace of the timed runs. The scan and gpu suites also write
`DIR/scan_choices.json`, the fastest method per shape: load it (`lru_jax.scan_choices.load`, or
$LRU_JAX_SCAN_CHOICES) and `linear_scan(method="auto")` chooses from this machine's measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import nn as lnn
from lru_jax import scan, scan_choices

SUITES = ("scan", "layers", "train", "memory", "gpu")


@dataclasses.dataclass
class Row:
    """One measured configuration."""

    suite: str
    group: str  # rows in a group share a baseline
    name: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    cpu_ms: float  # median process CPU time per call (all threads): robust to other load
    compile_s: float
    memory_mb: float | None
    speedup: float | None = None  # baseline time / this time, same run
    work: dict = dataclasses.field(default_factory=dict)  # bytes / flops / tokens per call
    rate: str = ""  # achieved bandwidth, FLOP rate or throughput, as text
    fraction: float | None = None  # of the machine's measured limit


# Timing


def _block(tree):
    return jax.tree.map(
        lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree
    )


def _memory_mb(compiled) -> float | None:
    """Peak device memory if the backend reports it, else XLA's planned buffers (CPU)."""
    if isinstance(compiled, Eager):
        return None
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


@dataclasses.dataclass
class Eager:
    """A candidate that runs as it is, not jitted: another framework's step (e.g. PyTorch's).
    It has no compile time, and no memory figure (JAX's would not be its own)."""

    fn: Callable


def _compile(fn: Callable, args: Sequence):
    if isinstance(fn, Eager):
        return fn, 0.0
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _summary(times_ms: list[float], cpu_ms: list[float], compile_s: float, compiled) -> dict:
    q = np.percentile(times_ms, [25, 50, 75])
    return {
        "median_ms": float(q[1]),
        "p25_ms": float(q[0]),
        "p75_ms": float(q[2]),
        "cpu_ms": float(np.median(cpu_ms)),
        "compile_s": compile_s,
        "memory_mb": _memory_mb(compiled),
    }


def measure_group(
    candidates: Sequence[tuple[Callable, Sequence]],
    repeats: int,
    skip_failures: bool = False,
    check: Callable[[object], None] | None = None,
) -> list[dict]:
    """Times each `fn(*args)` of `candidates` under jit, interleaved.

    Every candidate is compiled and run once (warm-up); then `repeats` rounds run each candidate
    once in turn, so slow drifts of a shared machine hit all of them alike and ratios stay fair.
    Each round starts one candidate later, so none is always first (or always after another).
    Returns one {"median_ms", "p25_ms", "p75_ms", "cpu_ms", "compile_s", "memory_mb"} each.
    `check(output)`, if given, sees each candidate's warm-up output (in order) and raises if it
    is wrong. With `skip_failures`, a candidate whose compilation, warm-up or check
    raises gets {"error": why} instead and the others are timed as usual; without it, the error
    propagates.
    """
    ready, failed = {}, {}  # candidate index -> (compiled, compile_s) or the error's text
    for i, (fn, args) in enumerate(candidates):
        try:
            compiled, compile_s = _compile(fn, args)
            output = _block(_call(compiled, args))
            if check is not None:
                check(output)
        except Exception as err:  # any failure: this candidate cannot run at these shapes
            if not skip_failures:
                raise
            failed[i] = f"{type(err).__name__}: {err}"
        else:
            ready[i] = (compiled, compile_s)
    wall = {i: [] for i in ready}
    cpu = {i: [] for i in ready}
    order = list(ready)
    for r in range(repeats):
        for j in range(len(order)):  # rotated: none always runs first
            i = order[(r + j) % len(order)]
            _timed_call(ready[i][0], candidates[i][1], wall[i], cpu[i])
    return [
        {"error": failed[i]} if i in failed else _summary(wall[i], cpu[i], ready[i][1], ready[i][0])
        for i in range(len(candidates))
    ]


def _call(fn, args):
    return fn.fn(*args) if isinstance(fn, Eager) else fn(*args)


def _timed_call(fn, args, wall: list[float], cpu: list[float]):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = _block(_call(fn, args))
    wall.append((time.perf_counter() - start) * 1e3)
    cpu.append((time.process_time() - start_cpu) * 1e3)
    return out


def measure(fn: Callable, args: Sequence, repeats: int) -> dict:
    """`measure_group` of one candidate."""
    return measure_group([(fn, args)], repeats)[0]


def measure_named(
    group: str,
    candidates: Sequence[tuple[str, tuple[Callable, Sequence]]],
    repeats: int,
    check: Callable[[object], None] | None = None,
) -> list[tuple[str, dict]]:
    """(name, timing) of each named `(fn, args)` candidate that runs (`measure_group`). One that
    fails at these shapes (a kernel that does not compile, memory that runs out, a wrong result
    by `check`) is named on stderr and left out, so one failure does not end a run of the bench."""
    timings = measure_group([c for _, c in candidates], repeats, True, check)
    kept = []
    for (name, _), timing in zip(candidates, timings, strict=True):
        if "error" in timing:
            print(
                f"bench: {group}: {name} failed and is left out: {timing['error']}", file=sys.stderr
            )
        else:
            kept.append((name, timing))
    return kept


@dataclasses.dataclass
class Limits:
    """This machine's measured limits: elementwise copy bandwidth and float32 matmul rate."""

    copy_gbps: float
    matmul_gflops: float


def measure_limits(repeats: int = 5, copy_mib: int = 256, matmul_n: int = 2048) -> Limits:
    """Times an elementwise pass over `copy_mib` MiB of float32 (read + write) and a
    `matmul_n`^3 float32 matmul. The defaults are far larger than a CPU's caches."""
    x = jnp.ones((copy_mib * 2**18,), jnp.float32)
    copy = measure(lambda v: v * 2.0, (x,), repeats)
    n = matmul_n
    a = jnp.ones((n, n), jnp.float32)
    with jax.default_matmul_precision("float32"):
        mm = measure(lambda p, q: p @ q, (a, a), repeats)
    return Limits(
        copy_gbps=2 * x.nbytes / copy["median_ms"] / 1e6,
        matmul_gflops=2 * n**3 / mm["median_ms"] / 1e6,
    )


def _row(suite, group, name, timing, **extra) -> Row:
    return Row(suite=suite, group=group, name=name, **timing, **extra)


def _set_speedups(rows: list[Row], baseline_name: Callable[[Row], bool]) -> None:
    by_group: dict[str, float] = {}
    for r in rows:
        if baseline_name(r):
            by_group[r.group] = r.median_ms
    for r in rows:
        if r.group in by_group:
            r.speedup = by_group[r.group] / r.median_ms


def _bandwidth(row: Row, limits: Limits | None) -> None:
    gbps = row.work["bytes"] / row.median_ms / 1e6
    row.rate = f"{gbps:.1f} GB/s"
    row.fraction = None if limits is None else gbps / limits.copy_gbps


def _flop_rate(row: Row, limits: Limits) -> None:
    gflops = row.work["flops"] / row.median_ms / 1e6
    row.rate = f"{gflops:.1f} GFLOP/s"
    row.fraction = gflops / limits.matmul_gflops


# The scan suite


def scan_methods(backend: str, with_auto: bool = True) -> tuple[str, ...]:
    """Every `linear_scan` method worth timing on `backend`: Pallas only on a GPU where its
    kernel compiles and runs (`pallas_available`; else it would fail every row it is in)."""
    methods = [m for m in scan.METHODS if m != "pallas"]
    if "pallas" in scan.METHODS and backend == "gpu":
        from lru_jax.kernels.pallas_scan import pallas_available  # lazily, as scan does

        if pallas_available():
            methods.append("pallas")
    return (*methods, "auto") if with_auto else tuple(methods)


def scan_inputs(key, time_steps: int, batch: int, state: int, dtype):
    """(a [state], b [time_steps, batch, state]) of `dtype`: |a| in [0.9, 0.999], b normal."""
    ka, kb = jax.random.split(key)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        a = 0.999 * jnp.exp(1j * jax.random.uniform(ka, (state,)))
        b = jax.lax.complex(*jax.random.normal(kb, (2, time_steps, batch, state)))
    else:
        a = jax.random.uniform(ka, (state,), minval=0.9, maxval=0.999)
        b = jax.random.normal(kb, (time_steps, batch, state))
    return a.astype(dtype), b.astype(dtype)


def _scan_fns(method: str):
    def forward(a, b):
        return scan.linear_scan(a, b, method=method)

    def loss(a, b):
        h = scan.linear_scan(a, b, method=method)
        return jnp.sum(jnp.abs(h) ** 2)

    return {"fwd": forward, "fwd+bwd": jax.grad(loss, argnums=(0, 1))}


def scan_suite(
    lengths: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    dtypes: Sequence[str],
    repeats: int,
    limits: Limits,
    max_elements: int,
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
) -> list[Row]:
    """Every method at every (length, batch, state, dtype, mode) with T*B*N <= max_elements."""
    rows = []
    for dtype_name in dtypes:
        for batch, state in sizes:
            for length in lengths:
                if length * batch * state > max_elements:
                    continue
                a, b = scan_inputs(jax.random.key(0), length, batch, state, jnp.dtype(dtype_name))
                for mode in modes:
                    rows += scan_group(a, b, mode, repeats, limits)
    _set_speedups(rows, lambda r: r.name == "sequential")
    return rows


def scan_group(a, b, mode: str, repeats: int, limits: Limits | None = None) -> list[Row]:
    """Every method on one b [T, B, N], interleaved (`mode` "fwd" or "fwd+bwd"); the bandwidth
    as a fraction of `limits` if given.

    "auto" is not timed separately: it compiles to exactly the method `choose_method` names
    (`scan_summary` reports it from that row). Timed as a separate candidate, an identical
    program came out up to 1.7x slower or faster depending on what the others allocated.
    """
    length, batch, state = b.shape
    dtype_name = jnp.dtype(b.dtype).name
    group = f"{dtype_name} T={length} B={batch} N={state} {mode}"
    methods = scan_methods(jax.default_backend(), with_auto=False)
    candidates = [(m, (_scan_fns(m)[mode], (a, b))) for m in methods]
    # minimum traffic: read b, write h (and read h, b's cotangent, write two grads in backward)
    passes = 2 if mode == "fwd" else 5
    rows = []
    for method, timing in measure_named(group, candidates, repeats, _agrees_with_first(b.dtype)):
        row = _row("scan", group, method, timing)
        row.work = {
            "bytes": passes * b.nbytes,
            "length": length,
            "batch": batch,
            "state": state,
            "dtype": dtype_name,
            "mode": mode,
        }
        _bandwidth(row, limits)
        rows.append(row)
    return rows


def _agrees_with_first(dtype) -> Callable[[object], None]:
    """A `measure_group` check: every candidate's output (a pytree) equals that of the first one
    that ran (the sequential scan) to within 1e-3 of its largest magnitude (5e-2 for 16-bit
    types), so that a method giving wrong results (an untried kernel) is never timed, or chosen
    by "auto"."""
    tolerance = 1e-3 if jnp.finfo(dtype).bits >= 32 else 5e-2
    reference = []

    def check(output):
        leaves = jax.tree.leaves(output)
        if not reference:
            reference[:] = leaves
            return
        for got, want in zip(leaves, reference, strict=True):
            scale = float(jnp.max(jnp.abs(want)))
            error = float(jnp.max(jnp.abs(got - want)))
            if not error <= tolerance * scale:
                message = f"its result differs from the first method's by {error:.3g}"
                raise ValueError(f"{message} (largest magnitude {scale:.3g})")

    return check


# The layers suite


def paper_lru_forward(params, u):
    """The LRU as the paper's pseudocode runs it: materialise λ at every step, associative scan.

    An independent reference for timing (written the way minimal-LRU and S5 run it):
    u [batch, time, H] -> y [batch, time, H], vmapped over the batch.
    """
    lam = jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))
    b_norm = (params["B_re"] + 1j * params["B_im"]) * jnp.exp(params["gamma_log"])[:, None]
    c = params["C_re"] + 1j * params["C_im"]

    def one_sequence(x):
        lam_elements = jnp.repeat(lam[None], x.shape[0], axis=0)
        bu = jax.vmap(lambda v: b_norm @ v)(x)

        def binary(q, r):
            return q[0] * r[0], r[0] * q[1] + r[1]

        _, hs = jax.lax.associative_scan(binary, (lam_elements, bu))
        return jax.vmap(lambda h, v: (c @ h).real + params["D"] * v)(hs, x)

    return jax.vmap(one_sequence)(u)


def _grad_of_squares(apply):
    """fwd+bwd of sum(apply(params, x)^2) with respect to params and x."""
    return jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1))


def _module_fn(module):
    """(params, x) -> module output, for a Flax module whose variables are only params."""
    return lambda params, x: module.apply({"params": params}, x)


def _flax_rnn(cell_name: str, hidden: int):
    import flax.linen as fnn

    flax_cell = {
        "simple_rnn": fnn.SimpleCell,
        "lstm": fnn.OptimizedLSTMCell,
        "gru": fnn.GRUCell,
    }[cell_name](features=hidden)
    return fnn.RNN(flax_cell)


def rnn_flops(cell_name: str, batch: int, length: int, inputs: int, hidden: int) -> float:
    """Matmul FLOPs of fwd+bwd (3x the forward's two matmuls per step)."""
    gates = {"simple_rnn": 1, "lstm": 4, "gru": 3}[cell_name]
    return 3 * 2 * batch * length * (inputs + hidden) * gates * hidden


def rnn_layer_rows(batch, length, inputs, hidden, repeats, limits) -> list[Row]:
    """Our recurrent layers (chunked backward pass, and JAX's autodiff of the loop) against
    flax.linen nn.RNN, fwd+bwd, float32."""
    rows = []
    x = jax.random.normal(jax.random.key(1), (batch, length, inputs))
    for cell_name in ("simple_rnn", "lstm", "gru"):
        group = f"{cell_name} B={batch} T={length} in={inputs} H={hidden} fwd+bwd"
        flax_rnn = _flax_rnn(cell_name, hidden)
        flax_params = flax_rnn.init(jax.random.key(0), x)
        candidates = {
            f"flax nn.RNN({type(flax_rnn.cell).__name__})": (
                _grad_of_squares(lambda p, v, m=flax_rnn: m.apply(p, v)),
                (flax_params, x),
            )
        }
        for suffix, grad_chunk in (("", 16), (" (autodiff)", None)):
            ours = lnn.RecurrentLayer(hidden, cell=cell_name, grad_chunk=grad_chunk)
            our_params = ours.init(jax.random.key(0), x)["params"]
            candidates[f"lru_jax {cell_name}{suffix}"] = (
                _grad_of_squares(_module_fn(ours)),
                (our_params, x),
            )
        torch_step = _torch_rnn_step(cell_name, batch, length, inputs, hidden)
        if torch_step is not None:
            candidates[torch_step[0]] = (Eager(torch_step[1]), ())
        for name, timing in measure_named(group, list(candidates.items()), repeats):
            row = _row("layers", group, name, timing)
            row.work = {"flops": rnn_flops(cell_name, batch, length, inputs, hidden)}
            _flop_rate(row, limits)
            rows.append(row)
    _set_speedups(rows, lambda r: r.name.startswith("flax"))
    return rows


def _torch_rnn_step(cell_name, batch, length, inputs, hidden):
    """(row name, step) for PyTorch's nn.RNN/LSTM/GRU, fwd+bwd of the same loss as ours
    (gradients of parameters and input), or None without PyTorch or off CPU (where it would
    not be running on the device JAX is)."""
    try:
        import torch
    except ImportError:
        return None
    if jax.default_backend() != "cpu":
        return None
    module = {"simple_rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name]
    torch.manual_seed(0)
    layer = module(inputs, hidden)  # time-major, PyTorch's default and its faster layout
    x = torch.randn(length, batch, inputs, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        ys, _ = layer(x)
        (ys**2).sum().backward()

    name = f"PyTorch nn.{module.__name__} ({torch.get_num_threads()} threads)"
    return name, step


def lru_layer_rows(batch, length, width, repeats, limits) -> list[Row]:
    """Our nn.LRU (each scan method) against the paper-style associative-only LRU, fwd+bwd."""
    rows = []
    u = jax.random.normal(jax.random.key(1), (batch, length, width))
    params = lnn.LRU(width).init(jax.random.key(0), u)["params"]  # the functional params
    group = f"lru B={batch} T={length} N=H={width} fwd+bwd"
    candidates = [("paper-style associative LRU", paper_lru_forward)]
    for method in scan_methods(jax.default_backend()):
        module = lnn.LRU(width, scan_method=method)
        candidates.append((f"lru_jax lru ({method})", _module_fn(module)))
    state_bytes = batch * length * width * 8  # complex64 states
    named = [(name, (_grad_of_squares(f), (params, u))) for name, f in candidates]
    for name, timing in measure_named(group, named, repeats):
        row = _row("layers", group, name, timing)
        row.work = {"bytes": 5 * state_bytes}
        _bandwidth(row, limits)
        rows.append(row)
    _set_speedups(rows, lambda r: r.name.startswith("paper"))
    return rows


# The train and memory suites


def _load_config(path: str, overrides: dict):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with config.unlocked():
        for key, value in overrides.items():
            section, name = key.split(".")
            config[section][name] = value
    return config


def _train_step_setup(config):
    from lru_jax.training import config as config_lib
    from lru_jax.training.loop import build_task, one_device_state
    from lru_jax.training.optim import make_optimizer
    from lru_jax.training.steps import make_train_step

    config_lib.validate(config)
    task = build_task(config)
    model = config_lib.build_model(config.model, task.spec)
    tx = make_optimizer(config.train)
    state = one_device_state(model, tx, task, config)
    step = make_train_step(model, tx, task.spec, seed=0, tbptt_length=config.train.tbptt_length)
    batch = task.batch("train", 0, config.train.batch_size)
    return task, step, state, batch


def _time_train_step(step, state, batch, repeats) -> dict:
    """Like `measure`, for an already-jitted train step (state is threaded through)."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, _ = _block(compiled(state, batch))
    wall, cpu = [], []
    for _ in range(repeats):
        state, _ = _timed_call(compiled, (state, batch), wall, cpu)
    return _summary(wall, cpu, compile_s, compiled)


TRAIN_CONFIGS = (
    ("default (jokes, LRU)", "configs/default.py", {}),
    ("adding T=1000, LRU", "configs/adding.py", {}),
    ("adding T=1000, LSTM", "configs/adding.py", {"model.cell": "lstm"}),
    ("mnist1d, LRU", "configs/mnist1d.py", {}),
    ("listops, LRU", "configs/listops.py", {}),
    ("adding T=1000, 4-layer LRU", "configs/adding.py", {"model.num_layers": 4}),
)


def train_suite(config_dir: str, repeats: int) -> list[Row]:
    """Train-step throughput for the configs in TRAIN_CONFIGS."""
    rows = []
    for name, path, overrides in TRAIN_CONFIGS:
        config = _load_config(os.path.join(config_dir, os.path.basename(path)), overrides)
        task, step, state, batch = _train_step_setup(config)
        timing = _time_train_step(step, state, batch, repeats)
        row = _row("train", name, name, timing)
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
    for cell_name in ("lru", "lstm"):
        group = f"4-layer {cell_name} B=1 T={length} d_model=64 fwd+bwd"
        for remat in (False, True):
            model = models.SequenceModel(
                num_outputs=1,
                cell=cell_name,
                d_model=64,
                num_layers=4,
                d_state=64,
                pooling="none",
                remat=remat,
            )
            params = model.init(jax.random.key(1), x)["params"]

            def loss(p, v, model=model):
                return jnp.mean(model.apply({"params": p}, v) ** 2)

            name = "remat" if remat else "no remat"
            rows.append(_row("memory", group, name, measure(jax.grad(loss), (params, x), repeats)))
    _set_speedups(rows, lambda r: r.name == "no remat")
    return rows


# Output


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """A GitHub-markdown table of `rows`."""
    header = (
        "| group | name | median ms | p25-p75 ms | CPU ms | speedup | compile s | memory MB "
        "| rate | of limit |"
    )
    lines = [header, "|" + "---|" * 2 + "---:|" * 8]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.name} | {r.median_ms:.3g} | {r.p25_ms:.3g}-{r.p75_ms:.3g} | "
            f"{r.cpu_ms:.3g} | "
            f"{_fmt(r.speedup, '.2f')} | {r.compile_s:.2f} | {_fmt(r.memory_mb, '.1f')} | "
            f"{r.rate} | {_fmt(r.fraction, '.0%')} |"
        )
    return "\n".join(lines)


def load_rows(path: str) -> list[Row]:
    """The rows of a bench.json written by `--out`."""
    with open(path) as f:
        return [Row(**r) for r in json.load(f)["rows"]]


def scan_summary(rows: list[Row], backend: str | None = None) -> str:
    """One line per scan group: each method's median ms, the fastest, what "auto" picks there
    (`scan.choose_method`) and its time against the fastest."""
    groups: dict[str, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault(r.group, {})[r.name] = r
    methods = list(dict.fromkeys(r.name for r in rows))
    lines = [
        "| group | "
        + " | ".join(f"{m} ms" for m in methods)
        + " | fastest | auto picks | auto / fastest | sequential of copy bandwidth |",
        "|---|" + "---:|" * (len(methods) + 4),
    ]
    for group, by_name in groups.items():
        fastest = min(by_name.values(), key=lambda r: r.median_ms)
        work = fastest.work
        size = work["batch"] * work["state"]
        trained = work["mode"] == "fwd+bwd"
        pick = scan.choose_method(
            work["length"], size, backend, dtype=work["dtype"], differentiated=trained
        )
        ratio = f"{by_name[pick].median_ms / fastest.median_ms:.2f}" if pick in by_name else ""
        seq = by_name.get("sequential")
        share = "" if seq is None or seq.fraction is None else f"{seq.fraction:.0%}"
        times = " | ".join(f"{by_name[m].median_ms:.3g}" if m in by_name else "" for m in methods)
        lines.append(f"| {group} | {times} | {fastest.name} | {pick} | {ratio} | {share} |")
    return "\n".join(lines)


def machine_description(limits: Limits | None) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "backend": jax.default_backend(),
        "device": str(jax.local_devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
    }
    if limits is not None:
        info.update(dataclasses.asdict(limits))
    return info


def plot_scan(rows: list[Row], path: str) -> None:
    """Time against length, one line per method, one panel per (dtype, size, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    def panel(r):
        return r.work["dtype"], r.work["batch"], r.work["state"], r.work["mode"]

    panels = sorted({panel(r) for r in rows})
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):  # spare panels stay empty
        mine = [r for r in rows if panel(r) == key]
        for method in dict.fromkeys(r.name for r in mine):
            pts = sorted((r.work["length"], r.median_ms) for r in mine if r.name == method)
            ax.loglog(*zip(*pts, strict=True), marker="o", label=method)
        dtype, batch, state, mode = key
        ax.set_title(f"{dtype} B={batch} N={state} {mode}", fontsize=9)
        ax.set_xlabel("length T")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("median time (ms)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Command line


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        batch, state = item.lower().split("x")
        out.append((int(batch), int(state)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lru_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--suite", action="append", choices=(*SUITES, "all"), help="default: scan")
    p.add_argument("--lengths", type=_ints, default=None, help="scan lengths, e.g. 256,4096")
    p.add_argument(
        "--sizes", type=_sizes, default=None, help="scan batch x state, e.g. 1x64,16x256"
    )
    p.add_argument("--dtypes", default="complex64,float32", help="scan dtypes")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="scan modes")
    p.add_argument("--max-elements", type=int, default=2**25, help="skip scans with T*B*N above")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rnn-shape", type=_ints, default=[32, 256, 128, 256], help="B,T,in,H")
    p.add_argument("--lru-shape", type=_ints, default=[16, 4096, 256], help="B,T,N=H")
    p.add_argument("--memory-length", type=int, default=16384)
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--limits-size", type=_ints, default=[256, 2048], help="copy MiB, matmul n")
    p.add_argument("--out", default=None, help="directory for bench.json and plots")
    p.add_argument("--trace", default=None, help="directory for a jax.profiler trace")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: expected a positive int, got {args.repeats}")
    for mode in args.modes.split(","):
        if mode not in scan_choices.MODES:
            p.error(
                f"--modes: expected a comma-separated subset of {scan_choices.MODES}, got {mode!r}"
            )
    suites = args.suite or ["scan"]
    if "all" in suites:
        suites = [s for s in SUITES if s != "gpu"]
    args.suite = list(dict.fromkeys(suites))
    return args


def run(args: argparse.Namespace) -> dict:
    """Runs the suites `args` names; returns {"machine": ..., "rows": [...]}."""
    limits = measure_limits(args.repeats, *args.limits_size)
    print(
        f"machine limits: copy {limits.copy_gbps:.1f} GB/s, "
        f"matmul {limits.matmul_gflops:.1f} GFLOP/s"
    )
    trace = jax.profiler.trace(args.trace) if args.trace else contextlib.nullcontext()
    rows: list[Row] = []
    scan_rows: list[Row] = []
    with trace:
        for suite in args.suite:
            if suite in ("scan", "gpu"):
                gpu = suite == "gpu"
                lengths = args.lengths or (
                    [1024, 4096, 16384, 65536] if gpu else [256, 1024, 4096, 16384]
                )
                sizes = args.sizes or ([(16, 256), (1, 1024)] if gpu else [(1, 64), (16, 256)])
                new = scan_suite(
                    lengths,
                    sizes,
                    args.dtypes.split(","),
                    args.repeats,
                    limits,
                    2**28 if gpu and args.max_elements == 2**25 else args.max_elements,
                    args.modes.split(","),
                )
                scan_rows += new
            elif suite == "layers":
                batch, length, inputs, hidden = args.rnn_shape
                new = rnn_layer_rows(batch, length, inputs, hidden, args.repeats, limits)
                new += lru_layer_rows(*args.lru_shape, args.repeats, limits)
            elif suite == "train":
                new = train_suite(args.config_dir, args.repeats)
            else:
                new = memory_suite(args.memory_length, max(1, args.repeats // 2))
            print(f"\n## {suite}\n\n{format_table(new)}", flush=True)
            if suite in ("scan", "gpu"):
                print(f"\n## {suite} summary\n\n{scan_summary(new)}", flush=True)
            rows += new
    result = {"machine": machine_description(limits), "rows": [dataclasses.asdict(r) for r in rows]}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        written = ["bench.json"]
        if scan_rows:
            plot_scan(scan_rows, os.path.join(args.out, "scan.png"))
            scan_dicts = [dataclasses.asdict(r) for r in scan_rows]
            choices = scan_choices.from_rows(scan_dicts, result["machine"])
            with open(os.path.join(args.out, "scan_choices.json"), "w") as f:
                json.dump(choices, f, indent=1)
            written += ["scan.png", "scan_choices.json (load it with lru_jax.scan_choices)"]
        print(f"\nwrote {', '.join(os.path.join(args.out, w) for w in written)}")
    return result


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
