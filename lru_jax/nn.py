"""Flax Linen modules over the functional core: recurrent layers, the LRU, minGRU, minLSTM,
HGRN, the RG-LRU and Griffin's recurrent block, the S5, the Mamba block, bidirectional and
stacked layers, and the residual sequence block.

Modules are batch-major: x is [batch, time, features], as in `flax.linen.RNN`. Every sequence
layer is called as

    layer(x, seq_lengths=None, *, initial_carry=None, return_carry=False, reverse=False)

and returns y [batch, time, out], or (carry, y) with `return_carry`. With `seq_lengths`
(int [batch]), outputs past each length are exactly zero and the carry is the one after the
last valid step. Causal layers also have `step(carry, x_t) -> (carry, y_t)` for generation,
one step at a time with the trained variables (`module.apply(variables, c, x_t, method="step")`)
and `initial_carry(batch_size)`.

Mixed precision: every module takes `dtype`, the dtype it computes in (matmuls, activations,
its output), and `param_dtype`, the dtype its parameters are stored in, both float32 by
default, as Flax's own modules. With dtype=jnp.bfloat16 the parameters stay float32 and are
cast where they meet the activations; what needs the range or the resolution of float32 stays
there whatever the dtype: the recurrences' decays and states (every scan of `lru_jax.scan`
accumulates in float32 / complex64, their inputs cast up at the boundary, the states cast down
for the readout), the norms' statistics and the attention softmax. The nonlinear cells
(SimpleRNN, LSTM, GRU) have no scan: they run wholly in `dtype`, their carry included.

The attention modules (`MultiHeadAttention`, `DotProductAttention`, `AdditiveAttention`,
`AttentionPooling`, `HardAttention` and the mixer `CausalSelfAttention`) live in
`lru_jax.attention_nn` and are re-exported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lru_jax import _checks, cells, hgrn, lru, mamba, mingru, padding, rglru, s5, scan
from lru_jax.attention_nn import (  # noqa: F401  (re-exported)
    HARD_ESTIMATORS,
    AdditiveAttention,
    AttentionPooling,
    CausalSelfAttention,
    DotProductAttention,
    HardAttention,
    HardAttentionOutput,
    KVCache,
    MultiHeadAttention,
    compute_dtype,
)
from lru_jax.scan_table import ScanTable

# Training signals: how a layer adds to what training minimises, the train step knowing nothing
# of the layer (lru_jax/training/steps.py). A layer sows scalar loss terms into LOSSES in
# training; the train step adds them all to the task's loss. State a layer keeps between steps
# (BatchNorm's averages, a REINFORCE baseline) is any other variable collection the model
# creates at init: the train state holds it, each train step passes it in mutable and keeps
# what the layers wrote, checkpoints save and restore it with the parameters.
LOSSES = "losses"
TRANSIENT_COLLECTIONS = ("intermediates", LOSSES)  # made afresh by every apply: never state
# BatchNorm's running averages move by (1 - momentum) of each training batch's statistics
BATCHNORM_MOMENTUM = 0.9
BATCH_STATS = "batch_stats"


def add_loss(module: nn.Module, name: str, value) -> None:
    """Adds the scalar `value` to the objective training minimises, as `LOSSES`/`name` of
    `module` (a no-op where the caller did not make LOSSES mutable, e.g. in evaluation)."""
    module.sow(LOSSES, name, value)


def check_sequence(x, seq_lengths, name: str = "x"):
    """Checks x: float [batch, time, features] (a nested list is converted) and seq_lengths;
    returns (x as an array, int32 lengths or None)."""
    x = _checks.sequence(name, x)
    return x, _checks.seq_lengths(seq_lengths, x.shape[0], x.shape[1])


def _time_major(x):
    return jnp.swapaxes(x, 0, 1)


def _in_compute_dtype(module: nn.Module, x):
    """x (already checked) cast to the module's compute dtype."""
    return x.astype(compute_dtype(module))


def _declare_params(module: nn.Module, names, init):
    """The module's parameters `names` as a dict, created together by `init(key)`.

    `init` is the functional form's initialiser (`lru.init`, `Cell.init`), called once with
    the module's first "params" key, so the Flax module and the functional form give the same
    parameters from the same key, under the same names. (When the parameters exist, Flax
    still traces each initialiser abstractly to check their shapes.)
    The parameters are stored in the module's `param_dtype` (the initialiser's float32 cast).
    """
    dtype = _checks.float_dtype("param_dtype", module.param_dtype)
    fresh = {}
    if module.is_initializing() and not module.has_variable("params", names[0]):
        fresh = init(module.make_rng("params"))

    def declare(name):
        return module.param(name, lambda key: (fresh or init(key))[name].astype(dtype))

    return {name: declare(name) for name in names}


class RecurrentLayer(nn.Module):
    """A layer running a functional cell (`lru_jax.cells`): SimpleRNN, LSTM and GRU fix `cell`.

    Its parameters are exactly the cell's: `variables["params"]` can be passed to
    `cells.unroll` and `Cell.step` unchanged, and are `Cell.init` of the module's first
    "params" key.
    """

    hidden_size: int
    cell: str = "lstm"  # "simple_rnn" | "lstm" | "gru"
    activation: str = "tanh"  # SimpleRNN only: "tanh" | "relu"
    unroll: int = 1
    grad_chunk: int | None = 16  # see cells.unroll; None: JAX's autodiff (allows jax.jvp)
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    def make_cell(self) -> cells.Cell:
        if self.cell == "simple_rnn":
            return cells.simple_rnn(self.activation)
        return cells.get(self.cell)

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, in] -> y [batch, time, hidden] (or (carry, y)).

        `resets`, optional bool [batch, time], zeroes the carry before those steps.
        """
        _checks.positive_int("hidden_size", self.hidden_size)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        if self.has_variable("params", "w_ih"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "w_ih").shape[0])
        cell = self.make_cell()
        names = list(cell.param_inits(x.shape[-1], self.hidden_size))
        params = _declare_params(
            self, names, lambda key: cell.init(key, x.shape[-1], self.hidden_size)
        )
        # no scan to accumulate in: the cell runs wholly in the compute dtype
        params = {k: v.astype(x.dtype) for k, v in params.items()}
        carry, ys = cells.unroll(
            cell,
            params,
            _time_major(x),
            initial_carry,
            seq_lengths=seq_lengths,
            reverse=reverse,
            unroll=self.unroll,
            grad_chunk=self.grad_chunk,
            resets=_time_major_resets(_checks.resets(resets, x.shape[:2])),
        )
        ys = _time_major(ys)
        return (carry, ys) if return_carry else ys

    def initial_carry(self, batch_size: int, dtype=None):
        """The zero carry for `batch_size` sequences, in `dtype` (None: the compute dtype)."""
        dtype = compute_dtype(self) if dtype is None else dtype
        return self.make_cell().zero_carry((batch_size,), self.hidden_size, dtype)

    def step(self, carry, x):
        """One step: x [batch, in] -> (carry, y [batch, hidden]). Needs initialised variables."""
        step = self.make_cell().step
        return _checked_step(self, cells.check_input, step, carry, x, "features", cast_params=True)


class SimpleRNN(RecurrentLayer):
    """Elman RNN layer, activation "tanh" or "relu"."""

    cell: str = "simple_rnn"


class LSTM(RecurrentLayer):
    """LSTM layer; carry (c, h)."""

    cell: str = "lstm"


class GRU(RecurrentLayer):
    """GRU layer."""

    cell: str = "gru"


class LRU(nn.Module):
    """Linear Recurrent Unit layer (Orvieto et al. 2023); width H is x's last axis.

    Parameters: nu_log [N], theta_log [N], gamma_log [N], B_re [N,H], B_im [N,H], C_re [H,N],
    C_im [H,N], D [H], made by `lru.init` from the module's first "params" key. The carry is
    the complex64 state [batch, N].
    `sequence_axis`, a mesh axis name, splits time over that axis' devices (sequence
    parallelism, see `lru_jax.scan.linear_scan`); apply the module under `jax.set_mesh`.
    `scan_table`, a `lru_jax.scan_table.ScanTable`, is what an "auto" `scan_method` chooses from
    (`lru_jax.scan_choices.measure` or `.load`); None: the built-in rule.
    """

    d_state: int
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    scan_method: str = "auto"
    sequence_axis: str | None = None
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (h_last [batch, N], y)).

        `resets`, optional bool [batch, time], restarts the state from zero at those steps.
        """
        _checks.positive_int("d_state", self.d_state)
        lru.check_ring(self.r_min, self.r_max, self.max_phase)
        _check_scan(self.scan_method, self.scan_table)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        if self.has_variable("params", "D"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "D").shape[0])
        params = _declare_params(
            self,
            list(lru.PARAM_SHAPES),
            lambda key: lru.init(
                key, x.shape[-1], self.d_state, self.r_min, self.r_max, self.max_phase
            ),
        )
        return _call_forward(
            lru.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            sequence_axis=self.sequence_axis,
            scan_table=self.scan_table,
        )

    def initial_carry(self, batch_size: int):
        return lru.zero_state((batch_size,), self.d_state)

    def step(self, carry, x):
        """One step: x [batch, H] -> (h [batch, N], y [batch, H]), equal to the parallel form."""
        return _checked_step(self, lru.check_input, lru.step, carry, x)


def _checked_step(module, check_input, step, carry, x, features: str = "H", cast_params=False):
    """A layer's one step with its trained parameters, in its compute dtype (see
    `checked_step`)."""
    params = module.variables["params"]
    dtype = compute_dtype(module)
    return checked_step(params, check_input, step, carry, x, features, dtype, cast_params)


def checked_step(
    params, check_input, step, carry, x, features: str = "H", dtype=None, cast_params=False
):
    """One step of a functional form with `params`: x [batch, features] checked against
    them (`check_input(params, x, name)`) and cast to `dtype` (the compute dtype; None: as
    it is), then `step(params, carry, x) -> (carry, y)` (`cast_params`: with the parameters
    cast to `dtype` too). The Linen and the NNX layers both step through it."""
    _checks.rank("x", x, 2, f"[batch, {features}]")
    x = check_input(params, x, "x")  # as an array (a nested list is converted)
    if dtype is not None:
        x = x.astype(dtype)
    if cast_params:  # in the keys' sorted order, whatever the dict's: one program for both forms
        params = jax.tree.map(lambda v: v.astype(x.dtype), params)
    return step(params, carry, x)


def _check_scan(scan_method: str, scan_table, methods=scan.METHODS) -> None:
    _checks.one_of("scan_method", scan_method, (*methods, "auto"))
    scan.check_scan_table(scan_table)


def _time_major_resets(resets):
    """resets bool [batch, time] -> [time, batch] (None stays None)."""
    if resets is None:
        return None
    _checks.rank("resets", resets, 2, "[batch, time]")
    return _time_major(resets)


def _call_forward(forward, params, x, seq_lengths, initial_carry, return_carry, resets, **kw):
    """A functional `forward(params, u, h0, *, seq_lengths, resets, ...)` (time-major) called
    the way the modules are: x [batch, time, H] -> y [batch, time, H] (or (h_last, y))."""
    y, h_last = forward(
        params,
        _time_major(x),
        initial_carry,
        seq_lengths=seq_lengths,
        resets=_time_major_resets(resets),
        **kw,
    )
    y = _time_major(y)
    return (h_last, y) if return_carry else y


class MinRNN(nn.Module):
    """minGRU or minLSTM layer (Feng et al. 2024, `lru_jax.mingru`); width H is x's last axis.

    `cell`: "mingru" | "minlstm" (`MinGRU` and `MinLSTM` fix it). Parameters: W_h, b_h and the
    gates' W_z, b_z (minGRU) or W_f, b_f, W_i, b_i (minLSTM), and W_out [H, N] when `proj_out`
    (default: d_state != H), made by `mingru.init` from the module's first "params" key.
    The carry is the float32 state [batch, N]. `log_space` runs the paper's log-space form
    (`scan.log_linear_scan`; `scan_method` then one of `scan.LOG_METHODS` or "auto"), else the
    plain form through `linear_scan` (any method, `scan_table` for "auto"); both compute the same
    outputs. `activation`: "g" (positive candidates, either form) or "linear" (plain form only).
    `max_timescale` T > 2: the gate biases start by chrono initialisation, memories of 2 to T
    steps (`mingru.init`; 0, the default: zero biases, the paper's).
    """

    d_state: int
    cell: str = "mingru"
    proj_out: bool | None = None
    log_space: bool = False
    activation: str = "g"
    max_timescale: float = 0.0
    scan_method: str = "auto"
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (h_last [batch, N], y)).

        `resets`, optional bool [batch, time], restarts the state from zero at those steps.
        """
        mingru.check_form(self.log_space, self.activation)
        methods = scan.LOG_METHODS if self.log_space else scan.METHODS
        _check_scan(self.scan_method, self.scan_table, methods)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        proj_out = mingru.check_cell(self.cell, x.shape[-1], self.d_state, self.proj_out)
        mingru.check_max_timescale(self.max_timescale)
        if self.has_variable("params", "W_h"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "W_h").shape[1])
        params = _declare_params(
            self,
            mingru.param_names(self.cell, proj_out),
            lambda key: mingru.init(
                key,
                x.shape[-1],
                self.d_state,
                cell=self.cell,
                proj_out=proj_out,
                max_timescale=self.max_timescale,
            ),
        )
        return _call_forward(
            mingru.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            scan_table=self.scan_table,
            log_space=self.log_space,
            activation=self.activation,
        )

    def initial_carry(self, batch_size: int):
        return jnp.zeros((batch_size, self.d_state), jnp.float32)

    def step(self, carry, x):
        """One step: x [batch, H] -> (h [batch, N], y [batch, H]), equal to the full call."""
        step = functools.partial(mingru.step, activation=self.activation)
        return _checked_step(self, mingru.check_input, step, carry, x)


class MinGRU(MinRNN):
    """minGRU layer: h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t, gates from x_t only."""

    cell: str = "mingru"


class MinLSTM(MinRNN):
    """minLSTM layer: h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t with normalised f', i'."""

    cell: str = "minlstm"


class HGRN(nn.Module):
    """HGRN's token mixer, the HGRU (Qin et al. 2023, `lru_jax.hgrn`); width H is x's last axis.

    Parameters: W_f, b_f, W_c, b_c, theta, W_g, b_g, norm_scale, norm_bias, W_o, b_o, and
    bound_logit [N] (the learned lower bound γ = σ(bound_logit) of the forget gate) when
    `lower_bound` (its initial value, in [0, 1)) is above 0; made by `hgrn.init` from the
    module's first "params" key. The carry is the complex64 state [batch, N]. In a stack of L
    blocks the paper's bounds start at k/L for block k (`models` builds them so).
    `max_timescale` T > 2: the forget gate's bias starts by chrono initialisation (`hgrn.init`;
    0, the default: zero).
    """

    d_state: int
    lower_bound: float = 0.0
    max_timescale: float = 0.0
    scan_method: str = "auto"
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (h_last [batch, N], y)).

        `resets`, optional bool [batch, time], restarts the state from zero at those steps.
        """
        _checks.positive_int("d_state", self.d_state)
        hgrn.check_lower_bound(self.lower_bound)
        mingru.check_max_timescale(self.max_timescale)
        _check_scan(self.scan_method, self.scan_table)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        if self.has_variable("params", "W_f"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "W_f").shape[1])
        params = _declare_params(
            self,
            hgrn.param_names(self.lower_bound),
            lambda key: hgrn.init(
                key, x.shape[-1], self.d_state, self.lower_bound, self.max_timescale
            ),
        )
        return _call_forward(
            hgrn.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            scan_table=self.scan_table,
        )

    def initial_carry(self, batch_size: int):
        return hgrn.zero_state((batch_size,), self.d_state)

    def step(self, carry, x):
        """One step: x [batch, H] -> (h [batch, N], y [batch, H]), equal to the full call."""
        return _checked_step(self, hgrn.check_input, hgrn.step, carry, x)


class S5(nn.Module):
    """The S5 layer (Smith et al. 2023, `lru_jax.s5`); width H is x's last axis.

    d_state is the paper's latent size P, split into `blocks` block-diagonal HiPPO-N blocks at
    initialisation; with `conj_sym` (default) the state keeps one mode of each conjugate pair,
    P' = P/2, and y = 2 Re(C̃ x) + D u. Parameters: Lambda_re, Lambda_im, B_re, B_im, C_re,
    C_im, D, log_step (timescales drawn in [dt_min, dt_max]), made by `s5.init` from the
    module's first "params" key. `discretization`: "zoh" | "bilinear". The carry is the
    complex64 state [batch, P'].
    """

    d_state: int
    blocks: int = 1
    conj_sym: bool = True
    dt_min: float = 0.001
    dt_max: float = 0.1
    discretization: str = "zoh"
    scan_method: str = "auto"
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @property
    def _form(self) -> dict:
        return {"conj_sym": self.conj_sym, "discretization": self.discretization}

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (h_last [batch, P'], y)).

        `resets`, optional bool [batch, time], restarts the state from zero at those steps.
        """
        settings = (self.d_state, self.blocks, self.conj_sym, self.dt_min, self.dt_max)
        s5.check_options(*settings, self.discretization)
        _check_scan(self.scan_method, self.scan_table)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        if self.has_variable("params", "D"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "D").shape[0])
        params = _declare_params(
            self,
            list(s5.PARAM_NAMES),
            lambda key: s5.init(key, x.shape[-1], *settings),
        )
        return _call_forward(
            s5.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            scan_table=self.scan_table,
            **self._form,
        )

    def initial_carry(self, batch_size: int):
        states = self.d_state // 2 if self.conj_sym else self.d_state
        return s5.zero_state((batch_size,), states)

    def step(self, carry, x):
        """One step: x [batch, H] -> (h [batch, P'], y [batch, H]), equal to the full call."""
        step = functools.partial(s5.step, **self._form)
        return _checked_step(self, s5.check_input, step, carry, x)


class RGLRU(nn.Module):
    """The RG-LRU (De et al. 2024, Griffin; `lru_jax.rglru`): x [batch, time, width] to its
    states h [batch, time, width].

    Parameters: Lambda [N], W_r, W_i [num_heads, N/num_heads, N/num_heads] (block-diagonal
    gates, as recurrentgemma's), b_r, b_i [N], made by `rglru.init` from the module's first
    "params" key; the decay ring σ(Λ) in [r_min, r_max]. The carry is the float32 state
    [batch, N]. `resets` (bool [batch, time]) marks document starts: the state restarts and
    the input is not normalised there (recurrentgemma's segment_pos == 0).
    """

    width: int
    num_heads: int = 1
    r_min: float = 0.9
    r_max: float = 0.999
    scan_method: str = "auto"
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, N] -> y [batch, time, N] (or (h_last [batch, N], y))."""
        rglru.check_settings(self.width, self.num_heads, self.r_min, self.r_max)
        _check_scan(self.scan_method, self.scan_table)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        _checks.feature_size("x", x.shape[-1], self.width, "features (width)")
        params = _declare_params(
            self,
            rglru.PARAM_NAMES,
            lambda key: rglru.init(key, self.width, self.num_heads, self.r_min, self.r_max),
        )
        return _call_forward(
            rglru.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            scan_table=self.scan_table,
        )

    def initial_carry(self, batch_size: int):
        return rglru.zero_state((batch_size,), self.width)

    def step(self, carry, x):
        """One step: x [batch, N] -> (h [batch, N], y = h), equal to the full call."""
        return _checked_step(self, rglru.check_input, rglru.step, carry, x, "N")


class RecurrentBlock(nn.Module):
    """Griffin's recurrent block (`lru_jax.rglru`): a GeLU gate branch and a branch of a causal
    depthwise convolution (`conv_width` steps) and the RG-LRU at width `lru_width`, multiplied
    and projected back to the input width H.

    Parameters: W_y, b_y, W_x, b_x, conv_w, conv_b, the RG-LRU's Lambda, W_r, b_r, W_i, b_i,
    and W_out, b_out, made by `rglru.block_init` from the module's first "params" key
    (`rglru.from_recurrentgemma` converts recurrentgemma's). The carry is an
    `rglru.BlockState`: h [batch, N] and the convolution's window [batch, conv_width - 1, N].
    `resets` (bool [batch, time]) marks document starts, as for `RGLRU`.
    """

    lru_width: int
    num_heads: int = 1
    conv_width: int = 4
    r_min: float = 0.9
    r_max: float = 0.999
    scan_method: str = "auto"
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (BlockState, y))."""
        rglru.check_settings(self.lru_width, self.num_heads, self.r_min, self.r_max)
        _check_scan(self.scan_method, self.scan_table)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        rglru.check_block_settings(x.shape[-1], self.conv_width)
        if self.has_variable("params", "W_y"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "W_y").shape[1])
        settings = (self.lru_width, self.num_heads, self.conv_width, self.r_min, self.r_max)
        params = _declare_params(
            self, rglru.BLOCK_PARAM_NAMES, lambda key: rglru.block_init(key, x.shape[-1], *settings)
        )
        return _call_forward(
            rglru.block_forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            scan_table=self.scan_table,
        )

    def initial_carry(self, batch_size: int):
        return rglru.block_zero_state((batch_size,), self.lru_width, self.conv_width)

    def step(self, carry, x):
        """One step: x [batch, H] -> (BlockState, y [batch, H]), equal to the full call."""
        return _checked_step(self, rglru.check_block_input, rglru.block_step, carry, x)


class Mamba(nn.Module):
    """The Mamba block (Gu and Dao 2023, `lru_jax.mamba`): x [batch, time, H] -> [batch, time,
    H] through `d_inner` channels of `d_state` states, a causal convolution of `d_conv` steps
    and the selective scan (`scan.selective_scan`, which never holds every state).

    Parameters: W_in, conv_w, conv_b, W_x, W_dt, b_dt, A_log, D, W_out, made by `mamba.init`
    from the module's first "params" key (`mamba.from_mambapy` converts mambapy's); Δ's
    projection has rank `dt_rank` (None: ⌈H/16⌉) and starts in [dt_min, dt_max]. The carry
    is a `mamba.State`: h [batch, d_inner, d_state] and the convolution's window
    [batch, d_conv - 1, d_inner]. `scan_method` is one of `scan.SELECTIVE_METHODS` or "auto",
    `chunk_size` the selective scan's block length (None: about sqrt(time)). `resets`
    (bool [batch, time]) marks document starts: the state restarts and the convolution does
    not reach back past them.
    """

    d_inner: int
    d_state: int = 16
    d_conv: int = 4
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    scan_method: str = "auto"
    chunk_size: int | None = None
    scan_table: ScanTable | None = None
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        resets=None,
    ):
        """x: [batch, time, H] -> y [batch, time, H] (or (mamba.State, y))."""
        settings = (self.d_inner, self.d_state, self.d_conv, self.dt_rank, self.dt_min)
        mamba.check_settings(*settings, self.dt_max)
        _check_scan(self.scan_method, self.scan_table, scan.SELECTIVE_METHODS)
        if self.chunk_size is not None:
            _checks.positive_int("chunk_size", self.chunk_size)
        x, seq_lengths = check_sequence(x, seq_lengths)
        x = _in_compute_dtype(self, x)
        if self.has_variable("params", "W_in"):
            _checks.feature_size("x", x.shape[-1], self.get_variable("params", "W_in").shape[1])
        params = _declare_params(
            self,
            mamba.PARAM_NAMES,
            lambda key: mamba.init(key, x.shape[-1], *settings, self.dt_max),
        )
        return _call_forward(
            mamba.forward,
            params,
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
            method=self.scan_method,
            chunk_size=self.chunk_size,
            scan_table=self.scan_table,
        )

    def initial_carry(self, batch_size: int):
        return mamba.zero_state((batch_size,), self.d_inner, self.d_state, self.d_conv)

    def step(self, carry, x):
        """One step: x [batch, H] -> (mamba.State, y [batch, H]), equal to the full call."""
        return _checked_step(self, mamba.check_input, mamba.step, carry, x)


class Bidirectional(nn.Module):
    """Runs `forward_layer` forwards and `backward_layer` backwards and merges their outputs.

    With `seq_lengths` the backward layer reads each sequence from its own last valid step.
    merge: "concat" (features of both) | "sum". The carry is (forward carry, backward carry).
    """

    forward_layer: nn.Module
    backward_layer: nn.Module
    merge: str = "concat"

    @nn.compact
    def __call__(
        self, x, seq_lengths=None, *, initial_carry=None, return_carry=False, reverse=False
    ):
        _checks.one_of("merge", self.merge, ("concat", "sum"))
        carry, y = bidirectional_forward(
            self.forward_layer,
            self.backward_layer,
            self.merge,
            x,
            seq_lengths,
            initial_carry,
            reverse,
        )
        return (carry, y) if return_carry else y


def bidirectional_forward(
    forward_layer, backward_layer, merge, x, seq_lengths, initial_carry, reverse=False
):
    """Both directions of a bidirectional layer (the Linen and the NNX `Bidirectional`):
    x [batch, time, in] -> ((forward carry, backward carry), y [batch, time, out]), y the
    outputs concatenated (merge "concat") or summed ("sum")."""
    if reverse:
        raise ValueError("reverse: a Bidirectional layer already runs both ways; got True")
    fwd_carry, bwd_carry = (None, None) if initial_carry is None else initial_carry
    fwd_carry, y_f = forward_layer(x, seq_lengths, initial_carry=fwd_carry, return_carry=True)
    bwd_carry, y_b = backward_layer(
        x, seq_lengths, initial_carry=bwd_carry, return_carry=True, reverse=True
    )
    y = jnp.concatenate([y_f, y_b], axis=-1) if merge == "concat" else y_f + y_b
    return (fwd_carry, bwd_carry), y


def stack_forward(layers, x, seq_lengths=None, initial_carry=None, *, between=None, **kwargs):
    """Sequence layers in order over whole sequences, with one carry per layer.

    Each layer runs as `layer(x, seq_lengths, initial_carry=c, return_carry=True, **kwargs)` on
    the previous layer's output; `between(x)`, if given, transforms the input of every layer
    after the first (e.g. dropout). initial_carry: None (zeros) or one carry per layer.

    x [batch, time, in] -> (carries: a tuple with one carry per layer, y [batch, time, out]).
    """
    _check_carries("initial_carry", initial_carry, len(layers))
    carries = []
    for i, layer in enumerate(layers):
        if i > 0 and between is not None:
            x = between(x)
        carry = None if initial_carry is None else initial_carry[i]
        carry, x = layer(x, seq_lengths, initial_carry=carry, return_carry=True, **kwargs)
        carries.append(carry)
    return tuple(carries), x


def stack_step(layers, carry, x):
    """One step through causal layers in order (their `step`), the one-step form of
    `stack_forward`: carry (one per layer), x [batch, in] -> (carries, y [batch, out])."""
    if carry is None:
        raise ValueError(f"carry: expected a tuple of {len(layers)} per-layer carries, got None")
    _check_carries("carry", carry, len(layers))
    new = []
    for layer, c in zip(layers, carry, strict=True):
        c, x = layer.step(c, x)
        new.append(c)
    return tuple(new), x


def stack_initial_carry(layers, batch_size: int) -> tuple:
    """The zero carries of `layers` (their `initial_carry`), one per layer."""
    return tuple(layer.initial_carry(batch_size) for layer in layers)


def _check_carries(name: str, carry, n_layers: int) -> None:
    if carry is not None and (not isinstance(carry, (tuple, list)) or len(carry) != n_layers):
        raise ValueError(f"{name}: expected a tuple of {n_layers} per-layer carries")


class Stack(nn.Module):
    """Sequence layers applied in order, with dropout between them (not after the last).

    The carry is a tuple with one entry per layer. Dropout draws from the "dropout" RNG
    stream when `deterministic` is False.
    """

    layers: Sequence[nn.Module]
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(
        self,
        x,
        seq_lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        reverse=False,
        deterministic=True,
    ):
        _checks.rate("dropout_rate", self.dropout_rate)

        def dropout(x):
            return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        carries, x = stack_forward(
            self.layers,
            x,
            seq_lengths,
            initial_carry,
            between=dropout if self.dropout_rate > 0.0 else None,
            **({"reverse": True} if reverse else {}),
        )
        return (carries, x) if return_carry else x

    def initial_carry(self, batch_size: int):
        return stack_initial_carry(self.layers, batch_size)

    def step(self, carry, x):
        """One step through every layer: x [batch, in] -> (carries, y [batch, out])."""
        return stack_step(self.layers, carry, x)


class SequenceBlock(nn.Module):
    """The residual block of deep sequence models (the LRU paper's, and S4/S5's).

        z = norm(x) if prenorm else x
        z = mixer(z);  z = dropout(gelu(z))
        z = GLU(z) = W1 z * sigmoid(W2 z)   (ffn="glu")   or   W z   (ffn="gelu")
        x = x + dropout(z);  x = norm(x) if not prenorm

    `mixer` is any sequence layer with the common call signature (LRU, LSTM, ...). Padded
    positions are masked out of BatchNorm statistics and are zero in the output. `deterministic`
    turns dropout off and makes BatchNorm use its running averages. `norm_bias=False` drops the
    norm's learned shift: a constant it adds reaches the mixer as a DC input, which a long-memory
    LRU mode amplifies by up to γ/(1 - |λ|) (see docs/results.md, the adding problem).
    `dtype`, `param_dtype`: the block's own (norm, feed-forward, residual stream); the mixer
    has its own, which the models set to the same.
    """

    d_model: int
    mixer: nn.Module
    norm: str = "layer"
    prenorm: bool = True
    ffn: str = "glu"
    dropout_rate: float = 0.0
    norm_bias: bool = True
    dtype: Any = jnp.float32  # computation (see the module docstring)
    param_dtype: Any = jnp.float32  # parameter storage

    def setup(self):
        _checks.positive_int("d_model", self.d_model)
        _checks.one_of("norm", self.norm, ("layer", "batch"))
        _checks.one_of("ffn", self.ffn, ("glu", "gelu"))
        _checks.rate("dropout_rate", self.dropout_rate)
        # Flax's norms compute their statistics in float32 whatever `dtype`
        dtypes = {"dtype": compute_dtype(self), "param_dtype": self.param_dtype}
        if self.norm == "layer":
            self.norm_layer = nn.LayerNorm(use_bias=self.norm_bias, **dtypes)
        else:
            self.norm_layer = nn.BatchNorm(
                momentum=BATCHNORM_MOMENTUM, use_bias=self.norm_bias, **dtypes
            )
        width = 2 * self.d_model if self.ffn == "glu" else self.d_model
        self.out = nn.Dense(width, **dtypes)
        self.dropout = nn.Dropout(self.dropout_rate)

    def _normalise(self, x, deterministic, mask=None):
        if self.norm == "layer":
            return self.norm_layer(x)
        return self.norm_layer(x, use_running_average=deterministic, mask=mask)

    def _feed_forward(self, z, deterministic):
        dropout = functools.partial(self.dropout, deterministic=deterministic)
        return block_feed_forward(z, self.ffn, self.out, dropout)

    def __call__(
        self,
        x,
        seq_lengths=None,
        initial_carry=None,
        return_carry=False,
        deterministic=True,
        resets=None,
    ):
        """x: [batch, time, d_model] -> [batch, time, d_model] (or (carry, y)).

        `resets`, optional bool [batch, time], marks where documents packed into a row start:
        the mixer restarts its state there (recurrences) or attends within documents only
        (attention), so no state passes from one document to the next; without it the mixer
        is called as before. The arguments may be given by position, for
        `nn.remat(SequenceBlock, static_argnums=(4, 5))` (`self` counts as argument 0).
        """
        carry, x = block_forward(
            x,
            seq_lengths,
            initial_carry,
            d_model=self.d_model,
            prenorm=self.prenorm,
            normalise=lambda x, mask: self._normalise(x, deterministic, mask),
            mixer=self.mixer,
            feed_forward=lambda z: self._feed_forward(z, deterministic),
            resets=resets,
            dtype=compute_dtype(self),
        )
        return (carry, x) if return_carry else x

    def initial_carry(self, batch_size: int):
        return self.mixer.initial_carry(batch_size)

    def step(self, carry, x):
        """One step of a causal mixer: x [batch, d_model] -> (carry, y [batch, d_model])."""
        return block_step(
            carry,
            x,
            prenorm=self.prenorm,
            normalise=lambda x: self._normalise(x, True),
            mixer_step=self.mixer.step,
            feed_forward=lambda z: self._feed_forward(z, True),
            dtype=compute_dtype(self),
        )


# The residual block's computation, given its parts; the Linen and the NNX `SequenceBlock`
# both run through these.


def block_feed_forward(z, ffn: str, out, dropout):
    """dropout(GLU(dropout(gelu(z)))) (ffn "glu", out's width 2 d_model) or
    dropout(out(dropout(gelu(z)))) (ffn "gelu"): z [..., d_model] -> [..., d_model]."""
    z = out(dropout(nn.gelu(z)))
    if ffn == "glu":
        value, gate = jnp.split(z, 2, axis=-1)
        z = value * jax.nn.sigmoid(gate)
    return dropout(z)


def block_forward(
    x,
    seq_lengths,
    initial_carry,
    *,
    d_model,
    prenorm,
    normalise,
    mixer,
    feed_forward,
    resets=None,
    dtype=None,
):
    """A `SequenceBlock` over whole sequences: `normalise(x, mask)` (mask bool [batch, time,
    1] of valid steps, or None), `mixer` a sequence layer, `feed_forward(z)`; `resets` (bool
    [batch, time] or None) goes to the mixer when given; x is cast to `dtype` (the compute
    dtype; None: as it is).

    x [batch, time, d_model] -> (the mixer's carry, y [batch, time, d_model]), y zero past
    each length.
    """
    x, seq_lengths = check_sequence(x, seq_lengths)
    x = x if dtype is None else x.astype(dtype)
    _checks.feature_size("x", x.shape[-1], d_model, "features (d_model)")
    mask = None
    if seq_lengths is not None:
        mask = _time_major(padding.step_mask(seq_lengths, x.shape[1]))[..., None]  # [B, T, 1]
    z = normalise(x, mask) if prenorm else x
    extra = {} if resets is None else {"resets": resets}
    carry, z = mixer(z, seq_lengths, initial_carry=initial_carry, return_carry=True, **extra)
    x = x + feed_forward(z)
    if not prenorm:
        x = normalise(x, mask)
    if mask is not None:
        x = jnp.where(mask, x, 0.0)
    return carry, x


def block_step(carry, x, *, prenorm, normalise, mixer_step, feed_forward, dtype=None):
    """One step of a `SequenceBlock` over a causal mixer (`normalise(x)` in its evaluation
    form): x [batch, d_model] (cast to `dtype` unless None) -> (carry, y [batch, d_model])."""
    _checks.rank("x", x, 2, "[batch, d_model]")
    x = jnp.asarray(x) if dtype is None else jnp.asarray(x).astype(dtype)
    z = normalise(x) if prenorm else x
    carry, z = mixer_step(carry, z)
    x = x + feed_forward(z)
    if not prenorm:
        x = normalise(x)
    return carry, x
