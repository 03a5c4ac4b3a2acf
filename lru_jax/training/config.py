"""Checks a training config before anything compiles, and builds the model it describes.

A config (see configs/default.py) has sections `task` (name + the task's keyword arguments),
`model`, `train`, `sharding` (how devices are used: lru_jax/training/sharding.py) and
`generate`, plus `seed`. Every bad value is a ValueError naming its key, e.g.
"config.model.d_model: expected a positive int, got -4".
"""

from __future__ import annotations

import math
import os

import ml_collections

from lru_jax import lru, models, scan
from lru_jax.tasks.base import TaskSpec
from lru_jax.training.optim import OPTIMIZERS

SECTIONS = ("task", "model", "train", "sharding", "generate")

# The LRU paper's initialisation for long-range tasks: eigenvalues near the unit circle
# (slow decay) with small phases.
LONG_RANGE_RING = {"r_min": 0.9, "r_max": 0.999, "max_phase": 2 * math.pi / 10}


def default_config() -> ml_collections.ConfigDict:
    """Every key a config has, with defaults; experiment files change what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict({"name": "text", "corpus": "jokes", "seq_len": 128})
    c.model = ml_collections.ConfigDict(
        {
            "cell": "lru",  # lru | lstm | gru | simple_rnn | attention
            "d_model": 128,
            "num_layers": 2,
            "d_state": 128,  # LRU state size N
            "r_min": 0.0,
            "r_max": 1.0,
            "max_phase": 2 * math.pi,
            "scan_method": "auto",
            "norm": "layer",  # layer | batch
            "prenorm": True,
            "ffn": "glu",  # glu | gelu
            "dropout_rate": 0.1,
            "pooling": "none",  # none (per-step outputs) | last | mean | attention
            "remat": False,  # rematerialised BPTT over time chunks (see SequenceModel)
            "remat_chunk": 256,
            # LSTM/GRU/SimpleRNN backward: steps per weight-gradient matmul (cells.unroll);
            # 0: JAX's autodiff of the loop instead (slower; needed for forward-mode jax.jvp)
            "grad_chunk": 16,
            "num_heads": 4,  # attention mixer: heads (d_model / num_heads must be even)
            "max_len": 2048,  # attention mixer: key/value cache size (sequence + generation)
            # Encoder-decoder (seq2seq tasks only):
            "attention": "soft",  # none | soft | hard (Gumbel straight-through)
            "attention_score": "additive",  # additive | dot
            "bidirectional": True,  # the encoder reads the source both ways
            "hard_temperature": 1.0,  # Gumbel-softmax temperature of hard attention
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
            "tbptt_length": 0,  # > 0: truncated BPTT with segments of this many steps
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


def _fail(key: str, expected: str, got) -> None:
    raise ValueError(f"config.{key}: expected {expected}, got {got!r}")


def _positive_int(c, section: str, name: str, allow_zero: bool = False) -> None:
    value = c[section][name]
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= (0 if allow_zero else 1)
    )
    if not ok:
        _fail(f"{section}.{name}", "a non-negative int" if allow_zero else "a positive int", value)


def _in_range(c, section: str, name: str, low: float, high: float, closed_high=False) -> None:
    value = c[section][name]
    ok = (
        isinstance(value, (int, float))
        and low <= value
        and (value <= high if closed_high else value < high)
    )
    if not ok:
        bracket = "]" if closed_high else ")"
        _fail(f"{section}.{name}", f"a number in [{low}, {high}{bracket}", value)


def _choice(c, section: str, name: str, choices) -> None:
    if c[section][name] not in choices:
        _fail(f"{section}.{name}", f"one of {list(choices)}", c[section][name])


def validate(config) -> None:
    """Checks every value that does not depend on the task."""
    for section in SECTIONS:
        if section not in config:
            raise ValueError(f"config.{section}: missing section (expected {list(SECTIONS)})")
    if not isinstance(config.task.get("name"), str):
        _fail("task.name", "a task name", config.task.get("name"))
    if not isinstance(config.seed, int):
        _fail("seed", "an int", config.seed)

    m = config.model
    for name in ("d_model", "num_layers", "d_state", "remat_chunk", "num_heads", "max_len"):
        _positive_int(config, "model", name)
    _positive_int(config, "model", "grad_chunk", allow_zero=True)
    _choice(config, "model", "cell", models.CELLS)
    _choice(config, "model", "pooling", models.POOLINGS)
    _choice(config, "model", "norm", ("layer", "batch"))
    _choice(config, "model", "ffn", ("glu", "gelu"))
    _choice(config, "model", "scan_method", (*scan.METHODS, "auto"))
    _choice(config, "model", "attention", models.ATTENTIONS)
    _choice(config, "model", "attention_score", models.SCORES)
    _choice(config, "model", "bidirectional", (True, False))
    if not (isinstance(m.hard_temperature, (int, float)) and m.hard_temperature > 0):
        _fail("model.hard_temperature", "a positive number", m.hard_temperature)
    _in_range(config, "model", "dropout_rate", 0.0, 1.0)
    if m.remat and m.norm == "batch":
        _fail("model.remat", "False with norm 'batch' (chunks would change the statistics)", True)
    if m.remat and m.cell == "attention":
        _fail("model.remat", "False with cell 'attention' (remat is for recurrent mixers)", True)
    if m.cell == "attention" and (m.d_model % m.num_heads or (m.d_model // m.num_heads) % 2):
        _fail(
            "model.num_heads",
            f"a divisor of d_model={m.d_model} leaving an even head size (rotary positions)",
            m.num_heads,
        )
    try:
        lru.check_ring(m.r_min, m.r_max, m.max_phase)
    except ValueError as err:
        raise ValueError(f"config.model.{err}") from None

    for name in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every"):
        _positive_int(config, "train", name)
    for name in (
        "per_device_batch_size",
        "warmup_steps",
        "eval_batches",
        "tbptt_length",
        "keep_checkpoints",
    ):
        _positive_int(config, "train", name, allow_zero=True)
    t = config.train
    _choice(config, "train", "optimizer", OPTIMIZERS)
    if not (isinstance(t.learning_rate, float) and t.learning_rate > 0):
        _fail("train.learning_rate", "a positive float", t.learning_rate)
    _in_range(config, "train", "min_lr_ratio", 0.0, 1.0, closed_high=True)
    _in_range(config, "train", "lru_lr_factor", 0.0, math.inf)
    _in_range(config, "train", "weight_decay", 0.0, math.inf)
    _in_range(config, "train", "grad_clip_norm", 0.0, math.inf)
    choices = t.get("scan_choices", "auto")
    settings = ("auto", "measure", "")
    if not isinstance(choices, str) or not (choices in settings or os.path.isfile(choices)):
        _fail("train.scan_choices", "'auto', 'measure', '' or a scan_choices.json file", choices)

    if config.sharding.data != -1:
        _positive_int(config, "sharding", "data")
    _positive_int(config, "sharding", "sequence")
    _choice(config, "sharding", "params", ("replicated", "fsdp"))
    _positive_int(config, "sharding", "fsdp_min_size", allow_zero=True)
    if config.sharding.sequence > 1 and m.cell != "lru":
        expected = f"1 for cell {m.cell!r} (sequence parallelism is LRU-only)"
        _fail("sharding.sequence", expected, config.sharding.sequence)

    _positive_int(config, "generate", "num_samples", allow_zero=True)
    _positive_int(config, "generate", "length")
    _positive_int(config, "generate", "top_k", allow_zero=True)
    _in_range(config, "generate", "temperature", 0.0, math.inf)
    if not isinstance(config.generate.seed, int):
        _fail("generate.seed", "an int", config.generate.seed)


def check_against_task(config, spec: TaskSpec) -> None:
    """Checks the choices that depend on what the task is."""
    pooling = config.model.pooling
    per_step = spec.kind in ("per_step", "seq2seq")
    if per_step and pooling != "none":
        _fail("model.pooling", f"'none' for the {spec.kind} task {spec.name}", pooling)
    if not per_step and pooling == "none":
        _fail(
            "model.pooling",
            f"'last' or 'mean' (or 'attention') for the {spec.kind} task {spec.name}",
            pooling,
        )
    if spec.kind == "seq2seq" and config.model.cell not in models.RECURRENT_CELLS:
        _fail(
            "model.cell",
            f"a recurrent cell {list(models.RECURRENT_CELLS)} for the encoder-decoder",
            config.model.cell,
        )
    if spec.kind == "seq2seq" and config.model.remat:
        _fail("model.remat", "False: the encoder-decoder does not rematerialise", True)
    if config.train.tbptt_length and spec.kind != "per_step":
        _fail(
            "train.tbptt_length",
            f"0: truncated BPTT needs per-step targets, and {spec.name} is {spec.kind}",
            config.train.tbptt_length,
        )
    if config.model.cell == "attention" and spec.seq_len > config.model.max_len:
        _fail(
            "model.max_len", f"at least the task's seq_len ({spec.seq_len})", config.model.max_len
        )
    seq = config.sharding.sequence
    if spec.seq_len % seq:
        _fail("sharding.sequence", f"a divisor of the task's seq_len {spec.seq_len}", seq)
    tbptt = config.train.tbptt_length
    if tbptt % seq:
        _fail("train.tbptt_length", f"a multiple of sharding.sequence ({seq})", tbptt)
    if seq > 1 and (spec.kind == "seq2seq" or config.model.remat):
        _fail("sharding.sequence", "1 for seq2seq tasks and with model.remat", seq)
    if config.generate.top_k > spec.num_outputs:
        _fail(
            "generate.top_k", f"at most the vocabulary ({spec.num_outputs})", config.generate.top_k
        )


def build_model(
    model_config, spec: TaskSpec, sequence_axis: str | None = None, scan_table=None
) -> models.SequenceModel | models.EncoderDecoder:
    """The model for `spec`: an EncoderDecoder for seq2seq tasks, else a SequenceModel.
    `sequence_axis` splits the SequenceModel's scans' time over a mesh axis (sequence
    parallelism); `scan_table` (a `ScanTable`) is what the model's "auto" scans choose from."""
    m = model_config
    shared = {  # the blocks' settings, the same for both kinds of model
        name: m[name]
        for name in (
            "cell", "d_model", "num_layers", "d_state", "r_min", "r_max", "max_phase",
            "scan_method", "norm", "prenorm", "ffn", "dropout_rate",
        )
    }  # fmt: skip
    # 0 means autodiff; runs saved before the key existed used the default, 16.
    shared["grad_chunk"] = m.get("grad_chunk", 16) or None
    shared["scan_table"] = scan_table
    if spec.kind == "seq2seq":
        return models.EncoderDecoder(
            vocab_size=spec.vocab_size,
            attention=m.attention,
            score=m.attention_score,
            bidirectional=m.bidirectional,
            hard_temperature=m.hard_temperature,
            **shared,
        )
    return models.SequenceModel(
        num_outputs=spec.num_outputs,
        vocab_size=spec.vocab_size,
        pooling=m.pooling,
        remat=m.remat,
        remat_chunk=m.remat_chunk,
        num_heads=m.num_heads,
        max_len=m.max_len,
        sequence_axis=sequence_axis,
        **shared,
    )
