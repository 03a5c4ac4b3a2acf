"""`linear_scan(method="auto")` from a table of measurements (lru_jax.scan_choices)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import scan_choices
from lru_jax.bench import scan_methods
from lru_jax.scan import choose_method, linear_scan


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


@pytest.fixture
def gpu_table():
    scan_choices.register(TABLE)
    yield
    scan_choices.clear()


def test_nearest_measured_shape_of_the_same_kind_decides(gpu_table):
    complex64 = jnp.complex64
    assert choose_method(300, 4096, backend="gpu", dtype=complex64) == "sequential"
    assert choose_method(30000, 2048, backend="gpu", dtype=complex64) == "pallas"
    assert choose_method(30000, 2048, backend="gpu", dtype=complex64, allow_pallas=False) == (
        "associative"
    )
    # real scans use the real entries where there are any (here only a short one)
    assert choose_method(30000, 2048, backend="gpu", dtype=jnp.float32) == "chunked"
    assert choose_method(1, 4096, backend="gpu") == "sequential"  # one step: nothing to choose
    # other backends keep their built-in rule
    assert choose_method(65536, 4096, backend="cpu") == "sequential"


def test_without_a_table_the_built_in_rule_applies(monkeypatch):
    monkeypatch.delenv(scan_choices.ENV_VAR, raising=False)
    scan_choices.clear()
    assert choose_method(4096, 256, backend="cpu") == "sequential"
    assert choose_method(4096, 256, backend="gpu") == "associative"
    assert choose_method(1, 256, backend="tpu") == "sequential"


def test_auto_compiles_to_the_measured_choice(tmp_path, monkeypatch):
    """A table for this backend, read from $LRU_JAX_SCAN_CHOICES, changes what "auto" runs."""
    backend = jax.default_backend()
    table = {"backend": backend, "entries": [_entry(64, 3, "fwd", {"associative": 1.0})]}
    path = tmp_path / "scan_choices.json"
    path.write_text(json.dumps(table))
    a, b = jnp.full((3,), 0.5, jnp.complex64), jnp.ones((64, 3), jnp.complex64)

    def primitives(method):
        jaxpr = jax.make_jaxpr(lambda a, b: linear_scan(a, b, method=method))(a, b)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    scan_choices.clear()
    monkeypatch.setenv(scan_choices.ENV_VAR, str(path))
    try:
        assert primitives("auto") == primitives("associative") != primitives("sequential")
        np.testing.assert_allclose(
            linear_scan(a, b), linear_scan(a, b, method="sequential"), rtol=1e-6
        )
    finally:
        scan_choices.clear()


def test_a_new_table_retraces_functions_jitted_before_it(monkeypatch):
    """Registering or clearing a table that changes what is loaded makes an already-jitted
    function retrace with it; registering the same table again keeps the compiled function."""
    from lru_jax import scan

    monkeypatch.delenv(scan_choices.ENV_VAR, raising=False)
    traced, trace = [], scan._scan
    monkeypatch.setattr(scan, "_scan", lambda m, *a, **k: traced.append(m) or trace(m, *a, **k))
    scan_choices.clear()
    built_in = choose_method(16, 3, dtype=jnp.complex64, differentiated=False)
    other = "associative" if built_in == "sequential" else "sequential"
    table = {
        "backend": jax.default_backend(),
        "entries": [_entry(16, 3, "fwd", {built_in: 2.0, other: 1.0})],
    }
    scan_fn = jax.jit(lambda b: linear_scan(0.5, b))
    b = jnp.ones((16, 3), jnp.complex64)
    try:
        scan_fn(b)
        scan_choices.register(table)
        expected = scan_fn(b)
        scan_choices.register(json.loads(json.dumps(table)))  # an equal table: no retrace
        np.testing.assert_array_equal(scan_fn(b), expected)
        assert traced == [built_in, other]
        scan_choices.clear()
        scan_fn(b)
        assert traced == [built_in, other, built_in]
    finally:
        scan_choices.clear()


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
    four = scan_choices.for_devices(table, 4)
    assert [(e["state_size"], e["devices"]) for e in four["entries"]] == [(128, 4), (16384, 4)]
    assert scan_choices.for_devices(four, 4) == four  # the same split: unchanged (resume)
    one = scan_choices.for_devices(table, 1)
    assert [e["state_size"] for e in one["entries"]] == [32, 4096]
    path = tmp_path / "scan_choices.json"
    path.write_text(json.dumps(table))
    complex64 = jnp.complex64
    try:  # per device, the 2-device entry timed 32 elements and the other 4096
        scan_choices.load(str(path))  # one device runs all 512: nearer 4096 than 32
        assert choose_method(4096, 512, backend="gpu", dtype=complex64) == "associative"
        scan_choices.load(str(path), devices=8)  # 512 over 8 devices: 64 each, nearer 32
        assert choose_method(4096, 512, backend="gpu", dtype=complex64) == "sequential"
    finally:
        scan_choices.clear()
    with pytest.raises(ValueError, match="devices: expected a positive int, got 0"):
        scan_choices.for_devices(table, 0)


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
def test_malformed_tables_are_refused_with_the_reason(table, match):
    with pytest.raises(ValueError, match=match):
        scan_choices.register(table)


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="choices.json"):
        scan_choices.load(str(path))


def test_built_in_cpu_rule_agrees_with_the_recorded_cpu_measurements(monkeypatch):
    """The rule "auto" uses on CPU without a table picks, at every forward+backward shape of
    docs/bench-cpu (the committed bench run), the method that was fastest there."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "bench-cpu", "scan_choices.json")
    with open(path) as f:
        recorded = json.load(f)
    monkeypatch.delenv(scan_choices.ENV_VAR, raising=False)
    scan_choices.clear()
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
    scan_choices.register(
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

    def loss(a, b, method):
        return jnp.sum(jnp.abs(linear_scan(a, b, method=method, resets=resets)) ** 2)

    try:
        forward = _primitives(jax.make_jaxpr(lambda a, b: loss(a, b, "auto"))(a, b).jaxpr)
        backward = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(a, b, "auto").jaxpr
        np.testing.assert_allclose(loss(a, b, "auto"), loss(a, b, "sequential"), rtol=1e-5)
        got = jax.grad(loss, argnums=(0, 1))(a, b, "auto")
        if trained != "pallas":  # forward mode: through the trained method's own JVP
            tangent = (jnp.ones_like(b),)
            jvp = jax.jvp(lambda b: loss(a, b, "auto"), (b,), tangent)[1]
            want_jvp = jax.jvp(lambda b: loss(a, b, "sequential"), (b,), tangent)[1]
            np.testing.assert_allclose(jvp, want_jvp, rtol=1e-5)
    finally:
        scan_choices.clear()
    assert "scan" not in forward and "pallas_call" not in forward  # associative: no loop
    assert ("pallas_call" if trained == "pallas" else "scan") in _primitives(backward)
    want = jax.grad(loss, argnums=(0, 1))(a, b, "sequential")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_recording_collects_what_auto_is_asked_and_measure_answers_it(monkeypatch):
    """Tracing a gradient under `recording()` collects the scan's (dtype, time, state size);
    `measure` times every CPU method there, both passes, and "auto" then picks the fastest."""
    monkeypatch.delenv(scan_choices.ENV_VAR, raising=False)
    scan_choices.clear()
    a = jnp.full((3,), 0.9 + 0.1j, jnp.complex64)

    def loss(b):
        return jnp.sum(jnp.abs(linear_scan(a, b)) ** 2)

    with scan_choices.recording() as queries:
        jax.eval_shape(jax.grad(loss), jnp.ones((16, 2, 3), jnp.complex64))
        linear_scan(a, jnp.ones((1, 3)), method="sequential")  # a named method asks nothing
    assert queries == {scan_choices.Query("complex64", 16, 6)}
    try:
        table = scan_choices.measure(queries, repeats=2)
        assert scan_choices.table_for(jax.default_backend()) is table
        entries = {(e["dtype"], e["time"], e["state_size"], e["mode"]) for e in table["entries"]}
        assert entries == {("complex64", 16, 6, "fwd"), ("complex64", 16, 6, "fwd+bwd")}
        for e in table["entries"]:
            assert tuple(e["times_ms"]) == scan_methods(jax.default_backend(), with_auto=False)
            fastest = min(e["times_ms"], key=e["times_ms"].get)
            trained = e["mode"] == "fwd+bwd"
            assert choose_method(16, 6, dtype=jnp.complex64, differentiated=trained) == fastest
    finally:
        scan_choices.clear()


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
    try:
        table = scan_choices.measure([scan_choices.Query("float32", 4, 2)], ("fwd",), repeats=1)
    finally:
        scan_choices.clear()
    methods = scan_methods(jax.default_backend(), with_auto=False)
    assert len(sent) == 1 and sent[0].shape == (len(methods),) and np.all(sent[0] > 0)
    times = table["entries"][0]["times_ms"]
    assert times == dict(zip(methods, range(len(methods), 0, -1), strict=True))


def test_measure_leaves_out_a_method_that_fails_and_says_which(monkeypatch, capsys):
    """A method that cannot run at a shape (here one `linear_scan` refuses) is no candidate
    there: the others are timed, and stderr names it, instead of the measurement failing."""
    from lru_jax import bench

    methods = ("sequential", "no_such_method")
    monkeypatch.setattr(bench, "scan_methods", lambda backend, with_auto=True: methods)
    with scan_choices.restored():
        table = scan_choices.measure([("float32", 8, 3)], ("fwd",), repeats=1)
    assert [sorted(e["times_ms"]) for e in table["entries"]] == [["sequential"]]
    assert "no_such_method failed and is left out: ValueError" in capsys.readouterr().err


def test_measure_leaves_out_a_method_whose_result_is_wrong(monkeypatch, capsys):
    """A method that runs but disagrees with the sequential scan (as an untried kernel might)
    is not timed, so "auto" can never choose it."""
    from lru_jax import bench

    real_fns = bench._scan_fns

    def scan_fns(method):  # "associative", 1% off in both passes
        fns = real_fns(method)
        if method != "associative":
            return fns
        off = lambda f: lambda a, b: jax.tree.map(lambda v: 1.01 * v, f(a, b))  # noqa: E731
        return {mode: off(f) for mode, f in fns.items()}

    monkeypatch.setattr(bench, "_scan_fns", scan_fns)
    methods = ("sequential", "associative", "chunked")
    monkeypatch.setattr(bench, "scan_methods", lambda backend, with_auto=True: methods)
    with scan_choices.restored():
        table = scan_choices.measure([("complex64", 64, 3)], repeats=1)
    assert [sorted(e["times_ms"]) for e in table["entries"]] == [["chunked", "sequential"]] * 2
    err = capsys.readouterr().err
    assert err.count("associative failed and is left out: ValueError: its result differs") == 2


def test_save_writes_a_table_that_loads_back(tmp_path):
    path = str(tmp_path / "scan_choices.json")
    scan_choices.save(TABLE, path)
    try:
        assert scan_choices.load(path) == TABLE and os.listdir(tmp_path) == ["scan_choices.json"]
    finally:
        scan_choices.clear()
    with pytest.raises(ValueError, match="entries"):
        scan_choices.save({"backend": "gpu", "entries": []}, path)


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
