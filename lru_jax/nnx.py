"""Flax NNX forms of the sequence layers, over the same functional core as `lru_jax.nn`.

Each class here is the NNX twin of the Linen module of the same name in `lru_jax.nn`: its
parameters are made by the same functional initialiser (`lru.init`, `Cell.init`, ...), under
the same names and shapes, it computes through the same functions, and it is called the same
way,

    layer(x, seq_lengths=None, *, initial_carry=None, return_carry=False, reverse=False)

with x [batch, time, features] (`resets` where the Linen layer takes it, `deterministic` for
`Stack` and `SequenceBlock`); causal layers have `initial_carry(batch_size)` and
`step(carry, x_t) -> (carry, y_t)`. An NNX module is built eagerly, so it is given its input
width (`in_features`) and an `nnx.Rngs` (`rngs.params()` seeds the parameters; `Stack` and
`SequenceBlock` draw dropout from `rngs.dropout()`, falling back to the default stream).

Mixed precision as in `lru_jax.nn`: every layer but `Bidirectional` and `Stack` (which hold
layers, each with its own) takes `dtype` (computation) and `param_dtype` (parameter storage),
float32 by default, checked at construction, and passes them where its Linen twin does: its
parameters are stored in `param_dtype`, x is cast to `dtype` by the same shared functions,
its Linear layers and norms get both; its step computes in `dtype` too.

Parameters are `nnx.Param`s and BatchNorm's averages `nnx.BatchStat`s, at the paths the Linen
module keeps them under; `linen_variables(module)` returns them as a Linen `variables` dict and
`load_linen(module, variables)` sets a module's from one, so a model moves between the two
forms (docs/api.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx, traverse_util

from lru_jax import _checks, attention_nn, cells, hgrn, lru, mamba, mingru, rglru, s5, scan
from lru_jax import nn as linen_nn
from lru_jax.scan_table import ScanTable

# NNX variable types and the Linen collections that hold the same arrays.
COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: linen_nn.BATCH_STATS}


def _dtypes(dtype, param_dtype) -> dict:
    """The checked compute and storage dtypes, as the keyword arguments of flax's layers."""
    return {
        "dtype": _checks.float_dtype("dtype", dtype),
        "param_dtype": _checks.float_dtype("param_dtype", param_dtype),
    }


class _Functional(nnx.Module):
    """A layer over a functional form: its parameters are the dict `init(key)` returned,
    one `nnx.Param` attribute per name, stored in `param_dtype`; `_forward`/`_step` take
    them as that dict, x in the compute dtype `dtype`."""

    in_features: int
    _features: str = "H"  # the input's feature axis in step's error messages
    _cast_params = False  # whether step computes with the parameters cast to `dtype`

    def _set_dtypes(self, dtype, param_dtype) -> None:
        for name, value in _dtypes(dtype, param_dtype).items():
            setattr(self, name, value)

    def _declare(self, params: dict) -> None:
        """Keeps the functional initialiser's `params` (float32) in `param_dtype`."""
        self._names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value.astype(self.param_dtype)))

    def params(self) -> dict:
        """The parameters as the functional form takes them: {name: array}."""
        return {name: getattr(self, name).get_value() for name in self._names}

    def _forward(self, params, u, h0, **kw):  # the functional forward, time-major
        raise NotImplementedError

    # the functional form's check_input(params, x, name) and step(params, carry, x)
    _check_input = _step = None

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
        """x: [batch, time, in_features] -> y [batch, time, out] (or (carry, y)).

        `resets`, optional bool [batch, time], restarts the state from zero at those steps.
        """
        x, seq_lengths = linen_nn.check_sequence(x, seq_lengths)
        x = x.astype(self.dtype)
        _checks.feature_size("x", x.shape[-1], self.in_features)
        return linen_nn._call_forward(
            self._forward,
            self.params(),
            x,
            seq_lengths,
            initial_carry,
            return_carry,
            resets,
            reverse=reverse,
        )

    def step(self, carry, x):
        """One step: x [batch, in_features] -> (carry, y [batch, out]), equal to the full
        call; x is cast to `dtype`."""
        return linen_nn.checked_step(
            self.params(),
            self._check_input,
            self._step,
            carry,
            x,
            self._features,
            self.dtype,
            self._cast_params,
        )


class RecurrentLayer(_Functional):
    """A layer running a functional cell (`lru_jax.cells`), as `nn.RecurrentLayer`:
    SimpleRNN, LSTM and GRU fix `cell`. Parameters: the cell's (`Cell.init`). With no scan
    to accumulate in, the cell runs wholly in `dtype`, its parameters cast to it, its carry
    in it (`initial_carry`'s default)."""

    _features = "features"
    _cast_params = True
    cell_name = "lstm"

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        cell: str | None = None,
        activation: str = "tanh",
        unroll: int = 1,
        grad_chunk: int | None = 16,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self._set_dtypes(dtype, param_dtype)
        self.cell = _checks.one_of("cell", cell or self.cell_name, ("simple_rnn", "lstm", "gru"))
        self.activation = activation
        self.unroll = unroll
        self.grad_chunk = grad_chunk
        self._declare(self.make_cell().init(rngs.params(), in_features, hidden_size))

    def make_cell(self) -> cells.Cell:
        if self.cell == "simple_rnn":
            return cells.simple_rnn(self.activation)
        return cells.get(self.cell)

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
        """x: [batch, time, in_features] -> y [batch, time, hidden] (or (carry, y)).

        `resets`, optional bool [batch, time], zeroes the carry before those steps.
        """
        x, seq_lengths = linen_nn.check_sequence(x, seq_lengths)
        x = x.astype(self.dtype)
        _checks.feature_size("x", x.shape[-1], self.in_features)
        params = {k: v.astype(x.dtype) for k, v in self.params().items()}
        carry, ys = cells.unroll(
            self.make_cell(),
            params,
            linen_nn._time_major(x),
            initial_carry,
            seq_lengths=seq_lengths,
            reverse=reverse,
            unroll=self.unroll,
            grad_chunk=self.grad_chunk,
            resets=linen_nn._time_major_resets(_checks.resets(resets, x.shape[:2])),
        )
        ys = linen_nn._time_major(ys)
        return (carry, ys) if return_carry else ys

    def initial_carry(self, batch_size: int, dtype=None):
        """The zero carry for `batch_size` sequences, in `dtype` (None: the compute dtype)."""
        dtype = self.dtype if dtype is None else dtype
        return self.make_cell().zero_carry((batch_size,), self.hidden_size, dtype)

    _check_input = staticmethod(cells.check_input)

    def _step(self, params, carry, x):
        return self.make_cell().step(params, carry, x)


class SimpleRNN(RecurrentLayer):
    """Elman RNN layer, activation "tanh" or "relu"."""

    cell_name = "simple_rnn"


class LSTM(RecurrentLayer):
    """LSTM layer; carry (c, h)."""

    cell_name = "lstm"


class GRU(RecurrentLayer):
    """GRU layer."""

    cell_name = "gru"


class _Scanned(_Functional):
    """A diagonal recurrence run by `scan.linear_scan`: `scan_method`, `scan_table`."""

    def _set_scan(self, scan_method: str, scan_table, methods=scan.METHODS) -> None:
        linen_nn._check_scan(scan_method, scan_table, methods)
        self.scan_method = scan_method
        self.scan_table = scan_table

    def _scan_kw(self) -> dict:
        return {"method": self.scan_method, "scan_table": self.scan_table}


class LRU(_Scanned):
    """Linear Recurrent Unit layer (`nn.LRU`): width H = in_features, `d_state` N complex
    modes; parameters from `lru.init`; the carry is the complex64 state [batch, N]."""

    def __init__(
        self,
        in_features: int,
        d_state: int,
        *,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        scan_method: str = "auto",
        sequence_axis: str | None = None,
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.d_state = _checks.positive_int("d_state", d_state)
        lru.check_ring(r_min, r_max, max_phase)
        self._set_scan(scan_method, scan_table)
        self.sequence_axis = sequence_axis
        self._declare(lru.init(rngs.params(), in_features, d_state, r_min, r_max, max_phase))

    def _forward(self, params, u, h0, **kw):
        return lru.forward(params, u, h0, **kw, **self._scan_kw(), sequence_axis=self.sequence_axis)

    _check_input = staticmethod(lru.check_input)
    _step = staticmethod(lru.step)

    def initial_carry(self, batch_size: int):
        return lru.zero_state((batch_size,), self.d_state)


class MinRNN(_Scanned):
    """minGRU or minLSTM layer (`nn.MinRNN`): `cell` "mingru" | "minlstm" (`MinGRU`,
    `MinLSTM` fix it); parameters from `mingru.init`; the carry is float32 [batch, N]."""

    cell_name = "mingru"

    def __init__(
        self,
        in_features: int,
        d_state: int,
        *,
        cell: str | None = None,
        proj_out: bool | None = None,
        log_space: bool = False,
        activation: str = "g",
        scan_method: str = "auto",
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        cell = cell or self.cell_name
        _checks.positive_int("in_features", in_features)
        mingru.check_form(log_space, activation)
        self._set_scan(scan_method, scan_table, scan.LOG_METHODS if log_space else scan.METHODS)
        proj_out = mingru.check_cell(cell, in_features, d_state, proj_out)
        self.in_features, self.d_state, self.cell = in_features, d_state, cell
        self.log_space, self.activation = log_space, activation
        params = mingru.init(rngs.params(), in_features, d_state, cell=cell, proj_out=proj_out)
        self._declare(params)

    def _forward(self, params, u, h0, **kw):
        return mingru.forward(
            params,
            u,
            h0,
            **kw,
            **self._scan_kw(),
            log_space=self.log_space,
            activation=self.activation,
        )

    _check_input = staticmethod(mingru.check_input)

    def _step(self, params, carry, x):
        return mingru.step(params, carry, x, activation=self.activation)

    def initial_carry(self, batch_size: int):
        return jnp.zeros((batch_size, self.d_state), jnp.float32)


class MinGRU(MinRNN):
    """minGRU layer."""

    cell_name = "mingru"


class MinLSTM(MinRNN):
    """minLSTM layer."""

    cell_name = "minlstm"


class HGRN(_Scanned):
    """HGRN's token mixer, the HGRU (`nn.HGRN`); parameters from `hgrn.init`; the carry is
    the complex64 state [batch, N]."""

    def __init__(
        self,
        in_features: int,
        d_state: int,
        *,
        lower_bound: float = 0.0,
        scan_method: str = "auto",
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.d_state = _checks.positive_int("d_state", d_state)
        hgrn.check_lower_bound(lower_bound)
        self._set_scan(scan_method, scan_table)
        self._declare(hgrn.init(rngs.params(), in_features, d_state, lower_bound))

    def _forward(self, params, u, h0, **kw):
        return hgrn.forward(params, u, h0, **kw, **self._scan_kw())

    _check_input = staticmethod(hgrn.check_input)
    _step = staticmethod(hgrn.step)

    def initial_carry(self, batch_size: int):
        return hgrn.zero_state((batch_size,), self.d_state)


class S5(_Scanned):
    """The S5 layer (`nn.S5`); parameters from `s5.init`; the carry is the complex64 state
    [batch, P'] (P' = d_state / 2 with `conj_sym`)."""

    def __init__(
        self,
        in_features: int,
        d_state: int,
        *,
        blocks: int = 1,
        conj_sym: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        discretization: str = "zoh",
        scan_method: str = "auto",
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        self.in_features = _checks.positive_int("in_features", in_features)
        settings = (d_state, blocks, conj_sym, dt_min, dt_max)
        s5.check_options(*settings, discretization)
        self._set_scan(scan_method, scan_table)
        self.d_state, self.conj_sym, self.discretization = d_state, conj_sym, discretization
        self._declare(s5.init(rngs.params(), in_features, *settings))

    def _form(self) -> dict:
        return {"conj_sym": self.conj_sym, "discretization": self.discretization}

    def _forward(self, params, u, h0, **kw):
        return s5.forward(params, u, h0, **kw, **self._scan_kw(), **self._form())

    _check_input = staticmethod(s5.check_input)

    def _step(self, params, carry, x):
        return s5.step(params, carry, x, **self._form())

    def initial_carry(self, batch_size: int):
        return s5.zero_state((batch_size,), self.d_state // 2 if self.conj_sym else self.d_state)


class RGLRU(_Scanned):
    """The RG-LRU (`nn.RGLRU`): x [batch, time, width] to its states; parameters from
    `rglru.init`; the carry is the float32 state [batch, width]."""

    _features = "N"

    def __init__(
        self,
        width: int,
        *,
        num_heads: int = 1,
        r_min: float = 0.9,
        r_max: float = 0.999,
        scan_method: str = "auto",
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        rglru.check_settings(width, num_heads, r_min, r_max)
        self._set_scan(scan_method, scan_table)
        self.in_features = self.width = width
        self._declare(rglru.init(rngs.params(), width, num_heads, r_min, r_max))

    def _forward(self, params, u, h0, **kw):
        return rglru.forward(params, u, h0, **kw, **self._scan_kw())

    _check_input = staticmethod(rglru.check_input)
    _step = staticmethod(rglru.step)

    def initial_carry(self, batch_size: int):
        return rglru.zero_state((batch_size,), self.width)


class RecurrentBlock(_Scanned):
    """Griffin's recurrent block (`nn.RecurrentBlock`); parameters from `rglru.block_init`;
    the carry is an `rglru.BlockState`."""

    def __init__(
        self,
        in_features: int,
        lru_width: int,
        *,
        num_heads: int = 1,
        conv_width: int = 4,
        r_min: float = 0.9,
        r_max: float = 0.999,
        scan_method: str = "auto",
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        rglru.check_settings(lru_width, num_heads, r_min, r_max)
        self._set_scan(scan_method, scan_table)
        self.in_features = _checks.positive_int("in_features", in_features)
        rglru.check_block_settings(in_features, conv_width)
        self.lru_width, self.conv_width = lru_width, conv_width
        settings = (lru_width, num_heads, conv_width, r_min, r_max)
        self._declare(rglru.block_init(rngs.params(), in_features, *settings))

    def _forward(self, params, u, h0, **kw):
        return rglru.block_forward(params, u, h0, **kw, **self._scan_kw())

    _check_input = staticmethod(rglru.check_block_input)
    _step = staticmethod(rglru.block_step)

    def initial_carry(self, batch_size: int):
        return rglru.block_zero_state((batch_size,), self.lru_width, self.conv_width)


class Mamba(_Scanned):
    """The Mamba block (`nn.Mamba`); parameters from `mamba.init`; the carry is a
    `mamba.State`. `scan_method` is one of `scan.SELECTIVE_METHODS` or "auto"."""

    def __init__(
        self,
        in_features: int,
        d_inner: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        scan_method: str = "auto",
        chunk_size: int | None = None,
        scan_table: ScanTable | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._set_dtypes(dtype, param_dtype)
        settings = (d_inner, d_state, d_conv, dt_rank, dt_min, dt_max)
        mamba.check_settings(*settings)
        self._set_scan(scan_method, scan_table, scan.SELECTIVE_METHODS)
        if chunk_size is not None:
            _checks.positive_int("chunk_size", chunk_size)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.d_inner, self.d_state, self.d_conv, self.chunk_size = (
            d_inner,
            d_state,
            d_conv,
            chunk_size,
        )
        self._declare(mamba.init(rngs.params(), in_features, *settings))

    def _forward(self, params, u, h0, **kw):
        return mamba.forward(params, u, h0, **kw, **self._scan_kw(), chunk_size=self.chunk_size)

    _check_input = staticmethod(mamba.check_input)
    _step = staticmethod(mamba.step)

    def initial_carry(self, batch_size: int):
        return mamba.zero_state((batch_size,), self.d_inner, self.d_state, self.d_conv)


class Bidirectional(nnx.Module):
    """Runs `forward_layer` forwards and `backward_layer` backwards (within each length) and
    merges their outputs: "concat" | "sum" (`nn.Bidirectional`). The carry is (forward
    carry, backward carry)."""

    def __init__(self, forward_layer: nnx.Module, backward_layer: nnx.Module, merge="concat"):
        self.forward_layer, self.backward_layer = forward_layer, backward_layer
        self.merge = _checks.one_of("merge", merge, ("concat", "sum"))

    def __call__(
        self, x, seq_lengths=None, *, initial_carry=None, return_carry=False, reverse=False
    ):
        """x [batch, time, in] -> y [batch, time, out] (or ((fwd carry, bwd carry), y))."""
        carry, y = linen_nn.bidirectional_forward(
            self.forward_layer,
            self.backward_layer,
            self.merge,
            x,
            seq_lengths,
            initial_carry,
            reverse,
        )
        return (carry, y) if return_carry else y


class Stack(nnx.Module):
    """Sequence layers applied in order, with dropout between them (`nn.Stack`); the carry
    is a tuple with one entry per layer. Dropout draws from `rngs` when `deterministic` is
    False (`rngs` is needed only when `dropout_rate` > 0); as in `nn.Stack`, `deterministic`
    is that dropout's alone: the layers are called without it (blocks in evaluation mode)."""

    def __init__(
        self,
        layers: Sequence[nnx.Module],
        *,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs | None = None,
    ):
        self.dropout_rate = _checks.rate("dropout_rate", dropout_rate)
        self.layers = nnx.List(list(layers))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0.0 else None

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
        """x [batch, time, in] -> y [batch, time, out] (or (carries, y))."""
        between = None
        if self.dropout is not None:
            between = functools.partial(self.dropout, deterministic=deterministic)
        carries, x = linen_nn.stack_forward(
            list(self.layers),
            x,
            seq_lengths,
            initial_carry,
            between=between,
            **({"reverse": True} if reverse else {}),
        )
        return (carries, x) if return_carry else x

    def initial_carry(self, batch_size: int):
        return linen_nn.stack_initial_carry(list(self.layers), batch_size)

    def step(self, carry, x):
        """One step through every layer: x [batch, in] -> (carries, y [batch, out])."""
        return linen_nn.stack_step(list(self.layers), carry, x)


class SequenceBlock(nnx.Module):
    """The residual block (`nn.SequenceBlock`): norm ("layer" | "batch", before the mixer
    with `prenorm`, else after the residual), the mixer (any sequence layer here), gelu,
    dropout, the GLU ("glu") or a dense layer ("gelu"), dropout, the residual.

    Parameters: the mixer's, `norm_layer` (LayerNorm or BatchNorm, whose running averages are
    `nnx.BatchStat`s, momentum 0.9) and `out` (kernel [d_model, 2 d_model] for the GLU).
    `deterministic` turns dropout off and makes BatchNorm use its running averages.
    `dtype`, `param_dtype`: the block's own (norm, feed-forward, residual stream, x cast to
    `dtype`); the mixer keeps its own.
    """

    def __init__(
        self,
        d_model: int,
        mixer: nnx.Module,
        *,
        norm: str = "layer",
        prenorm: bool = True,
        ffn: str = "glu",
        dropout_rate: float = 0.0,
        norm_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_model = _checks.positive_int("d_model", d_model)
        dtypes = _dtypes(dtype, param_dtype)
        self.dtype, self.param_dtype = dtypes["dtype"], dtypes["param_dtype"]
        self.norm = _checks.one_of("norm", norm, ("layer", "batch"))
        self.ffn = _checks.one_of("ffn", ffn, ("glu", "gelu"))
        self.dropout_rate = _checks.rate("dropout_rate", dropout_rate)
        self.prenorm = prenorm
        self.mixer = mixer
        # flax's norms compute their statistics in float32 whatever `dtype`
        if norm == "layer":
            self.norm_layer = nnx.LayerNorm(d_model, use_bias=norm_bias, **dtypes, rngs=rngs)
        else:  # Linen's BatchNorm defaults: momentum 0.9 as `nn.SequenceBlock`, epsilon 1e-5
            self.norm_layer = nnx.BatchNorm(
                d_model, momentum=0.9, use_bias=norm_bias, **dtypes, rngs=rngs
            )
        width = 2 * d_model if ffn == "glu" else d_model
        self.out = nnx.Linear(d_model, width, **dtypes, rngs=rngs)
        # no random stream where nothing is dropped: the state is then parameters only
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0.0 else None)

    def _normalise(self, x, deterministic, mask=None):
        if self.norm == "layer":
            return self.norm_layer(x)
        return self.norm_layer(x, use_running_average=deterministic, mask=mask)

    def _feed_forward(self, z, deterministic):
        dropout = functools.partial(self.dropout, deterministic=deterministic)
        return linen_nn.block_feed_forward(z, self.ffn, self.out, dropout)

    def __call__(
        self,
        x,
        seq_lengths=None,
        initial_carry=None,
        return_carry=False,
        deterministic=True,
        resets=None,
    ):
        """x: [batch, time, d_model] -> [batch, time, d_model] (or (carry, y)); `resets`
        (bool [batch, time]) goes to the mixer, as in `nn.SequenceBlock`."""
        carry, x = linen_nn.block_forward(
            x,
            seq_lengths,
            initial_carry,
            d_model=self.d_model,
            prenorm=self.prenorm,
            normalise=lambda x, mask: self._normalise(x, deterministic, mask),
            mixer=self.mixer,
            feed_forward=lambda z: self._feed_forward(z, deterministic),
            resets=resets,
            dtype=self.dtype,
        )
        return (carry, x) if return_carry else x

    def initial_carry(self, batch_size: int):
        return self.mixer.initial_carry(batch_size)

    def step(self, carry, x):
        """One step of a causal mixer: x [batch, d_model] -> (carry, y [batch, d_model])."""
        return linen_nn.block_step(
            carry,
            x,
            prenorm=self.prenorm,
            normalise=lambda x: self._normalise(x, True),
            mixer_step=self.mixer.step,
            feed_forward=lambda z: self._feed_forward(z, True),
            dtype=self.dtype,
        )


class CausalSelfAttention(nnx.Module):
    """Causal multi-head self-attention with rotary positions, a sequence mixer
    (`nn.CausalSelfAttention`): the carry is an `nn.KVCache` of at most `max_len` steps.
    Parameters: `query`, `key`, `value` (kernel [d_model, heads, head_dim], bias [heads,
    head_dim]) and `out` (kernel [heads, head_dim, d_model], bias [d_model]), stored in
    `param_dtype`; the projections, scores and cache in `dtype` (the softmax in float32)."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        max_len: int = 2048,
        rope_base: float = 10_000.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        attention_nn.check_self_attention(d_model, num_heads, max_len)
        self.d_model, self.num_heads, self.max_len = d_model, num_heads, max_len
        self.rope_base = rope_base
        dtypes = _dtypes(dtype, param_dtype)
        self.dtype, self.param_dtype = dtypes["dtype"], dtypes["param_dtype"]
        shape = (num_heads, d_model // num_heads)
        self.query = nnx.LinearGeneral(d_model, shape, **dtypes, rngs=rngs)
        self.key = nnx.LinearGeneral(d_model, shape, **dtypes, rngs=rngs)
        self.value = nnx.LinearGeneral(d_model, shape, **dtypes, rngs=rngs)
        self.out = nnx.LinearGeneral(shape, d_model, axis=(-2, -1), **dtypes, rngs=rngs)

    def _project(self, x, positions):
        return attention_nn.rotary_project(
            self.query, self.key, self.value, x, positions, self.rope_base
        )

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
        """x [batch, time, d_model] -> y [batch, time, d_model] (or (KVCache, y)); `resets`
        (bool [batch, time]) keeps each query within its document."""
        cache, y = attention_nn.self_attention_forward(
            self._project,
            self.out,
            x,
            seq_lengths,
            initial_carry,
            reverse=reverse,
            d_model=self.d_model,
            num_heads=self.num_heads,
            max_len=self.max_len,
            return_carry=return_carry,
            resets=resets,
            dtype=self.dtype,
        )
        return (cache, y) if return_carry else y

    def initial_carry(self, batch_size: int, dtype=None):
        """An empty cache for `batch_size` sequences, in `dtype` (None: the compute dtype)."""
        dtype = self.dtype if dtype is None else dtype
        return attention_nn.empty_cache(
            batch_size, self.max_len, self.d_model, self.num_heads, dtype
        )

    def step(self, carry, x):
        """One step at position `carry.index`: x [batch, d_model] -> (KVCache, y)."""
        return attention_nn.self_attention_step(
            self._project, self.out, carry, x, self.d_model, self.dtype
        )


# Moving parameters between the two forms.


def _linen_path(path) -> tuple:
    """An NNX state path as the Linen one: list items (int keys) are named as Linen names a
    list attribute's modules, ("layers", 0) -> "layers_0"."""
    names = []
    for key in path:
        if isinstance(key, int):
            names[-1] = f"{names[-1]}_{key}"
        else:
            names.append(str(key))
    return tuple(names)


def _variables_of(module: nnx.Module, kind):
    """{Linen path: the nnx Variable} of `module`'s variables of type `kind`."""
    return {_linen_path(path): v for path, v in nnx.to_flat_state(nnx.state(module, kind))}


def linen_variables(module: nnx.Module) -> dict:
    """The module's parameters and BatchNorm statistics as the Linen twin's `variables`:
    {"params": {...}} (and "batch_stats" where it has them), nested by the Linen names. The
    dropout streams' state is not a Linen variable and is left out."""
    variables = {}
    for kind, collection in COLLECTIONS.items():
        flat = {path: v.get_value() for path, v in _variables_of(module, kind).items()}
        if flat:
            variables[collection] = traverse_util.unflatten_dict(flat)
    return variables


def load_linen(module: nnx.Module, variables) -> nnx.Module:
    """Sets `module`'s parameters and BatchNorm statistics, in place, to those of a Linen
    `variables` dict of its Linen twin ({"params": ..., "batch_stats": ...}); returns it.

    Every array the module has must be there under its Linen name with its shape, and
    nothing else may be: a `ValueError` names the first path that differs, and then nothing
    is changed. The module may be abstract (`nnx.eval_shape`): this makes it concrete.
    """
    if not hasattr(variables, "get"):
        _checks.fail("variables", "a Linen variables dict", type(variables).__name__, TypeError)
    updates = []
    for kind, collection in COLLECTIONS.items():
        ours = _variables_of(module, kind)
        theirs = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path in sorted(set(ours) ^ set(theirs)):
            where = "missing from variables" if path in ours else "not in the module"
            _checks.fail(f"variables[{collection!r}]", "the module's names", f"{path} {where}")
        for path, var in ours.items():
            now = var.get_value()  # maybe abstract
            if jnp.shape(theirs[path]) != now.shape:
                where = f"{collection}/{'/'.join(path)}"
                _checks.fail(where, str(now.shape), jnp.shape(theirs[path]))
            updates.append((var, theirs[path], now.dtype))
    for var, value, dtype in updates:
        var.set_value(jnp.asarray(value, dtype))
    return module
