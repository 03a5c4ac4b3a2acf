"""Checks a training config before anything compiles, and builds the model it describes.

A config (see configs/default.py) has sections `task` (name + the task's keyword arguments),
`model`, `train`, `sharding` (how devices are used: lru_jax/training/sharding.py) and
`generate`, plus `seed`. Every bad value is a `ConfigError` (a ValueError) naming its key,
e.g. "config.model.d_model: expected a positive int, got -4". A run's saved config from
before the model section was grouped converts with `upgrade`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import ml_collections

from lru_jax import _checks, lru, mamba, mingru, models, s5, scan
from lru_jax import nn as lnn
from lru_jax.tasks.base import TaskSpec
from lru_jax.training.checkpoints import ON_DAMAGED
from lru_jax.training.optim import OPTIMIZERS

SECTIONS = ("task", "model", "train", "sharding", "generate")


class ConfigError(ValueError):
    """A config key or value that cannot be used, named (a usage error on the command line)."""


@contextlib.contextmanager
def named_errors():
    """Raises the ValueErrors of the checks inside as ConfigErrors (same message)."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


# The LRU paper's initialisation for long-range tasks: eigenvalues near the unit circle
# (slow decay) with small phases.
LONG_RANGE_RING = {"r_min": 0.9, "r_max": 0.999, "max_phase": 2 * math.pi / 10}


# model.dtype: what the model computes in (parameters and optimiser state stay float32)
DTYPES = ("float32", "bfloat16")

# max_timescale (minGRU, minLSTM, HGRN): T > 2 starts the gate biases by chrono initialisation,
# memories of 2 to T steps (mingru.chrono_log_odds); 0: zero biases, the papers'
MIN_RNN_OPTIONS = {
    "expansion": 1.0,
    "log_space": False,
    "activation": "g",
    "max_timescale": 0.0,
    "scan_method": "auto",
}


def default_config() -> ml_collections.ConfigDict:
    """Every key a config has, with defaults; experiment files change what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # pack_documents: the text task's batches mark document starts (`resets`), where every
    # mixer restarts; a saved config without the key loads without it (the older behaviour).
    # eval_seq_len: valid and test rows of whole documents (0: seq_len); valid_ and
    # test_fraction: of the documents held out; extra_corpus: more training text (a corpus
    # name; "": none), extra_fraction of the training rows drawn from it, falling linearly to
    # 0 at step extra_steps (0: constant)
    c.task = ml_collections.ConfigDict(
        {
            "name": "text",
            "corpus": "jokes",
            "seq_len": 128,
            "pack_documents": True,
            "eval_seq_len": 0,
            "valid_fraction": 0.05,
            "test_fraction": 0.05,
            "extra_corpus": "",
            "extra_fraction": 0.5,
            "extra_steps": 0,
        }
    )
    # Keys every mixer shares sit at the top of `model`; each mixer's own keys in its group.
    c.model = ml_collections.ConfigDict(
        {
            # lru | lstm | gru | simple_rnn | mingru | minlstm | hgrn | rglru | s5 | mamba |
            # attention
            "mixer": "lru",
            "d_model": 128,
            "num_layers": 2,
            "norm": "layer",  # layer | batch
            "prenorm": True,
            "ffn": "glu",  # glu | gelu
            "dropout_rate": 0.1,
            "pooling": "none",  # none (per-step outputs) | last | mean | attention
            # pooled tasks: every block's mixer reads the sequence forwards and backwards (a
            # pair of mixers, outputs concatenated; SequenceModel.bidirectional). Not
            # `bidirectional`: that old key is seq2seq.bidirectional, the encoder's.
            "bidirectional_blocks": False,
            "remat": False,  # rematerialised BPTT over time chunks (see SequenceModel)
            "remat_chunk": 256,
            # False: no learned constant before the mixers (the blocks' norm shift, the Dense
            # encoder's bias); a constant input is what long LRU modes amplify most
            "norm_bias": True,
            "encoder_bias": True,
            # the computation's dtype: float32 | bfloat16 (mixed precision: matmuls and
            # activations in bfloat16; parameters, optimiser state, the recurrences' states,
            # norm statistics, softmax and loss in float32)
            "dtype": "float32",
            "lru": {  # the LRU mixer
                "d_state": 128,  # state size N
                "r_min": 0.0,  # the ring |lambda| is initialised on
                "r_max": 1.0,
                "max_phase": 2 * math.pi,
                # per block: ((r_min, r_max, max_phase), ...), one triple per layer; () uses
                # the ring above in every block
                "layer_rings": (),
                "scan_method": "auto",
            },
            "rnn": {  # the LSTM, GRU and SimpleRNN mixers
                # backward: steps per weight-gradient matmul (cells.unroll); 0: JAX's
                # autodiff of the loop instead (slower; needed for forward-mode jax.jvp)
                "grad_chunk": 16,
            },
            # minGRU and minLSTM (lru_jax.mingru): state size N = expansion * d_model (an
            # output projection when N != d_model); log_space: the paper's log-space form
            # (scan_method then sequential | associative | cumsum | auto); activation of the
            # candidate state: g (positive; either form) | linear (plain form only)
            "mingru": dict(MIN_RNN_OPTIONS),
            "minlstm": dict(MIN_RNN_OPTIONS),
            "hgrn": {  # HGRN's HGRU (lru_jax.hgrn)
                "expansion": 1.0,  # state size N = expansion * d_model (complex)
                # block k of L starts with the forget gate's lower bound at k/L (the paper's);
                # False: no lower bound
                "lower_bound": True,
                "max_timescale": 0.0,  # as minGRU's: chrono initialisation of the forget gate
                "scan_method": "auto",
            },
            "rglru": {  # Griffin's recurrent block around the RG-LRU (lru_jax.rglru)
                "expansion": 1.0,  # RG-LRU width N = expansion * d_model
                "num_heads": 4,  # blocks of the block-diagonal gates (a divisor of N)
                "conv_width": 4,  # steps of the causal depthwise convolution
                "r_min": 0.9,  # the ring the base decay σ(Λ) is initialised on
                "r_max": 0.999,
                "scan_method": "auto",
            },
            "s5": {  # the S5 (lru_jax.s5)
                "d_state": 128,  # latent size P (P/2 complex states with conj_sym)
                "blocks": 1,  # block-diagonal HiPPO-N initialisation: blocks of P/blocks
                "dt_min": 0.001,  # the learned timescales start uniform in log [dt_min, dt_max]
                "dt_max": 0.1,
                "discretization": "zoh",  # zoh | bilinear
                "conj_sym": True,  # keep one mode of each conjugate pair, y = 2 Re(C x) + D u
                "scan_method": "auto",
            },
            "mamba": {  # the Mamba block (lru_jax.mamba)
                "expansion": 2.0,  # channels E = expansion * d_model
                "d_state": 16,  # states N per channel
                "d_conv": 4,  # steps of the causal depthwise convolution
                "dt_rank": 0,  # rank of Δ's projection; 0: ceil(d_model / 16)
                "dt_min": 0.001,  # softplus(b_dt) starts log-uniform in [dt_min, dt_max]
                "dt_max": 0.1,
                # the selective scan: sequential | associative | chunked | auto
                "scan_method": "auto",
                "chunk_size": 0,  # steps per rematerialised block; 0: about sqrt(time)
            },
            "attention": {  # the causal self-attention mixer
                "num_heads": 4,  # d_model / num_heads must be even
                "max_len": 2048,  # key/value cache size (sequence + generation)
            },
            "seq2seq": {  # the encoder-decoder of seq2seq tasks (with a recurrent mixer)
                "attention": "soft",  # none | soft | hard (a sampled position per step)
                "attention_score": "additive",  # additive | dot
                "bidirectional": True,  # the encoder reads the source both ways
                # how hard attention learns: gumbel (Gumbel-softmax straight-through) |
                # reinforce (REINFORCE: step t's reward is log p(target t))
                "hard_estimator": "gumbel",
                "hard_temperature": 1.0,  # Gumbel-softmax temperature of hard attention
                "baseline_decay": 0.9,  # REINFORCE: moving-average decay of the reward baseline
                "entropy_weight": 0.0,  # REINFORCE: weight of the attention's entropy bonus
            },
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "batch_size": 32,  # the global batch, over all devices
            "per_device_batch_size": 0,  # > 0: the global batch is this x data devices
            "num_steps": 1000,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "min_lr_ratio": 0.05,
            "weight_decay": 0.05,
            "optimizer": "adamw",  # adamw | sgd (momentum 0.9)
            "lru_lr_factor": 0.5,  # ν, θ, γ, B learn at lr * factor, without weight decay
            "grad_clip_norm": 1.0,  # 0 turns clipping off
            # > 0: evaluation, the test and sampling use an exponential moving average of the
            # parameters, over about 1 / (1 - ema_decay) steps (e.g. 0.99); 0: the parameters
            "ema_decay": 0.0,
            # with ema_decay and BatchNorm: training batches that re-estimate BatchNorm's
            # averages for the averaged parameters before each evaluation (theirs were
            # gathered under the live parameters)
            "ema_bn_batches": 50,
            "tbptt_length": 0,  # > 0: truncated BPTT with segments of this many steps
            # a length curriculum: ((seq_len, steps), ...) trains that many steps at each
            # seq_len in turn, then the task's own seq_len (tasks with a seq_len key)
            "length_curriculum": (),
            "log_every": 50,
            "eval_every": 250,
            "eval_batches": 0,  # 0: the whole split once (or one batch if generated)
            "checkpoint_every": 250,
            "keep_checkpoints": 2,
            # the scan table the model's "auto" scans choose from: "measure": time each method
            # at this run's shapes first (saved as workdir/scan_choices.json and reused on
            # resume); "auto": measure only where the built-in rule is not itself measured (not
            # on CPU); "": the built-in rule; or a scan_choices.json file
            "scan_choices": "auto",
            # a damaged or incomplete latest checkpoint: "fallback" sets it aside (as
            # <step>.damaged) and resumes from the newest one that verifies; "stop" stops
            "on_damaged_checkpoint": "fallback",
            # a wandb project name: the run's metrics and config also go to Weights & Biases
            # (the wandb extra; WANDB_MODE=offline needs no account); "": no wandb
            "wandb": "",
        }
    )
    c.sharding = ml_collections.ConfigDict(
        {
            "data": -1,  # devices the batch is split over; -1: all not used by `sequence`
            "sequence": 1,  # devices time is split over (sequence-parallel LRU scans)
            "params": "replicated",  # replicated | fsdp (large parameters split over data)
            "fsdp_min_size": 2**14,  # smaller parameters stay replicated under fsdp
        }
    )
    c.generate = ml_collections.ConfigDict(
        {"num_samples": 5, "length": 160, "temperature": 0.8, "top_k": 0, "prompt": "", "seed": 0}
    )
    return c


# The model section before its keys were grouped: old key -> where it is now.
MOVED_MODEL_KEYS = {
    "cell": "mixer",
    "d_state": "lru.d_state",
    "r_min": "lru.r_min",
    "r_max": "lru.r_max",
    "max_phase": "lru.max_phase",
    "scan_method": "lru.scan_method",
    "grad_chunk": "rnn.grad_chunk",
    "num_heads": "attention.num_heads",
    "max_len": "attention.max_len",
    "attention": "seq2seq.attention",
    "attention_score": "seq2seq.attention_score",
    "bidirectional": "seq2seq.bidirectional",
    "hard_temperature": "seq2seq.hard_temperature",
}


def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The locked config of the config file at `path`, with dotted `overrides` applied
    ({"model.mixer": "lstm", "model.lru.r_min": 0.5}); a misspelt key is refused."""
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    config.update_from_flattened_dict(dict(overrides or {}))
    return config


def _old_model_keys(model) -> list[str]:
    # "attention" is an old key (a string) and a new group (a ConfigDict).
    groups = (dict, ml_collections.ConfigDict)
    return [k for k in MOVED_MODEL_KEYS if k in model and not isinstance(model[k], groups)]


def upgrade(config) -> ml_collections.ConfigDict:
    """A saved run's config (e.g. its config.json as a dict) in today's layout.

    A run saved before the model section was grouped has `model.cell` and flat LRU, RNN,
    attention and encoder-decoder keys: each moves to its place (MOVED_MODEL_KEYS), and model
    keys it lacks get today's defaults. A config already in today's layout is returned as is,
    except that model and train keys added since it was saved (e.g. `model.hgrn`,
    `train.length_curriculum`) get their defaults.
    """
    config = ml_collections.ConfigDict(config)
    old = _old_model_keys(config.model)
    if old:
        model = default_config().model
        for key, value in config.model.items():
            path = MOVED_MODEL_KEYS.get(key, key) if key in old else key
            group, _, name = path.rpartition(".")
            (model[group] if group else model)[name] = value
        config.model = model
    config = config.to_dict()
    defaults = default_config().to_dict()
    for section in ("model", "train"):
        _fill_missing(config[section], defaults[section])
    return ml_collections.ConfigDict(config)


def _pairs(value, key: str, size: int = 3) -> tuple:
    """`value` (tuples or, from JSON, lists) as a tuple of `size`-tuples; refused by `key`."""
    rows = value if isinstance(value, (tuple, list)) else None
    if rows is None or any(not isinstance(r, (tuple, list)) or len(r) != size for r in rows):
        _fail(key, f"a tuple of {size}-tuples", value)
    return tuple(tuple(row) for row in rows)


def length_curriculum(config) -> tuple[tuple[int, int], ...]:
    """`config.train.length_curriculum` as ((seq_len, steps), ...)."""
    return _pairs(config.train.length_curriculum, "train.length_curriculum", 2)


def _fill_missing(group, defaults) -> None:
    """Adds to dict `group` (in place) every key of `defaults` it lacks, groups included; turns
    back into tuples the lists that JSON made of tuple-valued keys."""
    for key, value in defaults.items():
        if key not in group:
            group[key] = value
        elif isinstance(value, dict):
            _fill_missing(group[key], value)
        elif isinstance(value, tuple) and isinstance(group[key], list):
            group[key] = _tuples(group[key])


def _tuples(value):
    """Nested lists (a tuple-valued key read from JSON) as nested tuples."""
    return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def _key(name: str) -> str:
    return f"config.{name}"


def _int(c, key: str, minimum: int = 1) -> None:
    """config.<key> (a dotted path below `config`) is an int >= minimum."""
    _checks.integer(_key(key), _get(c, key), minimum, type_error=ValueError)


def _number(c, key: str, low, high=math.inf, closed_high=True) -> None:
    """config.<key> is a number in [low, high] (or [low, high))."""
    value = _get(c, key)
    _checks.number(_key(key), value, low, high, closed_high=closed_high, type_error=ValueError)


def _choice(c, key: str, choices) -> None:
    _checks.one_of(_key(key), _get(c, key), choices)


def _get(c, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def _fail(key: str, expected: str, got) -> None:
    _checks.fail(_key(key), expected, got)


def validate(config) -> None:
    """Checks every value that does not depend on the task; a ConfigError names the first bad
    one."""
    with named_errors():
        _validate(config)


def _validate(config) -> None:
    for section in SECTIONS:
        if section not in config:
            _fail(section, f"a section (the sections are {list(SECTIONS)})", None)
    if not isinstance(config.task.get("name"), str):
        _fail("task.name", "a task name", config.task.get("name"))
    _checks.integer(_key("seed"), config.seed, type_error=ValueError)
    _validate_model(config)
    _validate_train(config)

    if config.sharding.data != -1:
        _int(config, "sharding.data")
    _int(config, "sharding.sequence")
    _choice(config, "sharding.params", ("replicated", "fsdp"))
    _int(config, "sharding.fsdp_min_size", 0)
    if config.sharding.sequence > 1 and config.model.mixer != "lru":
        expected = f"1 for mixer {config.model.mixer!r} (sequence parallelism is LRU-only)"
        _fail("sharding.sequence", expected, config.sharding.sequence)

    _int(config, "generate.num_samples", 0)
    _int(config, "generate.length")
    _int(config, "generate.top_k", 0)
    _number(config, "generate.temperature", 0)
    _checks.integer(_key("generate.seed"), config.generate.seed, type_error=ValueError)


def _validate_model(config) -> None:
    m = config.model
    if old := _old_model_keys(m):  # a config written for the flat layout
        raise ValueError(
            f"config.model.{old[0]}: renamed config.model.{MOVED_MODEL_KEYS[old[0]]} (see "
            "lru_jax.training.config.default_config; `upgrade` converts a saved run's config)"
        )
    for key in ("d_model", "num_layers", "remat_chunk", "lru.d_state", "attention.num_heads",
                "attention.max_len"):  # fmt: skip
        _int(config, f"model.{key}")
    _int(config, "model.rnn.grad_chunk", 0)
    _choice(config, "model.mixer", models.MIXERS)
    _choice(config, "model.pooling", models.POOLINGS)
    _choice(config, "model.bidirectional_blocks", (True, False))
    _choice(config, "model.norm", ("layer", "batch"))
    _choice(config, "model.ffn", ("glu", "gelu"))
    _choice(config, "model.lru.scan_method", (*scan.METHODS, "auto"))
    _choice(config, "model.seq2seq.attention", models.ATTENTIONS)
    _choice(config, "model.seq2seq.attention_score", models.SCORES)
    _choice(config, "model.seq2seq.bidirectional", (True, False))
    temperature = _key("model.seq2seq.hard_temperature")
    _checks.positive_number(temperature, m.seq2seq.hard_temperature, type_error=ValueError)
    _choice(config, "model.seq2seq.hard_estimator", lnn.HARD_ESTIMATORS)
    _number(config, "model.seq2seq.baseline_decay", 0, 1, closed_high=False)
    _number(config, "model.seq2seq.entropy_weight", 0)
    _checks.rate(_key("model.dropout_rate"), m.dropout_rate, type_error=ValueError)
    if m.remat and m.norm == "batch":
        _fail("model.remat", "False with norm 'batch' (chunks would change the statistics)", True)
    if m.remat and m.mixer == "attention":
        _fail("model.remat", "False with mixer 'attention' (remat is for recurrent mixers)", True)
    heads = m.attention.num_heads
    if m.mixer == "attention" and (m.d_model % heads or (m.d_model // heads) % 2):
        _fail(
            "model.attention.num_heads",
            f"a divisor of d_model={m.d_model} leaving an even head size (rotary positions)",
            heads,
        )
    _choice(config, "model.norm_bias", (True, False))
    _choice(config, "model.encoder_bias", (True, False))
    _choice(config, "model.dtype", DTYPES)
    rings = _pairs(m.lru.layer_rings, "model.lru.layer_rings")
    try:
        lru.check_ring(m.lru.r_min, m.lru.r_max, m.lru.max_phase)
        if m.mixer == "lru":  # the other mixers ignore the rings
            models.check_layer_rings(rings, m.num_layers)
    except ValueError as err:
        raise ValueError(f"config.model.lru.{err}") from None
    _validate_diagonal_mixers(config)


def _validate_diagonal_mixers(config) -> None:
    """The groups of minGRU, minLSTM, HGRN, the RG-LRU, the S5 and Mamba (models.OPTION_MIXERS'
    builders)."""
    for name in ("mingru", "minlstm", "hgrn", "rglru"):
        expansion = _key(f"model.{name}.expansion")
        _checks.positive_number(
            expansion, _get(config, f"model.{name}.expansion"), type_error=ValueError
        )
    for name in ("mingru", "minlstm", "hgrn"):
        key = f"model.{name}.max_timescale"
        mingru.check_max_timescale(_get(config, key), _key(key), type_error=ValueError)
    for name in ("mingru", "minlstm"):
        group = config.model[name]
        _choice(config, f"model.{name}.log_space", (True, False))
        _choice(config, f"model.{name}.activation", mingru.ACTIVATIONS)
        methods = scan.LOG_METHODS if group.log_space else scan.METHODS
        _choice(config, f"model.{name}.scan_method", (*methods, "auto"))
        if group.log_space and group.activation != "g":
            _fail(
                f"model.{name}.activation",
                "'g' with log_space (the log form needs h̃ > 0)",
                group.activation,
            )
    _choice(config, "model.hgrn.lower_bound", (True, False))
    _choice(config, "model.hgrn.scan_method", (*scan.METHODS, "auto"))
    _validate_rglru(config)
    _validate_s5(config)
    _validate_mamba(config)


def _validate_mamba(config) -> None:
    """model.mamba: its settings as `mamba.check_settings` names them, under the config key."""
    group = config.model.mamba
    _checks.positive_number(_key("model.mamba.expansion"), group.expansion, type_error=ValueError)
    _int(config, "model.mamba.dt_rank", 0)
    _int(config, "model.mamba.chunk_size", 0)
    _choice(config, "model.mamba.scan_method", (*scan.SELECTIVE_METHODS, "auto"))
    settings = (1, group.d_state, group.d_conv, group.dt_rank or None, group.dt_min, group.dt_max)
    try:
        mamba.check_settings(*settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.model.mamba.{err}") from None


def _validate_s5(config) -> None:
    """model.s5: its settings as `s5.check_options` names them, under the config key."""
    group = config.model.s5
    _choice(config, "model.s5.scan_method", (*scan.METHODS, "auto"))
    settings = ("d_state", "blocks", "conj_sym", "dt_min", "dt_max", "discretization")
    try:
        s5.check_options(*(group[name] for name in settings))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.model.s5.{err}") from None


def _validate_rglru(config) -> None:
    """model.rglru; the heads must divide the RG-LRU's width only where it is the mixer."""
    group = config.model.rglru
    _int(config, "model.rglru.num_heads")
    _int(config, "model.rglru.conv_width")
    _choice(config, "model.rglru.scan_method", (*scan.METHODS, "auto"))
    try:
        lru.check_radii(group.r_min, group.r_max)
    except ValueError as err:
        raise ValueError(f"config.model.rglru.{err}") from None
    width = max(1, round(group.expansion * config.model.d_model))
    if config.model.mixer == "rglru" and width % group.num_heads:
        expected = f"a divisor of the RG-LRU width {width} (expansion x d_model)"
        _fail("model.rglru.num_heads", expected, group.num_heads)


def _validate_train(config) -> None:
    t = config.train
    for name in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every"):
        _int(config, f"train.{name}")
    for name in ("per_device_batch_size", "warmup_steps", "eval_batches", "tbptt_length",
                 "keep_checkpoints", "ema_bn_batches"):  # fmt: skip
        _int(config, f"train.{name}", 0)
    _choice(config, "train.optimizer", OPTIMIZERS)
    if not (isinstance(t.learning_rate, float) and t.learning_rate > 0):
        _fail("train.learning_rate", "a positive float", t.learning_rate)
    _number(config, "train.min_lr_ratio", 0, 1)
    for index, (seq_len, steps) in enumerate(length_curriculum(config)):
        for name, value in (("seq_len", seq_len), ("steps", steps)):
            key = _key(f"train.length_curriculum[{index}].{name}")
            _checks.integer(key, value, 1, type_error=ValueError)
    for name in ("lru_lr_factor", "weight_decay", "grad_clip_norm"):
        _number(config, f"train.{name}", 0)
    _number(config, "train.ema_decay", 0, 1, closed_high=False)
    choices = t.get("scan_choices", "auto")
    settings = ("auto", "measure", "")
    if not isinstance(choices, str) or not (choices in settings or os.path.isfile(choices)):
        _fail("train.scan_choices", "'auto', 'measure', '' or a scan_choices.json file", choices)
    damaged = t.get("on_damaged_checkpoint", "fallback")  # runs saved before the key
    _checks.one_of(_key("train.on_damaged_checkpoint"), damaged, ON_DAMAGED)
    _validate_wandb(config)


def _validate_wandb(config) -> None:
    """train.wandb: a project name or ""; a name needs wandb installed (not imported here)."""
    project = config.train.get("wandb", "")
    if not isinstance(project, str):
        _fail("train.wandb", "a wandb project name or ''", project)
    if project and importlib.util.find_spec("wandb") is None:
        expected = "'' where wandb is not installed (pip install -e '.[wandb]' to use it)"
        _fail("train.wandb", expected, project)


def check_against_task(config, spec: TaskSpec) -> None:
    """Checks the choices that depend on what the task is (ConfigError)."""
    with named_errors():
        _check_against_task(config, spec)


def _check_against_task(config, spec: TaskSpec) -> None:
    m = config.model
    if length_curriculum(config) and "seq_len" not in config.task:
        _fail("train.length_curriculum", "() for a task without a seq_len key", "a curriculum")
    per_step = spec.kind in ("per_step", "seq2seq")
    if per_step and m.pooling != "none":
        _fail("model.pooling", f"'none' for the {spec.kind} task {spec.name}", m.pooling)
    if not per_step and m.pooling == "none":
        _fail(
            "model.pooling",
            f"'last' or 'mean' (or 'attention') for the {spec.kind} task {spec.name}",
            m.pooling,
        )
    if m.bidirectional_blocks:
        _check_bidirectional(config, spec)
    if spec.kind == "seq2seq" and m.mixer not in models.RECURRENT_MIXERS:
        _fail(
            "model.mixer",
            f"a recurrent mixer {list(models.RECURRENT_MIXERS)} for the encoder-decoder",
            m.mixer,
        )
    if spec.kind == "seq2seq" and m.remat:
        _fail("model.remat", "False: the encoder-decoder does not rematerialise", True)
    if config.train.tbptt_length and spec.kind != "per_step":
        _fail(
            "train.tbptt_length",
            f"0: truncated BPTT needs per-step targets, and {spec.name} is {spec.kind}",
            config.train.tbptt_length,
        )
    if m.mixer == "attention" and spec.seq_len > m.attention.max_len:
        expected = f"at least the task's seq_len ({spec.seq_len})"
        _fail("model.attention.max_len", expected, m.attention.max_len)
    seq = config.sharding.sequence
    if spec.seq_len % seq:
        _fail("sharding.sequence", f"a divisor of the task's seq_len {spec.seq_len}", seq)
    tbptt = config.train.tbptt_length
    if tbptt % seq:
        _fail("train.tbptt_length", f"a multiple of sharding.sequence ({seq})", tbptt)
    if seq > 1 and (spec.kind == "seq2seq" or m.remat):
        _fail("sharding.sequence", "1 for seq2seq tasks and with model.remat", seq)
    if config.generate.top_k > spec.num_outputs:
        _fail(
            "generate.top_k", f"at most the vocabulary ({spec.num_outputs})", config.generate.top_k
        )


def _check_bidirectional(config, spec: TaskSpec) -> None:
    if spec.kind == "seq2seq":
        expected = "False for the encoder-decoder (its encoder's is model.seq2seq.bidirectional)"
        _fail("model.bidirectional_blocks", expected, True)
    if spec.kind == "per_step":
        expected = f"False for the per-step task {spec.name} (each output would see its future)"
        _fail("model.bidirectional_blocks", expected, True)
    if config.model.remat:
        _fail("model.remat", "False with model.bidirectional_blocks", True)
    if config.sharding.sequence > 1:
        _fail("sharding.sequence", "1 with model.bidirectional_blocks", config.sharding.sequence)


def _mixer_options(m) -> tuple:
    """The config group `model.<mixer>` of a registered `models.OPTION_MIXERS` mixer, as the
    hashable `mixer_options` of the model (sorted (key, value) pairs); () for other mixers."""
    if m.mixer not in models.OPTION_MIXERS:
        return ()
    return tuple(sorted(m[m.mixer].to_dict().items()))


def build_model(
    model_config, spec: TaskSpec, sequence_axis: str | None = None, scan_table=None
) -> models.SequenceModel | models.EncoderDecoder:
    """The model for `spec`: an EncoderDecoder for seq2seq tasks, else a SequenceModel.
    `sequence_axis` splits the SequenceModel's scans' time over a mesh axis (sequence
    parallelism); `scan_table` (a `ScanTable`) is what the model's "auto" scans choose from."""
    m = model_config
    shared = {  # the blocks' settings, the same for both kinds of model
        "mixer": m.mixer,
        "d_model": m.d_model,
        "num_layers": m.num_layers,
        "norm": m.norm,
        "prenorm": m.prenorm,
        "ffn": m.ffn,
        "dropout_rate": m.dropout_rate,
        "d_state": m.lru.d_state,
        "r_min": m.lru.r_min,
        "r_max": m.lru.r_max,
        "max_phase": m.lru.max_phase,
        "scan_method": m.lru.scan_method,
        "grad_chunk": m.rnn.grad_chunk or None,  # 0 means autodiff
        "scan_table": scan_table,
        "mixer_options": _mixer_options(m),
        "layer_rings": _pairs(m.lru.layer_rings, "model.lru.layer_rings"),
        "norm_bias": m.norm_bias,
        "dtype": m.dtype,
    }
    if spec.kind == "seq2seq":
        s2s = m.seq2seq
        return models.EncoderDecoder(
            vocab_size=spec.vocab_size,
            attention=s2s.attention,
            score=s2s.attention_score,
            bidirectional=s2s.bidirectional,
            hard_temperature=s2s.hard_temperature,
            hard_estimator=s2s.hard_estimator,
            baseline_decay=s2s.baseline_decay,
            entropy_weight=s2s.entropy_weight,
            **shared,
        )
    return models.SequenceModel(
        num_outputs=spec.num_outputs,
        vocab_size=spec.vocab_size,
        pooling=m.pooling,
        remat=m.remat,
        remat_chunk=m.remat_chunk,
        num_heads=m.attention.num_heads,
        max_len=m.attention.max_len,
        sequence_axis=sequence_axis,
        encoder_bias=m.encoder_bias,
        bidirectional=m.bidirectional_blocks,
        **shared,
    )
