"""A timing harness: compile, warm up, time candidates in interleaved rounds, check results.

The lowest measuring layer: it knows nothing of scans or models (`lru_jax.scan_choices` times
the scan methods with it, `lru_jax.bench` everything else). A timing is a dict
{"median_ms", "p25_ms", "p75_ms", "cpu_ms", "compile_s", "memory_mb"} over the timed runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Eager:
    """A candidate that runs as it is, not jitted: another framework's step (e.g. PyTorch's).
    It has no compile time, and no memory figure (JAX's would not be its own)."""

    fn: Callable


def block(tree):
    """`tree` once every array in it is computed."""
    return jax.tree.map(
        lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree
    )


def memory_mb(compiled) -> float | None:
    """Peak device memory if the backend reports it, else XLA's planned buffers (CPU)."""
    if isinstance(compiled, Eager):
        return None
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return planned_mb(compiled)


def planned_mb(compiled) -> float | None:
    """XLA's buffer plan of a compiled function (arguments, outputs and temporaries, less what
    is aliased) in MiB, on any backend; None where the backend does not report it. Unlike a
    device's peak, which is the process's so far, it is the one function's own."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


def compile_timed(fn: Callable, args: Sequence):
    """(`fn` jitted and compiled for `args`, seconds it took); an `Eager` fn as it is."""
    if isinstance(fn, Eager):
        return fn, 0.0
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def call(fn, args):
    return fn.fn(*args) if isinstance(fn, Eager) else fn(*args)


def timed_call(fn, args, wall: list[float], cpu: list[float]):
    """`fn(*args)`, appending its wall and process CPU milliseconds to `wall` and `cpu`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = block(call(fn, args))
    wall.append((time.perf_counter() - start) * 1e3)
    cpu.append((time.process_time() - start_cpu) * 1e3)
    return out


def summary(times_ms: list[float], cpu_ms: list[float], compile_s: float, compiled) -> dict:
    """The timing of runs that took `times_ms` (wall) and `cpu_ms` (process CPU)."""
    q = np.percentile(times_ms, [25, 50, 75])
    return {
        "median_ms": float(q[1]),
        "p25_ms": float(q[0]),
        "p75_ms": float(q[2]),
        "cpu_ms": float(np.median(cpu_ms)),
        "compile_s": compile_s,
        "memory_mb": memory_mb(compiled),
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
    Returns one timing each (see the module docstring).
    `check(output)`, if given, sees each candidate's warm-up output (in order) and raises if it
    is wrong. With `skip_failures`, a candidate whose compilation, warm-up or check
    raises gets {"error": why} instead and the others are timed as usual; without it, the error
    propagates.
    """
    ready, failed = {}, {}  # candidate index -> (compiled, compile_s) or the error's text
    for i, (fn, args) in enumerate(candidates):
        try:
            compiled, compile_s = compile_timed(fn, args)
            output = block(call(compiled, args))
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
            timed_call(ready[i][0], candidates[i][1], wall[i], cpu[i])
    return [
        {"error": failed[i]} if i in failed else summary(wall[i], cpu[i], ready[i][1], ready[i][0])
        for i in range(len(candidates))
    ]


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
                f"timing: {group}: {name} failed and is left out: {timing['error']}",
                file=sys.stderr,
            )
        else:
            kept.append((name, timing))
    return kept


def agrees_with_first(dtype) -> Callable[[object], None]:
    """A `measure_group` check: every candidate's output (a pytree) equals that of the first one
    that ran to within 1e-3 of its largest magnitude (5e-2 for 16-bit types), so that a
    candidate giving wrong results (an untried kernel) is never timed."""
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
                message = f"its result differs from the first candidate's by {error:.3g}"
                raise ValueError(f"{message} (largest magnitude {scale:.3g})")

    return check


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


def machine_description(limits: Limits | None = None) -> dict:
    """This process's backend, device, platform and jax version (and `limits`, if given)."""
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
