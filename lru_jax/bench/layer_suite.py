"""The layers suite: our recurrent layers and LRU against Flax's, PyTorch's and a paper-style
LRU, forward+backward; with `--precision`, each mixer in bfloat16 against float32."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lru_jax import nn as lnn
from lru_jax import scan, scan_choices, timing
from lru_jax.bench import report
from lru_jax.bench.report import Row


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


def _init(module, x) -> dict:
    """`module`'s variables for input `x` (key 0), initialised under jit: run eagerly, init
    would compile each of its operations on its own."""
    return jax.jit(module.init)(jax.random.key(0), x)


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


GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}  # matrices per cell, stacked in its matmuls


def rnn_flops(cell_name: str, batch: int, length: int, inputs: int, hidden: int) -> float:
    """Matmul FLOPs of fwd+bwd (3x the forward's two matmuls per step)."""
    return 3 * 2 * batch * length * (inputs + hidden) * GATES[cell_name] * hidden


def rnn_layer_rows(batch, length, inputs, hidden, repeats, limits) -> list[Row]:
    """Our recurrent layers (chunked backward pass, and JAX's autodiff of the loop) against
    flax.linen nn.RNN, fwd+bwd, float32."""
    rows = []
    x = jax.random.normal(jax.random.key(1), (batch, length, inputs))
    for cell_name in ("simple_rnn", "lstm", "gru"):
        group = f"{cell_name} B={batch} T={length} in={inputs} H={hidden} fwd+bwd"
        flax_rnn = _flax_rnn(cell_name, hidden)
        flax_params = _init(flax_rnn, x)
        candidates = {
            f"flax nn.RNN({type(flax_rnn.cell).__name__})": (
                _grad_of_squares(lambda p, v, m=flax_rnn: m.apply(p, v)),
                (flax_params, x),
            )
        }
        for suffix, grad_chunk in (("", 16), (" (autodiff)", None)):
            ours = lnn.RecurrentLayer(hidden, cell=cell_name, grad_chunk=grad_chunk)
            our_params = _init(ours, x)["params"]
            candidates[f"lru_jax {cell_name}{suffix}"] = (
                _grad_of_squares(_module_fn(ours)),
                (our_params, x),
            )
        torch_step = _torch_rnn_step(cell_name, batch, length, inputs, hidden)
        if torch_step is not None:
            candidates[torch_step[0]] = (timing.Eager(torch_step[1]), ())
        for name, measured in timing.measure_named(group, list(candidates.items()), repeats):
            row = report.row("layers", group, name, measured)
            row.work = {"flops": rnn_flops(cell_name, batch, length, inputs, hidden)}
            report.flop_rate(row, limits)
            rows.append(row)
    report.set_speedups(rows, lambda r: r.name.startswith("flax"))
    return rows


def rnn_profile_candidates(cell_name, batch, length, inputs, hidden) -> list:
    """Named (fn, args) whose times split a recurrent layer's fwd+bwd (see `rnn_profile_rows`):
    the whole layer (ours, flax's); the matmuls that need not run step by step (the input
    projection x W, its gradients and the recurrent weight's, each one batched matmul); the
    matmuls that must (h U forward and g Uᵀ backward, T steps each, in two loops); and the
    same two loops with one multiply-add per step instead (the loops' own cost)."""
    keys = jax.random.split(jax.random.key(2), 5)
    width = GATES[cell_name] * hidden
    x = jax.random.normal(keys[0], (length * batch, inputs))
    w = jax.random.normal(keys[1], (inputs, width)) / math.sqrt(inputs)
    u = jax.random.normal(keys[2], (hidden, width)) / math.sqrt(hidden)
    dz = jax.random.normal(keys[3], (length, batch, width))
    h = jax.random.normal(keys[4], (length * batch, hidden))

    def batched(x, w, h, dz):  # x W; the gradients of x, W and U from all steps at once
        dz = dz.reshape(-1, width)
        return x @ w, dz @ w.T, x.T @ dz, h.T @ dz

    def stepwise(u, dz):  # the forward's h_{t-1} U and the backward's dz_t Uᵀ, step by step
        def forward(h, dz_t):
            return 0.5 * (h @ u)[:, :hidden] + dz_t[:, :hidden], None

        def backward(g, dz_t):
            return 0.5 * (jnp.tile(g, (1, width // hidden)) + dz_t) @ u.T, None

        start = jnp.zeros((batch, hidden))
        return jax.lax.scan(forward, start, dz)[0], jax.lax.scan(backward, start, dz)[0]

    def loops(scale, dz):  # the same two loops with one multiply-add per step
        def step(h, dz_t):
            return scale * h + dz_t[:, :hidden], None

        start = jnp.zeros((batch, hidden))
        return jax.lax.scan(step, start, dz)[0], jax.lax.scan(step, start, dz, reverse=True)[0]

    inputs_x = x.reshape(batch, length, inputs)
    flax_rnn = _flax_rnn(cell_name, hidden)
    ours = lnn.RecurrentLayer(hidden, cell=cell_name, grad_chunk=16)
    return [
        (
            f"lru_jax {cell_name}",
            (_grad_of_squares(_module_fn(ours)), (_init(ours, inputs_x)["params"], inputs_x)),
        ),
        (
            f"flax nn.RNN({type(flax_rnn.cell).__name__})",
            (
                _grad_of_squares(flax_rnn.apply),
                (_init(flax_rnn, inputs_x), inputs_x),
            ),
        ),
        ("batched matmuls (projection, weight gradients)", (batched, (x, w, h, dz))),
        ("step-by-step matmuls (h U, g Uᵀ)", (stepwise, (u, dz))),
        ("the two loops alone (a multiply-add per step)", (loops, (jnp.float32(0.5), dz))),
    ]


def rnn_profile_rows(batch, length, inputs, hidden, repeats) -> list[Row]:
    """The LSTM's and GRU's fwd+bwd split into what bounds it. Only h_{t-1} U (forward) and
    dz_t Uᵀ (backward) must run step by step; the input projection and every weight gradient
    can be one batched matmul each (ours does that; flax's step runs both matmuls). The floor
    is (batched matmuls) + (step-by-step matmuls), which includes the loops' own cost; each
    row's rate column is its time over that floor, its "of limit" the floor over its time.
    A layer whose gates cost nothing would run at the floor, so flax's time / floor bounds how
    much faster than flax's any schedule of this loop can be."""
    rows = []
    for cell_name in ("lstm", "gru"):
        group = f"{cell_name} profile B={batch} T={length} in={inputs} H={hidden} fwd+bwd"
        named = rnn_profile_candidates(cell_name, batch, length, inputs, hidden)
        group_rows = [
            report.row("layers", group, name, measured)
            for name, measured in timing.measure_named(group, named, repeats)
        ]
        ms = {r.name: r.median_ms for r in group_rows}
        parts = (
            "batched matmuls (projection, weight gradients)",
            "step-by-step matmuls (h U, g Uᵀ)",
        )
        floor = sum(ms.get(name, math.nan) for name in parts)
        for r in group_rows:
            r.rate = f"{r.median_ms / floor:.2f}x our floor"
            r.fraction = floor / r.median_ms
        rows += group_rows
    report.set_speedups(rows, lambda r: r.name.startswith("flax"))
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


def lru_floor_candidates(batch, length, width) -> list:
    """Named (fn, args) of what bounds the LRU layer's fwd+bwd: its twelve real matmuls of
    [B·T, H] x [H, N] (B u and C h, real and imaginary parts, forward and both gradients of
    each), one after another, and the sequential scan's fwd+bwd on b [T, B, N] complex64."""
    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (batch * length, width))
    w = jax.random.normal(keys[1], (12, width, width)) / width

    def matmuls(x, w):
        return jax.lax.fori_loop(0, 12, lambda i, acc: acc + x @ w[i], jnp.zeros_like(x))

    a, b = scan_choices.scan_inputs(jax.random.key(0), length, batch, width, jnp.complex64)

    def scan_loss(a, b):
        return jnp.sum(scan.linear_scan(a, b, method="sequential").real)

    return [
        ("floor part: the twelve matmuls", (matmuls, (x, w))),
        ("floor part: the sequential scan", (jax.grad(scan_loss, argnums=(0, 1)), (a, b))),
    ]


def lru_layer_rows(batch, length, width, repeats, limits) -> list[Row]:
    """Our nn.LRU (each scan method) against the paper-style associative-only LRU, fwd+bwd;
    beside them the two parts of its floor (`lru_floor_candidates`), timed in the same group:
    each layer row's "of limit" is floor / its time (1.0 would be at the floor)."""
    rows = []
    u = jax.random.normal(jax.random.key(1), (batch, length, width))
    params = _init(lnn.LRU(width), u)["params"]  # the functional params
    group = f"lru B={batch} T={length} N=H={width} fwd+bwd"
    candidates = [("paper-style associative LRU", paper_lru_forward)]
    for method in (*scan_choices.methods_to_time(jax.default_backend()), "auto"):
        module = lnn.LRU(width, scan_method=method)
        candidates.append((f"lru_jax lru ({method})", _module_fn(module)))
    named = [(name, (_grad_of_squares(f), (params, u))) for name, f in candidates]
    named += lru_floor_candidates(batch, length, width)
    measured = timing.measure_named(group, named, repeats)
    floor = sum(t["median_ms"] for name, t in measured if name.startswith("floor part"))
    for name, timed in measured:
        row = report.row("layers", group, name, timed)
        row.work = {"bytes": 5 * batch * length * width * 8}  # complex64 states, 5 passes
        if name.startswith("floor part"):
            rows.append(row)
            continue
        report.bandwidth(row, limits)
        row.rate += f", {row.median_ms / floor:.2f}x the floor"
        row.fraction = floor / row.median_ms
        rows.append(row)
    report.set_speedups(rows, lambda r: r.name.startswith("paper"))
    return rows


def mixer_kind(name: str) -> str:
    """The mixer a row of `mixer_modules` times: "lru_jax mingru (log space)" -> "mingru"."""
    return name.split(" ")[1]


def mixer_modules(width: int, kinds=None) -> dict:
    """The recurrent mixers compared in `mixer_layer_rows`, at width = state size; with
    `kinds` (e.g. ("lru", "mamba")), only those, beside the LSTM that is the baseline."""
    modules = {
        "lru_jax lru": lnn.LRU(width),
        "lru_jax lstm": lnn.LSTM(width),
        "lru_jax mingru": lnn.MinGRU(width),
        "lru_jax mingru (log space)": lnn.MinGRU(width, log_space=True),
        "lru_jax minlstm": lnn.MinLSTM(width),
        "lru_jax minlstm (log space)": lnn.MinLSTM(width, log_space=True),
        "lru_jax hgrn": lnn.HGRN(width, lower_bound=0.5),
        # Griffin's block as the rglru mixer runs it (models: config.model.rglru's defaults)
        "lru_jax rglru (recurrent block)": lnn.RecurrentBlock(width, num_heads=math.gcd(width, 4)),
        # latent size P = 2 x width: with conjugate symmetry, width complex states like the LRU's
        "lru_jax s5": lnn.S5(2 * width),
        # the mamba mixer as config.model.mamba's defaults build it: E = 2 x width, N = 16
        "lru_jax mamba (E = 2H, N = 16)": lnn.Mamba(2 * width),
    }
    if kinds is None:
        return modules
    return {n: m for n, m in modules.items() if mixer_kind(n) in {"lstm", *kinds}}


def mixer_layer_rows(batch, length, width, repeats, limits, kinds=None) -> list[Row]:
    """Every recurrent mixer of a SequenceModel block (or those `kinds` names), forward and
    forward+backward, with "auto" scans; the LSTM (our chunked backward) is each group's
    baseline."""
    rows = []
    u = jax.random.normal(jax.random.key(1), (batch, length, width))
    modules = mixer_modules(width, kinds)
    params = {name: _init(m, u)["params"] for name, m in modules.items()}
    for mode in ("fwd", "fwd+bwd"):
        group = f"mixers B={batch} T={length} H=N={width} {mode}"
        named = []
        for name, module in modules.items():
            fn = _module_fn(module)
            fn = _grad_of_squares(fn) if mode == "fwd+bwd" else fn
            named.append((name, (fn, (params[name], u))))
        for name, measured in timing.measure_named(group, named, repeats):
            rows.append(report.row("layers", group, name, measured))
    report.set_speedups(rows, lambda r: r.name == "lru_jax lstm")
    return rows


PRECISIONS = ("float32", "bfloat16")


def mixer_precision_rows(batch, length, width, repeats, modules=None) -> list[Row]:
    """Each recurrent mixer (`mixer_modules`, or the given {name: module}) computing in
    bfloat16 against itself in float32, forward+backward with "auto" scans: a group per mixer,
    its float32 row the baseline. The parameters are float32 in both (mixed precision: only
    the computation's dtype changes, see `lru_jax.nn`)."""
    rows = []
    u = jax.random.normal(jax.random.key(1), (batch, length, width))
    modules = mixer_modules(width) if modules is None else modules
    for name, module in modules.items():
        group = f"{name} B={batch} T={length} H=N={width} fwd+bwd float32 vs bfloat16"
        params = _init(module, u)["params"]
        named = []
        for dtype in PRECISIONS:
            fn = _grad_of_squares(_module_fn(module.clone(dtype=jnp.dtype(dtype))))
            named.append((f"{name} {dtype}", (fn, (params, u))))
        for row_name, measured in timing.measure_named(group, named, repeats):
            rows.append(report.row("layers", group, row_name, measured))
    report.set_speedups(rows, lambda r: r.name.endswith(" float32"))
    return rows


def naive_selective_scan(x, delta, A, B, C, D):
    """The selective scan written the direct way: every state h [time, batch, D, N] by
    `linear_scan`, then contracted with C. An independent reference for timing and memory."""
    hs = scan.linear_scan(jnp.exp(delta[..., None] * A), (delta * x)[..., None] * B[:, :, None])
    return jnp.einsum("tbdn,tbn->tbd", hs, C) + D * x


def selective_scan_rows(batch, length, channels, state, repeats) -> list[Row]:
    """`scan.selective_scan` (its methods) against `naive_selective_scan`, fwd+bwd of sum(y²)
    in every argument, float32: time, and XLA's buffer plan of each compiled function (in
    `work`, on every backend; `memory_mb` is the device's peak where it reports one)."""
    k = jax.random.split(jax.random.key(0), 4)
    shape, states = (length, batch, channels), (length, batch, state)
    args = (
        jax.random.normal(k[0], shape),
        jax.nn.softplus(jax.random.normal(k[1], shape) - 2.0),  # Δ, mostly 0.01-0.5
        -jnp.broadcast_to(jnp.arange(1.0, state + 1), (channels, state)),  # S4D-real A
        jax.random.normal(k[2], states),
        jax.random.normal(k[3], states),
        jnp.ones((channels,)),
    )
    candidates = {"naive: every state, then C": naive_selective_scan}
    for method in ("sequential", "associative"):
        candidates[f"lru_jax selective_scan ({method})"] = lambda *a, m=method: scan.selective_scan(
            *a, method=m
        )[0]
    group = f"selective scan B={batch} T={length} D={channels} N={state} fwd+bwd"
    every_state_mb = length * batch * channels * state * 4 / 2**20
    named = []
    for name, fn in candidates.items():
        grad = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) ** 2), argnums=tuple(range(6)))
        named.append((name, (grad, args)))
    rows = []
    for name, measured in timing.measure_named(group, named, repeats):
        grad = dict(named)[name][0]
        plan = timing.planned_mb(jax.jit(grad).lower(*args).compile())
        row = report.row("memory", group, name, measured)
        row.work = {"buffer_plan_mb": plan, "every_state_mb": every_state_mb}
        row.rate = f"buffer plan {plan:,.0f} MiB"
        rows.append(row)
    report.set_speedups(rows, lambda r: r.name.startswith("naive"))
    return rows
