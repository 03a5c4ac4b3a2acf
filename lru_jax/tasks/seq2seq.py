"""Sequence-to-sequence tasks: reverse or sort a variable-length token sequence.

Every seq2seq task (these and `cocktail_party`) shares one token layout and batch format:

    tokens:  0 PAD, 1 BOS, 2 EOS, then task tokens
    "inputs":         int32 [batch, src_len]      the source, PAD after its length
    "lengths":        int32 [batch]               valid source steps
    "decoder_inputs": int32 [batch, target_len]   BOS y_1 .. y_L PAD ..   (teacher forcing)
    "targets":        int32 [batch, target_len]   y_1 .. y_L EOS PAD ..
    "mask":           float32 [batch, target_len] 1 on the L + 1 steps up to and with EOS
"""

from __future__ import annotations

import math

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import SpecialTokens, TaskSpec, check_batch_args, check_split, split_rng

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = SpecialTokens(pad=PAD, bos=BOS, eos=EOS)
NUM_SPECIAL = 3
OPERATIONS = ("reverse", "sort")


def teacher_forcing(outputs: np.ndarray, lengths: np.ndarray, target_len: int) -> dict:
    """Decoder inputs, targets and mask for target sequences.

    outputs: int [batch, >= max(lengths)] target tokens, valid up to `lengths` [batch].
    Returns int32 decoder_inputs, targets and float32 mask, each [batch, target_len].
    """
    batch = outputs.shape[0]
    steps = np.arange(target_len)[None, :]
    body = np.zeros((batch, target_len), np.int32)
    width = min(outputs.shape[1], target_len)
    body[:, :width] = outputs[:, :width]
    body = np.where(steps < lengths[:, None], body, PAD)
    targets = np.where(steps == lengths[:, None], EOS, body).astype(np.int32)
    decoder_inputs = np.full((batch, target_len), PAD, np.int32)
    decoder_inputs[:, 0] = BOS
    decoder_inputs[:, 1:] = body[:, :-1]
    mask = (steps <= lengths[:, None]).astype(np.float32)
    return {"decoder_inputs": decoder_inputs, "targets": targets, "mask": mask}


def target_entropy_per_step(
    operation: str, num_symbols: int, min_length: int, max_length: int
) -> float:
    """The best loss (nats per target step, EOS included) of a decoder that never sees the
    source: the entropy of the target sequence divided by its expected number of steps.

    With L uniform in [min_length, max_length] and iid uniform symbols, H(target) = H(L) +
    E[H(tokens | L)], where H(tokens | L) = L log V for the reversed sequence and, for the
    sorted one (a multiset), L log V - log L! + V E[log c!] with c ~ Binomial(L, 1/V).
    """
    lengths = np.arange(min_length, max_length + 1)
    v = num_symbols
    per_length = []
    for n in lengths:
        h = n * math.log(v)
        if operation == "sort":
            counts = np.arange(n + 1)
            log_pmf = (
                np.array(
                    [
                        math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
                        for c in counts
                    ]
                )
                + counts * math.log(1 / v)
                + (n - counts) * math.log1p(-1 / v)
            )
            expected_log_fact = np.sum(np.exp(log_pmf) * [math.lgamma(c + 1) for c in counts])
            h += -math.lgamma(n + 1) + v * expected_log_fact
        per_length.append(h)
    total = math.log(len(lengths)) + float(np.mean(per_length))
    return total / (float(np.mean(lengths)) + 1.0)


class SequenceTransduction:
    """Map a random token sequence to its reversal or its sorted form.

    Sources have L ~ uniform[min_length, max_length] symbols drawn uniformly from
    `num_symbols` ids (NUM_SPECIAL .. NUM_SPECIAL + num_symbols - 1); the target is the same
    symbols reversed ("reverse") or in ascending order ("sort"), then EOS. See the module
    docstring for the batch layout: src_len = max_length, target_len = max_length + 1.

    The baseline is the loss of the best decoder that never reads the source
    (`target_entropy_per_step`); a model must beat it by reading. Splits are infinite.
    """

    def __init__(
        self,
        operation: str = "reverse",
        num_symbols: int = 10,
        min_length: int = 2,
        max_length: int = 10,
        seed: int = 0,
    ):
        self.operation = _checks.one_of("operation", operation, OPERATIONS)
        self.num_symbols = _checks.integer("num_symbols", num_symbols, 2)
        self.min_length = _checks.integer("min_length", min_length, 1)
        self.max_length = _checks.integer("max_length", max_length, self.min_length)
        self.seed = _checks.integer("seed", seed, 0)
        vocab = NUM_SPECIAL + self.num_symbols
        self.spec = TaskSpec(
            name=self.operation,
            kind="seq2seq",
            seq_len=self.max_length,
            target_len=self.max_length + 1,
            num_outputs=vocab,
            vocab_size=vocab,
            baseline=target_entropy_per_step(
                self.operation, self.num_symbols, self.min_length, self.max_length
            ),
            baseline_metric="loss",
            special_tokens=SPECIAL_TOKENS,
        )

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def transform(self, source: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The target symbols of sources int [batch, src_len] (valid up to `lengths`)."""
        steps = np.arange(source.shape[1])[None, :]
        valid = steps < lengths[:, None]
        if self.operation == "reverse":
            index = np.where(valid, lengths[:, None] - 1 - steps, steps)
            return np.take_along_axis(source, index, axis=1)
        # PAD sorts after every symbol when given a large key.
        return np.sort(np.where(valid, source, np.iinfo(np.int32).max), axis=1)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs int32 [batch_size, max_length], lengths int32 [batch_size], and
        decoder_inputs, targets, mask [batch_size, max_length + 1]."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        n = self.max_length
        lengths = rng.integers(self.min_length, n + 1, batch_size).astype(np.int32)
        symbols = rng.integers(NUM_SPECIAL, NUM_SPECIAL + self.num_symbols, (batch_size, n))
        inputs = np.where(np.arange(n)[None] < lengths[:, None], symbols, PAD).astype(np.int32)
        out = teacher_forcing(self.transform(inputs, lengths), lengths, self.spec.target_len)
        return {"inputs": inputs, "lengths": lengths, **out}


class Reverse(SequenceTransduction):
    """`SequenceTransduction` with operation "reverse"."""

    def __init__(self, num_symbols=10, min_length=2, max_length=10, seed=0):
        super().__init__("reverse", num_symbols, min_length, max_length, seed)


class Sort(SequenceTransduction):
    """`SequenceTransduction` with operation "sort"."""

    def __init__(self, num_symbols=10, min_length=2, max_length=10, seed=0):
        super().__init__("sort", num_symbols, min_length, max_length, seed)
