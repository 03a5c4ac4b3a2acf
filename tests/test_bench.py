"""The profiler: its LRU reference is a correct LRU, and a tiny run yields well-formed results."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import numpy_lru

from lru_jax import lru, models, scan, scan_choices
from lru_jax.bench import __main__ as cli
from lru_jax.bench import layer_suite, report


def test_paper_style_reference_lru_matches_a_numpy_loop():
    """The associative-only LRU the layers suite times against computes the LRU."""
    params = lru.init(jax.random.key(0), 3, 5, r_min=0.5, r_max=0.9)  # H=3, N=5
    u = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
    got = layer_suite.paper_lru_forward(params, jnp.asarray(u))
    np_params = jax.tree.map(np.asarray, params)
    want, _ = numpy_lru(np_params, u.swapaxes(0, 1))  # numpy_lru is time-major
    np.testing.assert_allclose(np.asarray(got), want.swapaxes(0, 1), atol=1e-5)


def test_the_layers_suite_times_every_new_recurrent_mixer():
    kinds = {layer_suite.mixer_kind(n) for n in layer_suite.mixer_modules(4)}
    assert kinds == set(models.RECURRENT_MIXERS) - {"gru", "simple_rnn"}
    chosen = layer_suite.mixer_modules(4, ["s5"])
    assert {layer_suite.mixer_kind(n) for n in chosen} == {"lstm", "s5"}


def test_a_tiny_run_writes_a_table_json_and_plot(tmp_path, capsys):
    args = cli.parse_args(
        [
            "--suite=scan",
            "--suite=layers",
            "--lengths=8",
            "--sizes=2x4",
            "--dtypes=complex64",
            "--modes=fwd",
            "--repeats=2",
            "--rnn-shape=2,5,3,4",
            "--lru-shape=2,6,4",
            "--mixer-shape=2,6,4",
            "--mixers=mamba",  # the LSTM (the baseline) and one more: the rows' machinery
            "--limits-size=1,64",
            f"--out={tmp_path}",
        ]
    )
    result = cli.run(args)
    with open(os.path.join(tmp_path, "bench.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert os.path.getsize(os.path.join(tmp_path, "scan.png")) > 0
    rows = result["rows"]
    scan_rows = [r for r in rows if r["suite"] == "scan"]
    methods = scan_choices.methods_to_time(jax.default_backend())
    assert len(scan_rows) == len(methods)  # one length, every method
    for r in rows:
        assert 0 < r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        if r["name"] in ("sequential", "paper-style associative LRU") or r["name"].startswith(
            "flax"
        ):
            assert r["speedup"] == 1.0  # the baseline of its group
    names = {r["name"] for r in rows if r["suite"] == "layers"}
    want = {"flax nn.RNN(OptimizedLSTMCell)", "lru_jax lstm", "lru_jax lstm (autodiff)"}
    assert want | {"lru_jax lru (auto)"} <= names
    mixer_groups = {r["group"] for r in rows if r["group"].startswith("mixers")}
    assert mixer_groups == {"mixers B=2 T=6 H=N=4 fwd", "mixers B=2 T=6 H=N=4 fwd+bwd"}
    assert set(layer_suite.mixer_modules(4, ["mamba"])) <= names
    if jax.default_backend() == "cpu":  # PyTorch's layers join on CPU (torch is a test extra)
        torch_rows = [r for r in rows if r["name"].startswith("PyTorch nn.")]
        assert {r["name"].split(" ")[1] for r in torch_rows} == {"nn.RNN", "nn.LSTM", "nn.GRU"}
        assert all(r["compile_s"] == 0.0 and r["memory_mb"] is None for r in torch_rows)
    out = capsys.readouterr().out
    assert "| group | name | median ms" in out
    saved = report.load_rows(os.path.join(tmp_path, "bench.json"))
    summary = report.scan_summary([r for r in saved if r.suite == "scan"])
    assert summary in out and "auto / fastest" in summary
    assert len(summary.splitlines()) == 3  # header, rule, one group

    # The measured choices: passed the table, "auto" runs the method that was fastest here.
    fastest = min(scan_rows, key=lambda r: r["median_ms"])["name"]
    table = scan_choices.load(os.path.join(tmp_path, "scan_choices.json"))
    assert table.backend == jax.default_backend()
    assert table.to_json()["entries"] == [
        {
            "dtype": "complex64",
            "time": 8,
            "state_size": 8,
            "mode": "fwd",
            "times_ms": {r["name"]: r["median_ms"] for r in scan_rows},
            "devices": 1,
        }
    ]
    chosen = scan.choose_method(8, 8, dtype=jnp.complex64, differentiated=False, scan_table=table)
    assert chosen == fastest


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        cli.parse_args(["--repeats=0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite=nonsense"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--modes=bwd"])


def test_the_command_line_runs_as_a_module():
    """`python -m lru_jax.bench` is the package's __main__: the flags as documented."""
    done = subprocess.run(
        [sys.executable, "-m", "lru_jax.bench", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--suite", "--lengths", "--sizes", "--modes", "--out", "--trace"):
        assert flag in done.stdout


def test_the_precision_rows_time_a_mixer_in_bfloat16_against_float32():
    assert cli.parse_args(["--precision"]).precision and not cli.parse_args([]).precision
    lru_only = {"lru_jax lru": layer_suite.mixer_modules(4)["lru_jax lru"]}
    rows = layer_suite.mixer_precision_rows(2, 6, 4, 2, lru_only)
    assert [r.name for r in rows] == ["lru_jax lru float32", "lru_jax lru bfloat16"]
    assert {r.group for r in rows} == {"lru_jax lru B=2 T=6 H=N=4 fwd+bwd float32 vs bfloat16"}
    assert rows[0].speedup == 1.0  # float32 is the baseline
    assert rows[1].speedup == rows[0].median_ms / rows[1].median_ms


def test_the_rnn_profile_times_the_matmuls_it_names():
    """The profile's parts compute what their names say (numpy loops of the same steps)."""
    named = dict(layer_suite.rnn_profile_candidates("lstm", 2, 3, 4, 5))  # B, T, in, H
    fn, (x, w, h, dz) = named["batched matmuls (projection, weight gradients)"]
    x, w, h, dz = (np.asarray(v, np.float64) for v in (x, w, h, dz))
    flat = dz.reshape(-1, 20)
    for got, want in zip(fn(x, w, h, dz), (x @ w, flat @ w.T, x.T @ flat, h.T @ flat), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    fn, (u, dz) = named["step-by-step matmuls (h U, g Uᵀ)"]
    u, dz_np = np.asarray(u, np.float64), np.asarray(dz, np.float64)
    forward, backward = np.zeros((2, 5)), np.zeros((2, 5))
    for t in range(3):
        forward = 0.5 * (forward @ u)[:, :5] + dz_np[t, :, :5]
        backward = 0.5 * (np.tile(backward, (1, 4)) + dz_np[t]) @ u.T
    for got, want in zip(fn(u, dz), (forward, backward), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    fn, args = named["lru_jax lstm"]
    grads = fn(*args)
    assert jax.tree.map(np.shape, grads[0]) == jax.tree.map(np.shape, args[0])
