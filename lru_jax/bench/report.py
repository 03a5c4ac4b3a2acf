"""The bench's results: rows, markdown tables, the scan summary and plot."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from lru_jax import scan
from lru_jax.timing import Limits


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


def row(suite, group, name, timing, **extra) -> Row:
    return Row(suite=suite, group=group, name=name, **timing, **extra)


def set_speedups(rows: list[Row], baseline_name: Callable[[Row], bool]) -> None:
    by_group: dict[str, float] = {}
    for r in rows:
        if baseline_name(r):
            by_group[r.group] = r.median_ms
    for r in rows:
        if r.group in by_group:
            r.speedup = by_group[r.group] / r.median_ms


def bandwidth(row: Row, limits: Limits | None) -> None:
    gbps = row.work["bytes"] / row.median_ms / 1e6
    row.rate = f"{gbps:.1f} GB/s"
    row.fraction = None if limits is None else gbps / limits.copy_gbps


def flop_rate(row: Row, limits: Limits) -> None:
    gflops = row.work["flops"] / row.median_ms / 1e6
    row.rate = f"{gflops:.1f} GFLOP/s"
    row.fraction = gflops / limits.matmul_gflops


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
