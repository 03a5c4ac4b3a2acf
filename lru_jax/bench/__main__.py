"""The bench's command line: `python -m lru_jax.bench --suite scan --out DIR` (see the package
docstring for the suites and outputs)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os

import jax

import lru_jax.bench as package
from lru_jax import scan_choices, timing
from lru_jax.bench import layer_suite, report, scan_suite, train_suite
from lru_jax.bench.report import Row

SUITES = ("scan", "layers", "train", "memory", "gpu")
SCAN_DTYPES = ("float32", "complex64", "float64", "complex128", "bfloat16", "float16")
WIDE_DTYPES = {"float64": "float32", "complex128": "complex64"}  # what JAX runs without x64


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        batch, state = item.lower().split("x")
        out.append((int(batch), int(state)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lru_jax.bench", description=package.__doc__.split("\n")[0]
    )
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
    p.add_argument(
        "--mixer-shape", type=_ints, default=[16, 1024, 128], help="B,T,H=N of the mixers"
    )
    p.add_argument(
        "--mixers", default=None, help="mixer rows to time, e.g. lru,mamba (default all)"
    )
    p.add_argument("--memory-length", type=int, default=16384)
    p.add_argument(
        "--selective-shape", type=_ints, default=[8, 4096, 512, 16], help="B,T,D,N of the scan"
    )
    p.add_argument(
        "--precision",
        action="store_true",
        help="layers suite: also each mixer in bfloat16 against float32 (at --mixer-shape)",
    )
    p.add_argument(
        "--rnn-profile",
        action="store_true",
        help="layers suite: also the LSTM and GRU split into matmuls and loop (at --rnn-shape)",
    )
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--limits-size", type=_ints, default=[256, 2048], help="copy MiB, matmul n")
    p.add_argument("--out", default=None, help="directory for bench.json and plots")
    p.add_argument("--trace", default=None, help="directory for a jax.profiler trace")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: expected a positive int, got {args.repeats}")
    for dtype in args.dtypes.split(","):
        if dtype not in SCAN_DTYPES:
            p.error(f"--dtypes: expected a comma-separated subset of {SCAN_DTYPES}, got {dtype!r}")
        if dtype in WIDE_DTYPES and not jax.config.jax_enable_x64:
            p.error(
                f"--dtypes: {dtype} needs 64-bit JAX (JAX_ENABLE_X64=1); without it JAX "
                f"computes in {WIDE_DTYPES[dtype]}"
            )
    for mode in args.modes.split(","):
        if mode not in scan_choices.MODES:
            p.error(
                f"--modes: expected a comma-separated subset of {scan_choices.MODES}, got {mode!r}"
            )
    if args.mixers is not None:
        known = sorted({layer_suite.mixer_kind(n) for n in layer_suite.mixer_modules(1)})
        args.mixers = args.mixers.split(",")
        unknown = [m for m in args.mixers if m not in known]
        if unknown:
            p.error(f"--mixers: expected a comma-separated subset of {known}, got {unknown}")
    suites = args.suite or ["scan"]
    if "all" in suites:
        suites = [s for s in SUITES if s != "gpu"]
    args.suite = list(dict.fromkeys(suites))
    return args


def run(args: argparse.Namespace) -> dict:
    """Runs the suites `args` names; returns {"machine": ..., "rows": [...]}."""
    limits = timing.measure_limits(args.repeats, *args.limits_size)
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
                new = scan_suite.scan_suite(
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
                new = layer_suite.rnn_layer_rows(
                    batch, length, inputs, hidden, args.repeats, limits
                )
                if args.rnn_profile:
                    new += layer_suite.rnn_profile_rows(batch, length, inputs, hidden, args.repeats)
                if args.precision:
                    shape = args.mixer_shape
                    new += layer_suite.mixer_precision_rows(*shape, args.repeats)
                new += layer_suite.lru_layer_rows(*args.lru_shape, args.repeats, limits)
                new += layer_suite.mixer_layer_rows(
                    *args.mixer_shape, args.repeats, limits, args.mixers
                )
            elif suite == "train":
                new = train_suite.train_suite(args.config_dir, args.repeats)
            else:
                new = train_suite.memory_suite(args.memory_length, max(1, args.repeats // 2))
                new += layer_suite.selective_scan_rows(
                    *args.selective_shape, max(1, args.repeats // 2)
                )
            print(f"\n## {suite}\n\n{report.format_table(new)}", flush=True)
            if suite in ("scan", "gpu"):
                print(f"\n## {suite} summary\n\n{report.scan_summary(new)}", flush=True)
            rows += new
    result = {
        "machine": timing.machine_description(limits),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        written = ["bench.json"]
        if scan_rows:
            report.plot_scan(scan_rows, os.path.join(args.out, "scan.png"))
            table = scan_suite.table_of(scan_rows, result["machine"])
            scan_choices.save(table, os.path.join(args.out, "scan_choices.json"))
            written += ["scan.png", "scan_choices.json (read it with lru_jax.scan_choices.load)"]
        print(f"\nwrote {', '.join(os.path.join(args.out, w) for w in written)}")
    return result


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
