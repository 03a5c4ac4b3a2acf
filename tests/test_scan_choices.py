"""`linear_scan(method="auto")` from a table of measurements passed to it (a ScanTable), and
measuring one (lru_jax.scan_choices)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import scan_choices
from lru_jax.scan import choose_method, linear_scan
from lru_jax.scan_table import ScanTable


def _entry(time, size, mode, times, dtype="complex64"):
    return {"dtype": dtype, "time": time, "state_size": size, "mode": mode, "times_ms": times}


# A made-up GPU table: associative wins long scans, sequential short ones; the forward-only
# and real-valued entries disagree, so the lookup's preferences show.
TABLE = {
    "backend": "gpu",
    "entries": [
        _entry(256, 4096, "fwd+bwd", {"sequential": 1.0, "associative": 2.0, "pallas": 3.0}),
        _entry(65536, 4096, "fwd+bwd", {"sequential": 90.0, "associative": 9.0, "pallas": 8.0}),
        _entry(65536, 4096, "fwd", {"sequential": 1.0, "associative": 9.0}),
        _entry(256, 4096, "fwd+bwd", {"sequential": 5.0, "chunked": 1.0}, dtype="float32"),
    ],
}


GPU = ScanTable.from_json(TABLE)


def test_nearest_measured_shape_of_the_same_kind_decides():
    complex64 = jnp.complex64

    def choose(time, size, **kw):
        return choose_method(time, size, scan_table=GPU, **kw)

    assert choose(300, 4096, backend="gpu", dtype=complex64) == "sequential"
    assert choose(30000, 2048, backend="gpu", dtype=complex64) == "pallas"
    assert choose(30000, 2048, backend="gpu", dtype=complex64, allow_pallas=False) == (
        "associative"
    )
    # real scans use the real entries where there are any (here only a short one)
    assert choose(30000, 2048, backend="gpu", dtype=jnp.float32) == "chunked"
    assert choose(1, 4096, backend="gpu") == "sequential"  # one step: nothing to choose
    # a table of another backend is not used: the built-in rule applies
    assert choose(65536, 4096, backend="cpu") == "sequential"


def test_without_a_table_the_built_in_rule_applies():
    assert choose_method(4096, 256, backend="cpu") == "sequential"
    assert choose_method(4096, 256, backend="gpu") == "associative"
    assert choose_method(1, 256, backend="tpu") == "sequential"


def _other_than_built_in(time, size):
    """(the built-in rule's forward method at this shape, another one) on this backend."""
    built_in = choose_method(time, size, dtype=jnp.complex64, differentiated=False)
    return built_in, "associative" if built_in == "sequential" else "sequential"


def _table(time, size, times, mode="fwd"):
    entries = [_entry(time, size, mode, times)]
    return ScanTable.from_json({"backend": jax.default_backend(), "entries": entries})


def test_auto_compiles_to_the_measured_choice_of_the_table_it_is_given():
    """A table for this backend passed to `linear_scan` changes what "auto" runs; the values
    are the scan's."""
    built_in, other = _other_than_built_in(64, 3)
    table = _table(64, 3, {built_in: 2.0, other: 1.0})
    a, b = jnp.full((3,), 0.5, jnp.complex64), jnp.ones((64, 3), jnp.complex64)

    def primitives(method, scan_table=None):
        scan_fn = lambda a, b: linear_scan(a, b, method=method, scan_table=scan_table)  # noqa: E731
        return _primitives(jax.make_jaxpr(scan_fn)(a, b).jaxpr)

    assert primitives("auto", table) == primitives(other) != primitives(built_in)
    assert primitives("auto") == primitives(built_in)
    np.testing.assert_allclose(
        linear_scan(a, b, scan_table=table), linear_scan(a, b, method="sequential"), rtol=1e-6
    )


def test_a_table_passed_to_a_module_decides_its_scans_and_touches_no_global_state(monkeypatch):
    """`nn.LRU(scan_table=...)` runs the table's method; the same module without one (before and
    after) runs the built-in rule; nothing drops JAX's caches or depends on call order."""
    from lru_jax import nn as lnn
    from lru_jax import scan

    def no_clear_caches():
        raise AssertionError("jax.clear_caches was called")

    monkeypatch.setattr(jax, "clear_caches", no_clear_caches)
    ran, run = [], scan._scan
    monkeypatch.setattr(scan, "_scan", lambda m, *a, **k: ran.append(m) or run(m, *a, **k))
    built_in, other = _other_than_built_in(16, 2 * 3)
    table = _table(16, 2 * 3, {built_in: 2.0, other: 1.0})
    x = jnp.ones((2, 16, 4))
    plain = lnn.LRU(3)
    params = plain.init(jax.random.key(0), x)
    ran.clear()
    measured = lnn.LRU(3, scan_table=table)
    outputs = [jax.jit(m.apply)(params, x) for m in (plain, measured, plain)]
    assert ran == [built_in, other, built_in]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    assert hash(measured) != hash(plain)  # a static value: a jit argument, a cache key
    with pytest.raises(TypeError, match="scan_table: expected a lru_jax.scan_table.ScanTable"):
        lnn.LRU(3, scan_table=TABLE).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="scan_table: .* got dict"):
        linear_scan(0.5, jnp.ones((4, 2)), scan_table=TABLE)


def test_a_table_is_rescaled_to_the_programs_device_split(tmp_path):
    """Entries are keyed by a scan's global size; one measured for d devices timed size / d per
    device, so for a program on n devices its key becomes size * n / d."""
    table = {
        "backend": "gpu",
        "entries": [
            {**_entry(4096, 64, "fwd", {"sequential": 1.0, "associative": 2.0}), "devices": 2},
            _entry(4096, 4096, "fwd", {"sequential": 2.0, "associative": 1.0}),
        ],
    }
    parsed = ScanTable.from_json(table)
    four = scan_choices.for_devices(parsed, 4)
    assert [(e.state_size, e.devices) for e in four.entries] == [(128, 4), (16384, 4)]
    assert scan_choices.for_devices(four, 4) is four  # the same split: unchanged (resume)
    one = scan_choices.for_devices(parsed, 1)
    assert [e.state_size for e in one.entries] == [32, 4096]
    path = tmp_path / "scan_choices.json"
    path.write_text(json.dumps(table))
    # per device, the 2-device entry timed 32 elements and the other 4096
    whole = scan_choices.load(str(path))  # one device runs all 512: nearer 4096 than 32
    assert choose_method(4096, 512, "gpu", jnp.complex64, scan_table=whole) == "associative"
    split = scan_choices.load(str(path), devices=8)  # 512 over 8 devices: 64 each, nearer 32
    assert choose_method(4096, 512, "gpu", jnp.complex64, scan_table=split) == "sequential"
    with pytest.raises(ValueError, match="devices: expected a positive int, got 0"):
        scan_choices.for_devices(parsed, 0)


@pytest.mark.parametrize(
    "table, match",
    [
        ({"entries": []}, "'backend' string"),
        ({"backend": "gpu", "entries": []}, "non-empty 'entries'"),
        ({"backend": "gpu", "entries": [_entry(0, 4, "fwd", {"a": 1.0})]}, r"entries\[0\].time"),
        ({"backend": "gpu", "entries": [_entry(8, 4, "bwd", {"a": 1.0})]}, r"entries\[0\].mode"),
        ({"backend": "gpu", "entries": [_entry(8, 4, "fwd", {"a": -1})]}, r"times_ms\['a'\]"),
    ],
)
def test_malformed_tables_are_refused_with_the_reason(table, match, tmp_path):
    path = tmp_path / "scan_choices.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=match):
        scan_choices.load(str(path))


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="choices.json"):
        scan_choices.load(str(path))


def test_built_in_cpu_rule_agrees_with_the_recorded_cpu_measurements():
    """The rule "auto" uses on CPU without a table picks, at every forward+backward shape of
    docs/bench-cpu (the committed bench run), the method that was fastest there."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "bench-cpu", "scan_choices.json")
    with open(path) as f:
        recorded = json.load(f)
    training = [e for e in recorded["entries"] if e["mode"] == "fwd+bwd"]
    assert len(training) >= 16
    for e in training:
        fastest = min(e["times_ms"], key=e["times_ms"].get)
        assert choose_method(e["time"], e["state_size"], backend="cpu") == fastest, e


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, nested ones (scan bodies, custom rules) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if isinstance(inner, jax.extend.core.Jaxpr):
                names |= _primitives(inner)
    return names


@pytest.mark.parametrize("trained", ["sequential", "pallas"])
def test_auto_runs_the_forward_choice_and_differentiates_the_trained_one(trained):
    """A table whose forward-only and forward+backward timings disagree: "auto" compiles the
    forward-only winner (associative) when nothing differentiates the scan, and the
    forward+backward winner when something does; values and gradients are the scan's."""
    times = {"associative": 1.0, trained: 2.0}
    table = ScanTable.from_json(
        {
            "backend": jax.default_backend(),
            "entries": [
                _entry(8, 6, "fwd", times),
                _entry(8, 6, "fwd+bwd", {"associative": 2.0, trained: 1.0}),
            ],
        }
    )
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.3, 0.9, (8, 6)) * np.exp(1j * rng.normal(size=(8, 6))))
    a, b = a.astype(jnp.complex64), jnp.asarray(rng.normal(size=(8, 6)), jnp.complex64)
    resets = jnp.zeros(8, bool).at[5].set(True)

    def loss(a, b, method, adjoint=True):
        scan_table = table if method == "auto" else None
        h = linear_scan(a, b, method=method, resets=resets, scan_table=scan_table, adjoint=adjoint)
        return jnp.sum(jnp.abs(h) ** 2)

    forward = _primitives(jax.make_jaxpr(lambda a, b: loss(a, b, "auto"))(a, b).jaxpr)
    backward = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(a, b, "auto").jaxpr
    np.testing.assert_allclose(loss(a, b, "auto"), loss(a, b, "sequential"), rtol=1e-5)
    got = jax.grad(loss, argnums=(0, 1))(a, b, "auto")
    if trained != "pallas":  # forward mode: through the trained method's own JVP
        tangent = (jnp.ones_like(b),)
        jvp = jax.jvp(lambda b: loss(a, b, "auto", adjoint=False), (b,), tangent)[1]
        want_jvp = jax.jvp(lambda b: loss(a, b, "sequential", adjoint=False), (b,), tangent)[1]
        np.testing.assert_allclose(jvp, want_jvp, rtol=1e-5)
    assert "scan" not in forward and "pallas_call" not in forward  # associative: no loop
    assert ("pallas_call" if trained == "pallas" else "scan") in _primitives(backward)
    want = jax.grad(loss, argnums=(0, 1))(a, b, "sequential")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_queries_are_the_programs_auto_scans_and_measure_answers_them():
    """`queries` reads the (dtype, time, state size) of every "auto" scan in a traced program,
    through jit, grad, vmap and a scan over layers; `measure` times every method there, both
    passes, and returns a table from which "auto" picks the fastest."""
    a = jnp.full((3,), 0.9 + 0.1j, jnp.complex64)

    def loss(b):
        h = jax.vmap(lambda b: linear_scan(a, b), in_axes=1, out_axes=1)(b)  # [16, 2, 3]
        layers = jax.lax.scan(lambda c, _: (linear_scan(a, c[:4]).sum() + c, None), b, None, 2)
        short = linear_scan(a, b[:1], method="sequential")  # a named method asks nothing
        return jnp.sum(jnp.abs(h) ** 2) + jnp.sum(jnp.abs(layers[0] + short) ** 2)

    b = jax.ShapeDtypeStruct((16, 2, 3), jnp.complex64)
    queries = scan_choices.queries(jax.jit(jax.grad(loss)), b)
    Query = scan_choices.Query
    assert queries == {Query("complex64", 16, 3), Query("complex64", 4, 6)}
    table = scan_choices.measure([Query("complex64", 16, 6)], repeats=2)
    entries = {(e.dtype, e.time, e.state_size, e.mode) for e in table.entries}
    assert entries == {("complex64", 16, 6, "fwd"), ("complex64", 16, 6, "fwd+bwd")}
    assert table.backend == jax.default_backend()
    for e in table.entries:
        assert tuple(m for m, _ in e.times_ms) == scan_choices.methods_to_time(table.backend)
        fastest = min(e.times_ms, key=lambda mt: mt[1])[0]
        trained = e.mode == "fwd+bwd"
        chosen = choose_method(16, 6, dtype=jnp.complex64, differentiated=trained, scan_table=table)
        assert chosen == fastest


def test_measure_with_several_processes_takes_process_0s_times(monkeypatch):
    """Every process measures, then all use what process 0 broadcast (stood in for here):
    different tables would compile different programs in a multi-process run."""
    from jax.experimental import multihost_utils

    sent = []

    def broadcast(times):
        sent.append(np.asarray(times))
        return np.arange(1.0, len(times) + 1)[::-1]  # process 0's: the last method fastest

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    table = scan_choices.measure([scan_choices.Query("float32", 4, 2)], ("fwd",), repeats=1)
    methods = scan_choices.methods_to_time(jax.default_backend())
    assert len(sent) == 1 and sent[0].shape == (len(methods),) and np.all(sent[0] > 0)
    times = table.entries[0].times_ms
    assert times == tuple(zip(methods, range(len(methods), 0, -1), strict=True))


def test_measure_leaves_out_a_method_that_fails_and_says_which(monkeypatch, capsys):
    """A method that cannot run at a shape (here one `linear_scan` refuses) is no candidate
    there: the others are timed, and stderr names it, instead of the measurement failing."""
    methods = ("sequential", "no_such_method")
    monkeypatch.setattr(scan_choices, "methods_to_time", lambda backend: methods)
    table = scan_choices.measure([("float32", 8, 3)], ("fwd",), repeats=1)
    assert [[m for m, _ in e.times_ms] for e in table.entries] == [["sequential"]]
    assert "no_such_method failed and is left out: ValueError" in capsys.readouterr().err


def test_measure_leaves_out_a_method_whose_result_is_wrong(monkeypatch, capsys):
    """A method that runs but disagrees with the sequential scan (as an untried kernel might)
    is not timed, so "auto" can never choose it."""
    real_fn = scan_choices.scan_fn

    def scan_fn(method, mode):  # "associative", 1% off in both passes
        fn = real_fn(method, mode)
        if method != "associative":
            return fn
        return lambda *args: jax.tree.map(lambda v: 1.01 * v, fn(*args))

    monkeypatch.setattr(scan_choices, "scan_fn", scan_fn)
    methods = ("sequential", "associative", "chunked")
    monkeypatch.setattr(scan_choices, "methods_to_time", lambda backend: methods)
    table = scan_choices.measure([("complex64", 64, 3)], repeats=1)
    kept = [sorted(m for m, _ in e.times_ms) for e in table.entries]
    assert kept == [["chunked", "sequential"]] * 2
    err = capsys.readouterr().err
    assert err.count("associative failed and is left out: ValueError: its result differs") == 2


def test_save_writes_a_table_that_loads_back(tmp_path):
    path = str(tmp_path / "scan_choices.json")
    scan_choices.save(GPU, path)
    assert scan_choices.load(path) == GPU and os.listdir(tmp_path) == ["scan_choices.json"]
    with pytest.raises(TypeError, match="table: expected a ScanTable, got dict"):
        scan_choices.save(TABLE, path)


def test_a_file_written_before_tables_were_values_reads_as_it_did(tmp_path):
    """A run's scan_choices.json from before (no "devices" keys, extra machine keys) reads into
    the table it describes, so that a resumed run chooses as it did."""
    old = {**TABLE, "device": "NVIDIA H200", "jax": "0.10.2", "date": "2026-11-29"}
    path = tmp_path / "scan_choices.json"
    path.write_text(json.dumps(old))
    table = scan_choices.load(str(path))
    assert table.device == "NVIDIA H200" and table.backend == "gpu"
    assert [e.devices for e in table.entries] == [1] * 4
    assert table.to_json()["entries"] == [{**e, "devices": 1} for e in TABLE["entries"]]
    assert choose_method(300, 4096, "gpu", jnp.complex64, scan_table=table) == "sequential"


@pytest.mark.parametrize(
    "queries, kwargs, match",
    [
        ([("complex64", 0, 3)], {}, r"queries: expected \(dtype, time, state_size\).*0, 3"),
        ([("no_such_dtype", 4, 3)], {}, "queries: .*no_such_dtype"),
        ([("float32", 4.0, 2)], {}, r"queries: .*4\.0"),
        ([], {}, "queries: expected at least one"),
        ([("float32", 4, 2)], {"modes": ("bwd",)}, "modes: expected a non-empty subset"),
        ([("float32", 4, 2)], {"repeats": 0}, "repeats: expected a positive int"),
    ],
)
def test_measure_names_bad_arguments_before_timing_anything(queries, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scan_choices.measure(queries, **kwargs)


def test_measure_names_an_axis_the_mesh_lacks():
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"axis: expected one of the mesh's axes \('data',\)"):
        scan_choices.measure([("float32", 4, 2)], mesh=mesh, axis="batch")
