"""Task heads over a stack of residual sequence blocks: classifier, regressor, language model,
and an encoder-decoder with attention (`EncoderDecoder`, `greedy_decode`).

    inputs -> encoder (Embed for tokens, Dense for floats) -> num_layers x SequenceBlock(mixer)
           -> LayerNorm -> pooling ("none" | "last" | "mean" | "attention") -> Dense head

Any mixer: "lru", "lstm", "gru", "simple_rnn", "mingru", "minlstm", "hgrn", "rglru" (Griffin's
recurrent block), "s5", "mamba" (the Mamba block) or "attention" (causal multi-head
self-attention with rotary positions: a Transformer baseline). A language model is the
"none"-pooling model over tokens; `generate` samples from it one token at a time through every
block's `step` (for attention, a key/value cache), so each new token costs one step, not a
re-run of the prefix.

Mixed precision: both models take `dtype` (computation) and `param_dtype` (storage), float32
by default, and hand them to every module they build (`nn` describes what runs in which
dtype). With dtype=jnp.bfloat16 the outputs (logits) come back in bfloat16; the training loss
casts them to float32 (`training.steps.loss_sums`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, lru, padding
from lru_jax import attention as att
from lru_jax import nn as lnn
from lru_jax.scan_table import ScanTable

MIXERS = (
    "lru", "lstm", "gru", "simple_rnn", "mingru", "minlstm", "hgrn", "rglru", "s5", "mamba",
    "attention",
)  # fmt: skip
# Mixers configured by a group of their own: name -> builder(d_model, options, context)
# returning the mixer module of one block. `options` is the model's `mixer_options` as a dict
# (the config group `model.<name>`); `context` a `MixerContext`. A new recurrence registers
# here and in MIXERS (and RECURRENT_MIXERS if the encoder-decoder may use it).
OPTION_MIXERS: dict = {}


class MixerContext(NamedTuple):
    """What a mixer builder may need beyond its options: the model's scan table, and which
    block of how many it builds (for depth-dependent settings)."""

    scan_table: ScanTable | None
    layer: int
    num_layers: int


POOLINGS = ("none", "last", "mean", "attention")


class SequenceModel(nn.Module):
    """A deep sequence model with a task head.

    Attributes:
      num_outputs: classes, regression dimensions or vocabulary size of the head.
      vocab_size: token vocabulary of the inputs (Embed encoder), or None for float inputs
        (Dense encoder).
      mixer: the mixer of every block, one of `MIXERS`.
      d_model: the residual width; recurrent mixers use it as their hidden size.
      d_state: the LRU's state size N.
      pooling: "none" (an output per step), "last" (at each sequence's last valid step),
        "mean" (over valid steps) or "attention" (a learned query, `nn.AttentionPooling`).
      num_heads: attention heads of the "attention" mixer (d_model / num_heads even).
      max_len: the "attention" mixer's key/value cache size: the most steps a sequence, or a
        prompt plus its generated continuation, may have.
      remat: rematerialised BPTT: run the blocks over time chunks of `remat_chunk` steps inside
        a scan, handing the carries from chunk to chunk, and recompute each chunk's activations
        in the backward pass. Peak memory holds one chunk's activations (plus the blocks'
        outputs) instead of every block's at every step. Outputs and gradients are unchanged;
        dropout masks differ. Recurrent mixers only (every block must be causal with a carry).
      remat_chunk: the chunk length of `remat`.
      grad_chunk: recurrent-cell mixers' backward pass: steps per weight-gradient matmul (see
        `cells.unroll`), or None for JAX's autodiff of the loop (needed for `jax.jvp`).
      sequence_axis: a mesh axis to split the LRU scans' time over (sequence parallelism;
        mixer "lru" only, applied under `jax.set_mesh`), or None.
      scan_table: the `lru_jax.scan_table.ScanTable` the LRU's "auto" scans choose from, or
        None for the built-in rule.
      mixer_options: a mixer registered in `OPTION_MIXERS`: its options as sorted (key, value)
        pairs (hashable, so the model stays a valid static argument).
      layer_rings: the LRU ring per block, ((r_min, r_max, max_phase), ...) of length
        num_layers, or () for `r_min`, `r_max`, `max_phase` in every block; other mixers
        ignore it. Lets a first block
        keep fast modes (it sees each step's input) while later blocks hold long memory.
      norm_bias: the blocks' norms learn a shift (see `nn.SequenceBlock`).
      bidirectional: each block's mixer is a pair, one reading forwards and one backwards
        within each sequence's length (`nn.Bidirectional`, outputs concatenated), as S5's
        classifiers on the Long Range Arena. Only for pooled models (a
        per-step model would see its own future); not with `remat`, `sequence_axis` or
        `resets`.
      encoder_bias: the Dense encoder of float inputs has a bias. Without it (and without norm
        bias) an input that is zero carries no constant into the recurrences.
      dtype, param_dtype: the computation's and the parameters' dtypes, of every module the
        model builds (see the module docstring); the outputs are in `dtype`.
    """

    num_outputs: int
    vocab_size: int | None = None
    mixer: str = "lru"
    d_model: int = 128
    num_layers: int = 2
    d_state: int = 128
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    scan_method: str = "auto"
    norm: str = "layer"
    prenorm: bool = True
    ffn: str = "glu"
    dropout_rate: float = 0.0
    pooling: str = "none"
    remat: bool = False
    remat_chunk: int = 256
    grad_chunk: int | None = 16
    num_heads: int = 4
    max_len: int = 2048
    sequence_axis: str | None = None
    scan_table: ScanTable | None = None
    mixer_options: tuple = ()
    layer_rings: tuple = ()
    norm_bias: bool = True
    encoder_bias: bool = True
    bidirectional: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        _checks.one_of("mixer", self.mixer, MIXERS)
        self._check_bidirectional()
        if self.mixer == "lru":
            check_layer_rings(self.layer_rings, self.num_layers)
        if self.sequence_axis is not None and self.mixer != "lru":
            raise ValueError(
                f"sequence_axis: sequence parallelism needs mixer 'lru', got mixer {self.mixer!r}"
            )
        _checks.one_of("pooling", self.pooling, POOLINGS)
        dtypes = _dtypes(self)
        if self.vocab_size is None:
            self.encoder = nn.Dense(self.d_model, use_bias=self.encoder_bias, **dtypes)
        else:
            self.encoder = nn.Embed(self.vocab_size, self.d_model, **dtypes)
        _checks.positive_int("remat_chunk", self.remat_chunk)
        if self.remat and self.norm == "batch":
            raise ValueError("remat: needs norm 'layer'; batch statistics would differ per chunk")
        if self.remat and self.mixer == "attention":
            raise ValueError("remat: for recurrent mixers; got mixer 'attention'")
        self.blocks = [
            lnn.SequenceBlock(
                self.d_model,
                self._make_mixer(layer),
                norm=self.norm,
                prenorm=self.prenorm,
                ffn=self.ffn,
                dropout_rate=self.dropout_rate,
                norm_bias=self.norm_bias,
                **dtypes,
            )
            for layer in range(self.num_layers)
        ]
        self.final_norm = nn.LayerNorm(**dtypes)
        if self.pooling == "attention":
            self.attention_pool = lnn.AttentionPooling(**dtypes)
        self.head = nn.Dense(self.num_outputs, **dtypes)

    def _check_bidirectional(self):
        if not self.bidirectional:
            return
        if self.pooling == "none":
            raise ValueError(
                "bidirectional: needs a pooled model (pooling 'last', 'mean' or 'attention'); "
                "a per-step model would see its own future, got pooling 'none'"
            )
        if self.remat:
            raise ValueError("remat: False with bidirectional (chunks run forwards only)")
        if self.sequence_axis is not None:
            raise ValueError("sequence_axis: None with bidirectional")

    def _make_mixer(self, layer: int) -> nn.Module:
        if self.bidirectional:
            return lnn.Bidirectional(self._one_way_mixer(layer), self._one_way_mixer(layer))
        return self._one_way_mixer(layer)

    def _one_way_mixer(self, layer: int) -> nn.Module:
        if self.mixer == "lru":
            mixer = lnn.LRU(
                self.d_state,
                *lru_ring(self, layer),
                self.scan_method,
                self.sequence_axis,
                scan_table=self.scan_table,
            )
        elif self.mixer == "attention":
            mixer = lnn.CausalSelfAttention(self.d_model, self.num_heads, self.max_len)
        else:
            mixer = _make_recurrent_mixer(self, layer)
        return _in_precision(self, mixer)

    def _check_inputs(self, x, name="inputs"):
        if self.vocab_size is None:
            _checks.floating(name, x, allow_complex=False)
        elif not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {x.dtype}")

    def __call__(
        self,
        x,
        lengths=None,
        *,
        initial_carry=None,
        return_carry=False,
        deterministic=True,
        resets=None,
    ):
        """x: int [batch, time] tokens or float [batch, time, features].

        `resets`, optional bool [batch, time], is true at the first step of each document
        packed into a row: every block's mixer restarts there (`nn.SequenceBlock`), so each
        document gets the outputs it would get alone.

        Returns logits/predictions [batch, time, num_outputs] (pooling "none") or
        [batch, num_outputs]; with `return_carry`, (per-block carries, outputs).
        """
        self._check_inputs(x)
        _checks.rank("inputs", x, 2 if self.vocab_size is not None else 3)
        resets = _checks.resets(resets, x.shape[:2])
        if resets is not None and self.bidirectional:
            raise ValueError("resets: None for a bidirectional model (packing is for LMs)")
        h = self.encoder(x)
        if self.remat and not self.is_initializing():
            carries, h = self._chunked_blocks(h, lengths, initial_carry, deterministic, resets)
        else:
            extra = {} if resets is None else {"resets": resets}
            carries, h = lnn.stack_forward(
                self.blocks, h, lengths, initial_carry, deterministic=deterministic, **extra
            )
        h = self.final_norm(h)
        h = self._pool(h, lengths)
        out = self.head(h)
        return (carries, out) if return_carry else out

    def _chunked_blocks(self, h, lengths, initial_carry, deterministic, resets=None):
        """The blocks over time chunks in a rematerialised scan: h [batch, time, d_model]."""
        batch, time, width = h.shape
        k = min(self.remat_chunk, time)
        n = -(-time // k)
        if lengths is None and n * k != time:  # keep the zero padding out of the carries
            lengths = jnp.full((batch,), time, jnp.int32)
        h = jnp.pad(h, ((0, 0), (0, n * k - time), (0, 0)))
        chunks = jnp.swapaxes(h.reshape(batch, n, k, width), 0, 1)  # [n, batch, k, d_model]
        if resets is not None:
            resets = jnp.pad(resets, ((0, 0), (0, n * k - time)))
            resets = jnp.swapaxes(resets.reshape(batch, n, k), 0, 1)  # [n, batch, k]
        carry = self.initial_carry(batch) if initial_carry is None else tuple(initial_carry)

        def one_chunk(model, carry, inputs, lengths):
            x, start, chunk_resets = inputs
            chunk_lengths = None if lengths is None else jnp.clip(lengths - start, 0, k)
            extra = {} if chunk_resets is None else {"resets": chunk_resets}
            return lnn.stack_forward(
                model.blocks, x, chunk_lengths, carry, deterministic=deterministic, **extra
            )

        run = nn.scan(
            nn.remat(one_chunk, prevent_cse=False),  # the scan already keeps XLA from merging
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(0, nn.broadcast),
        )
        carry, ys = run(self, carry, (chunks, jnp.arange(n) * k, resets), lengths)
        return carry, jnp.swapaxes(ys, 0, 1).reshape(batch, n * k, width)[:, :time]

    def _pool(self, h, lengths):
        if self.pooling == "none":
            return h
        time = h.shape[1]
        if lengths is None:
            lengths = jnp.full((h.shape[0],), time, jnp.int32)
        if self.pooling == "attention":
            return self.attention_pool(h, lengths)[0]
        if self.pooling == "last":
            return padding.last_valid(jnp.swapaxes(h, 0, 1), lengths, jnp.zeros_like(h[:, 0]))
        mask = jnp.swapaxes(padding.step_mask(lengths, time), 0, 1)[..., None]
        total = jnp.sum(h * mask, axis=1, dtype=jnp.promote_types(h.dtype, jnp.float32))
        return (total / jnp.maximum(lengths[:, None], 1)).astype(h.dtype)

    def initial_carry(self, batch_size: int):
        return lnn.stack_initial_carry(self.blocks, batch_size)

    def step(self, carry, x):
        """One step for generation: x int [batch] tokens (or float [batch, features]).

        Returns (carry, logits [batch, num_outputs]). Only for pooling "none".
        """
        if self.pooling != "none":
            raise ValueError(f"step: needs pooling 'none' (a per-step model), got {self.pooling}")
        carry, h = lnn.stack_step(self.blocks, carry, self.encoder(x))
        return carry, self.head(self.final_norm(h))


def sample_logits(key, logits, temperature: float = 1.0, top_k: int = 0):
    """Samples token ids [batch] from logits [batch, vocab]; temperature 0 takes the argmax.
    The softmax it samples from is float32 whatever the logits' dtype (a bfloat16 model's)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(
    model: SequenceModel,
    variables,
    prompt,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
):
    """Continues token prompts by `length` sampled tokens.

    The prompt runs through the parallel forward once (its final carries are the state after
    it); then each new token costs one `step` of every block, inside one compiled loop.

    Args:
      prompt: int [batch, prompt_len] with prompt_len >= 1.
      length: how many tokens to sample.
      temperature: softmax temperature; 0 means greedy.
      top_k: sample among the k most likely tokens only (0: all).

    Returns:
      int32 numpy [batch, length], the sampled continuation.
    """
    prompt = np.asarray(prompt)
    _checks.rank("prompt", prompt, 2, "[batch, prompt_len]")
    if prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt: expected int tokens [batch, >=1], got {prompt.dtype} {prompt.shape}"
        )
    _checks.positive_int("length", length)
    _checks.number("temperature", temperature, 0)
    _checks.integer("top_k", top_k, 0, model.num_outputs)
    if model.mixer == "attention" and prompt.shape[1] + length > model.max_len:
        raise ValueError(
            f"length: prompt ({prompt.shape[1]}) + length ({length}) exceeds the attention "
            f"cache, max_len={model.max_len}"
        )
    # Prompts are short and of any length: generation never splits time over devices.
    model = model.clone(sequence_axis=None)
    return np.asarray(
        _generate(
            model, variables, jnp.asarray(prompt, jnp.int32), length, temperature, top_k, seed
        )
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(model, variables, prompt, length, temperature, top_k, seed):
    carry, logits = model.apply(variables, prompt, return_carry=True)

    def one_token(state, key):
        carry, last_logits = state
        token = sample_logits(key, last_logits, temperature, top_k)
        carry, next_logits = model.apply(variables, carry, token, method="step")
        return (carry, next_logits), token

    keys = jax.random.split(jax.random.key(seed), length)  # seed is traced: no recompiles
    _, tokens = jax.lax.scan(one_token, (carry, logits[:, -1]), keys)
    return jnp.swapaxes(tokens, 0, 1).astype(jnp.int32)


# ---------------------------------------------------------------- encoder-decoder

RECURRENT_MIXERS = (
    "lru", "lstm", "gru", "simple_rnn", "mingru", "minlstm", "hgrn", "rglru", "s5", "mamba"
)  # fmt: skip


def _min_rnn(module):
    """The builder of minGRU/minLSTM: options expansion (N = round(expansion * d_model)),
    log_space, activation, max_timescale (chrono initialisation; 0: zero gate biases),
    scan_method."""

    def build(d_model, options, context):
        return module(
            d_state=max(1, round(options["expansion"] * d_model)),
            log_space=options["log_space"],
            activation=options["activation"],
            max_timescale=options["max_timescale"],
            scan_method=options["scan_method"],
            scan_table=context.scan_table,
        )

    return build


def _hgrn(d_model, options, context):
    """HGRN with options expansion, max_timescale (chrono initialisation of the forget gate;
    0: zero bias) and scan_method; with `lower_bound`, block k of L starts with the forget
    gate's lower bound at k/L, the paper's initial values (block 0: none)."""
    bound = context.layer / context.num_layers if options["lower_bound"] else 0.0
    return lnn.HGRN(
        d_state=max(1, round(options["expansion"] * d_model)),
        lower_bound=bound,
        max_timescale=options["max_timescale"],
        scan_method=options["scan_method"],
        scan_table=context.scan_table,
    )


def _rglru(d_model, options, context):
    """Griffin's recurrent block with options expansion (RG-LRU width N = round(expansion *
    d_model)), num_heads (the gates' blocks, a divisor of N), conv_width, r_min, r_max and
    scan_method."""
    return lnn.RecurrentBlock(
        lru_width=max(1, round(options["expansion"] * d_model)),
        num_heads=options["num_heads"],
        conv_width=options["conv_width"],
        r_min=options["r_min"],
        r_max=options["r_max"],
        scan_method=options["scan_method"],
        scan_table=context.scan_table,
    )


def _s5(d_model, options, context):
    """The S5 with its group's options (d_state, blocks, dt_min, dt_max, discretization,
    conj_sym, scan_method), the same in every block."""
    return lnn.S5(**options, scan_table=context.scan_table)


def _mamba(d_model, options, context):
    """The Mamba block with options expansion (d_inner = round(expansion * d_model)), d_state,
    d_conv, dt_rank (0: ⌈d_model/16⌉), dt_min, dt_max, scan_method and chunk_size (0: about
    sqrt(time)), the same in every block."""
    return lnn.Mamba(
        d_inner=max(1, round(options["expansion"] * d_model)),
        d_state=options["d_state"],
        d_conv=options["d_conv"],
        dt_rank=options["dt_rank"] or None,
        dt_min=options["dt_min"],
        dt_max=options["dt_max"],
        scan_method=options["scan_method"],
        chunk_size=options["chunk_size"] or None,
        scan_table=context.scan_table,
    )


OPTION_MIXERS["mingru"] = _min_rnn(lnn.MinGRU)
OPTION_MIXERS["minlstm"] = _min_rnn(lnn.MinLSTM)
OPTION_MIXERS["hgrn"] = _hgrn
OPTION_MIXERS["rglru"] = _rglru
OPTION_MIXERS["s5"] = _s5
OPTION_MIXERS["mamba"] = _mamba


def _dtypes(model) -> dict:
    """The keyword arguments that give a Flax module `model`'s dtype and param_dtype."""
    return {"dtype": _checks.float_dtype("dtype", model.dtype), "param_dtype": model.param_dtype}


def _in_precision(model, mixer: nn.Module) -> nn.Module:
    """`mixer` with `model`'s dtype and param_dtype (every mixer module takes both)."""
    return mixer.clone(**_dtypes(model))


def check_layer_rings(layer_rings: tuple, num_layers: int) -> None:
    """Refuses `layer_rings` that are not () or one valid (r_min, r_max, max_phase) per block."""
    if not layer_rings:
        return
    if len(layer_rings) != num_layers or any(len(ring) != 3 for ring in layer_rings):
        expected = f"() or {num_layers} (r_min, r_max, max_phase) triples (one per block)"
        raise ValueError(_checks.message("layer_rings", expected, layer_rings))
    for layer, ring in enumerate(layer_rings):
        try:
            lru.check_ring(*ring)
        except ValueError as err:
            raise ValueError(f"layer_rings[{layer}]: {err}") from None


def lru_ring(model, layer: int) -> tuple[float, float, float]:
    """(r_min, r_max, max_phase) of block `layer`'s LRU in `model`."""
    if model.layer_rings:
        return tuple(model.layer_rings[layer])
    return model.r_min, model.r_max, model.max_phase


def _make_recurrent_mixer(model, layer: int) -> nn.Module:
    """A registered `OPTION_MIXERS` mixer, or a recurrent cell's layer, for block `layer`."""
    if model.mixer in OPTION_MIXERS:
        context = MixerContext(model.scan_table, layer, model.num_layers)
        return OPTION_MIXERS[model.mixer](model.d_model, dict(model.mixer_options), context)
    return lnn.RecurrentLayer(model.d_model, cell=model.mixer, grad_chunk=model.grad_chunk)


ATTENTIONS = ("none", "soft", "hard")
SCORES = ("additive", "dot")
BASELINES = "baselines"  # the variable collection of REINFORCE's reward baseline


class EncoderDecoder(nn.Module):
    """A recurrent encoder and a recurrent decoder that attends over the encoder's states.

        source -> Embed -> num_layers x SequenceBlock(mixer, both directions if
                  `bidirectional`) -> LayerNorm -> memory m_1..m_S     [batch, S, d_model]
        summary s = Dense([m_1; m_last valid])                         [batch, d_model]
        decoder input at step t: Dense([Embed(y_{t-1}); s])
               -> num_layers x SequenceBlock(causal mixer) -> LayerNorm -> query q_t
        attention "none":  o_t = q_t
                  "soft":  c_t = sum_j a_tj m_j with a_t = softmax(score(q_t, m)) over the
                           valid source steps (`nn.AdditiveAttention`, Bahdanau, or
                           `nn.DotProductAttention` "general", Luong: q_t . W m_j);
                           o_t = tanh(W [q_t; c_t])
                  "hard":  c_t = m_j for one position j (`nn.HardAttention`, scaled dot
                           product scores): sampled in training, the argmax at evaluation;
                           the scores learn by `hard_estimator`:
                           "gumbel": Gumbel-softmax straight-through (one-hot forwards, soft
                             gradients backwards);
                           "reinforce": REINFORCE (`attention.reinforce`), step t's draw
                             rewarded with the decoder's log-likelihood of target t, a
                             moving-average baseline and an entropy bonus
        logits_t = Dense(o_t)                                          [batch, vocab]

    REINFORCE needs the targets in training (`targets`, `target_mask`: the train step passes
    them); its surrogate loss is added to the objective through `nn.add_loss` (collection
    `nn.LOSSES`) and its baseline is model state, collection `BASELINES` (`reward`), updated by
    every training call that makes it mutable. The draw at step t changes only logits_t (no
    input feeding), so step t's reward is the whole effect of its choice.

    The attention reads the decoder's output and is not fed back into its recurrence
    (Luong et al. 2015 without input feeding), so teacher forcing runs the decoder over the
    whole target at once (the LRU's parallel scan) and `decode_step` runs it one token at a
    time with the same result. Source and target share one vocabulary and embedding.

    Attributes:
      vocab_size: tokens of sources and targets, special tokens included (their ids are the
        task's: `TaskSpec.special_tokens`).
      mixer: the mixer of every block, one of `RECURRENT_MIXERS`.
      attention: "none" | "soft" | "hard".
      score: soft attention's score: "additive" (Bahdanau) | "dot" (Luong's "general").
      bidirectional: the encoder's blocks read the source both ways.
      hard_temperature: the Gumbel-softmax temperature of hard attention in training.
      hard_estimator: how hard attention's scores learn: "gumbel" | "reinforce".
      baseline_decay: REINFORCE: the decay of the reward baseline's moving average.
      entropy_weight: REINFORCE: the weight of the attention's entropy bonus.
      norm, prenorm, ffn, dropout_rate, norm_bias: of every `nn.SequenceBlock`.
      layer_rings: as `SequenceModel.layer_rings`.
      grad_chunk: as `SequenceModel.grad_chunk`.
      scan_table: as `SequenceModel.scan_table`.
      mixer_options: as `SequenceModel.mixer_options`.
      dtype, param_dtype: as `SequenceModel`'s (the attention's softmax in float32).
    """

    vocab_size: int
    mixer: str = "lru"
    d_model: int = 64
    num_layers: int = 1
    d_state: int = 64
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    scan_method: str = "auto"
    attention: str = "soft"
    score: str = "additive"
    bidirectional: bool = True
    hard_temperature: float = 1.0
    hard_estimator: str = "gumbel"
    baseline_decay: float = 0.9
    entropy_weight: float = 0.0
    norm: str = "layer"
    prenorm: bool = True
    ffn: str = "glu"
    dropout_rate: float = 0.0
    grad_chunk: int | None = 16
    scan_table: ScanTable | None = None
    mixer_options: tuple = ()
    layer_rings: tuple = ()
    norm_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        _checks.positive_int("vocab_size", self.vocab_size)
        if self.mixer == "lru":
            check_layer_rings(self.layer_rings, self.num_layers)
        _checks.one_of("mixer", self.mixer, RECURRENT_MIXERS)
        _checks.one_of("attention", self.attention, ATTENTIONS)
        _checks.one_of("score", self.score, SCORES)
        _checks.positive_number("hard_temperature", self.hard_temperature)
        _checks.one_of("hard_estimator", self.hard_estimator, lnn.HARD_ESTIMATORS)
        _checks.number("baseline_decay", self.baseline_decay, 0, 1, closed_high=False)
        _checks.number("entropy_weight", self.entropy_weight, 0)
        dtypes = _dtypes(self)
        self.embed = nn.Embed(self.vocab_size, self.d_model, **dtypes)
        self.encoder_blocks = [
            self._block(self._encoder_mixer(layer)) for layer in range(self.num_layers)
        ]
        self.encoder_norm = nn.LayerNorm(**dtypes)
        self.summarise = nn.Dense(self.d_model, **dtypes)
        self.bridge = nn.Dense(self.d_model, **dtypes)
        self.decoder_blocks = [
            self._block(self._make_mixer(layer)) for layer in range(self.num_layers)
        ]
        self.decoder_norm = nn.LayerNorm(**dtypes)
        if self.attention == "hard":
            self.read = lnn.HardAttention(
                estimator=self.hard_estimator, temperature=self.hard_temperature, **dtypes
            )
        if self._reinforced:
            self.reward_baseline = self.variable(BASELINES, "reward", att.init_baseline)
        elif self.attention == "soft" and self.score == "additive":
            self.read = lnn.AdditiveAttention(hidden=self.d_model, **dtypes)
        elif self.attention == "soft":
            self.read = lnn.DotProductAttention(kind="general", **dtypes)
        if self.attention != "none":
            self.combine = nn.Dense(self.d_model, **dtypes)
        self.head = nn.Dense(self.vocab_size, **dtypes)

    @property
    def _reinforced(self) -> bool:
        return self.attention == "hard" and self.hard_estimator == "reinforce"

    def _block(self, mixer):
        return lnn.SequenceBlock(
            self.d_model,
            mixer,
            norm=self.norm,
            prenorm=self.prenorm,
            ffn=self.ffn,
            dropout_rate=self.dropout_rate,
            norm_bias=self.norm_bias,
            **_dtypes(self),
        )

    def _make_mixer(self, layer: int) -> nn.Module:
        if self.mixer == "lru":
            settings = (self.d_state, *lru_ring(self, layer), self.scan_method)
            return _in_precision(self, lnn.LRU(*settings, scan_table=self.scan_table))
        return _in_precision(self, _make_recurrent_mixer(self, layer))

    def _encoder_mixer(self, layer: int) -> nn.Module:
        if self.bidirectional:
            return lnn.Bidirectional(self._make_mixer(layer), self._make_mixer(layer))
        return self._make_mixer(layer)

    def _check_tokens(self, name, x):
        _checks.rank(name, x, 2, "[batch, time]")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {x.dtype}")

    def encode(self, inputs, lengths=None, deterministic=True):
        """inputs int [batch, S] -> (memory [batch, S, d_model], summary [batch, d_model]).

        Memory past each length is zero; `lengths` int [batch] (None: all S steps valid)."""
        self._check_tokens("inputs", inputs)
        lengths = _checks.seq_lengths(lengths, inputs.shape[0], inputs.shape[1])
        _, h = lnn.stack_forward(
            self.encoder_blocks, self.embed(inputs), lengths, deterministic=deterministic
        )
        memory = self.encoder_norm(h)
        if lengths is not None:
            memory = jnp.where(
                jnp.swapaxes(padding.step_mask(lengths, inputs.shape[1]), 0, 1)[..., None],
                memory,
                0.0,
            )
            last = padding.last_valid(jnp.swapaxes(memory, 0, 1), lengths, memory[:, 0])
        else:
            last = memory[:, -1]
        return memory, self.summarise(jnp.concatenate([memory[:, 0], last], axis=-1))

    def _decoder_input(self, tokens, summary):
        """tokens int [batch, T] or [batch], summary [batch, d] -> [batch, (T,) d]."""
        e = self.embed(tokens)
        s = jnp.broadcast_to(summary[:, None] if e.ndim == 3 else summary, e.shape)
        return self.bridge(jnp.concatenate([e, s], axis=-1))

    def _read(self, queries, memory, lengths, deterministic):
        """queries [batch, T, d], memory [batch, S, d] -> (logits [batch, T, vocab],
        weights [batch, T, S] or None, the `nn.HardAttentionOutput` of hard attention or
        None)."""
        if self.attention == "none":
            return self.head(queries), None, None
        hard = None
        if self.attention == "hard":
            hard = self.read(queries, memory, key_lengths=lengths, deterministic=deterministic)
            context, weights = hard.output, hard.probs
        else:
            context, weights = self.read(queries, memory, key_lengths=lengths, return_weights=True)
        out = jnp.tanh(self.combine(jnp.concatenate([queries, context], axis=-1)))
        return self.head(out), weights, hard

    def _reinforce(self, hard, logits, targets, target_mask):
        """Adds REINFORCE's loss for the draws of `hard` and moves the baseline.

        logits [batch, T, vocab]; targets int [batch, T]; target_mask [batch, T] or None (the
        steps that count). Step t's reward is log softmax(logits_t)[targets_t], a constant.
        """
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        reward = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
        mask = None if target_mask is None else target_mask.astype(bool)
        loss, baseline = att.reinforce(
            hard.log_prob,
            reward,
            self.reward_baseline.value,
            decay=self.baseline_decay,
            entropy=hard.entropy,
            entropy_weight=self.entropy_weight,
            mask=mask,
        )
        if self.is_mutable_collection(BASELINES) and not self.is_initializing():
            self.reward_baseline.value = baseline
        lnn.add_loss(self, "reinforce", loss)

    def _check_targets(self, targets, target_mask, decoder_inputs):
        self._check_tokens("targets", targets)
        if targets.shape != decoder_inputs.shape:
            raise ValueError(
                f"targets: expected shape {decoder_inputs.shape} (decoder_inputs'), got "
                f"{targets.shape}"
            )
        if target_mask is not None and jnp.shape(target_mask) != targets.shape:
            raise ValueError(
                f"target_mask: expected shape {targets.shape} (targets'), got "
                f"{jnp.shape(target_mask)}"
            )

    def __call__(
        self,
        inputs,
        lengths=None,
        decoder_inputs=None,
        *,
        initial_carry=None,
        return_carry=False,
        return_weights=False,
        deterministic=True,
        targets=None,
        target_mask=None,
    ):
        """Teacher forcing: logits [batch, T, vocab] for every target step at once.

        inputs int [batch, S] (source), lengths int [batch], decoder_inputs int [batch, T]
        (BOS then the target shifted right). With `return_carry`, (decoder carries, logits);
        with `return_weights`, the attention weights [batch, T, S] are appended (None for
        attention "none"). targets int [batch, T] and target_mask [batch, T] (1 where a step
        counts): what REINFORCE rewards in training (hard_estimator "reinforce"; without
        them, or with `deterministic`, the scores get no gradient).
        """
        if decoder_inputs is None:
            raise ValueError("decoder_inputs: expected int tokens [batch, T], got None")
        self._check_tokens("decoder_inputs", decoder_inputs)
        if decoder_inputs.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"decoder_inputs: expected batch {inputs.shape[0]} (inputs'), got "
                f"{decoder_inputs.shape[0]}"
            )
        memory, summary = self.encode(inputs, lengths, deterministic)
        h = self._decoder_input(decoder_inputs, summary)
        carries, h = lnn.stack_forward(
            self.decoder_blocks, h, None, initial_carry, deterministic=deterministic
        )
        logits, weights, hard = self._read(self.decoder_norm(h), memory, lengths, deterministic)
        if targets is not None:
            self._check_targets(targets, target_mask, decoder_inputs)
            if self._reinforced and not deterministic:
                self._reinforce(hard, logits, targets, target_mask)
        out = (carries, logits) if return_carry else (logits,)
        out = (*out, weights) if return_weights else out
        return out if len(out) > 1 else out[0]

    def initial_carry(self, batch_size: int):
        """The decoder's zero carries."""
        return lnn.stack_initial_carry(self.decoder_blocks, batch_size)

    def decode_step(self, carry, token, memory, summary, lengths=None):
        """One decoder step: token int [batch] -> (carry, logits [batch, vocab], weights
        [batch, S] or None). memory and summary come from `encode`."""
        carry, h = lnn.stack_step(self.decoder_blocks, carry, self._decoder_input(token, summary))
        logits, weights, _ = self._read(self.decoder_norm(h)[:, None], memory, lengths, True)
        return carry, logits[:, 0], None if weights is None else weights[:, 0]


def greedy_decode(
    model: EncoderDecoder,
    variables,
    inputs,
    lengths,
    max_length: int,
    *,
    bos: int,
    eos: int,
    pad: int,
):
    """Greedy step-by-step decoding: each step feeds back the previous step's argmax.

    Args:
      inputs: int [batch, S] source tokens; lengths: int [batch] valid source steps.
      max_length: decoder steps to run.
      bos, eos, pad: the special tokens of the task (`**spec.special_tokens._asdict()`).

    Returns:
      (tokens int32 numpy [batch, max_length], PAD after the first EOS; weights float32
      numpy [batch, max_length, S] of the attention at each step, or None for attention
      "none").
    """
    inputs, lengths = np.asarray(inputs), np.asarray(lengths)
    _checks.rank("inputs", inputs, 2, "[batch, S]")
    if not np.issubdtype(inputs.dtype, np.integer):
        raise TypeError(f"inputs: expected integer token ids, got dtype {inputs.dtype}")
    _checks.seq_lengths(lengths, inputs.shape[0], inputs.shape[1])
    _checks.positive_int("max_length", max_length)
    tokens, weights = _greedy_decode(
        model,
        variables,
        jnp.asarray(inputs, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        max_length,
        bos,
    )
    tokens = np.asarray(tokens)
    ended = np.cumsum(tokens == eos, axis=1) - (tokens == eos) > 0  # strictly after an EOS
    tokens = np.where(ended, pad, tokens).astype(np.int32)
    return tokens, None if weights is None else np.asarray(weights)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _greedy_decode(model, variables, inputs, lengths, max_length, bos):
    memory, summary = model.apply(variables, inputs, lengths, method="encode")
    carry = model.apply(variables, inputs.shape[0], method="initial_carry")

    def one_step(state, _):
        carry, token = state
        carry, logits, weights = model.apply(
            variables, carry, token, memory, summary, lengths, method="decode_step"
        )
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (carry, token), (token, weights)

    start = jnp.full((inputs.shape[0],), bos, jnp.int32)
    _, (tokens, weights) = jax.lax.scan(one_step, (carry, start), None, length=max_length)
    weights = None if weights is None else jnp.swapaxes(weights, 0, 1)
    return jnp.swapaxes(tokens, 0, 1), weights
