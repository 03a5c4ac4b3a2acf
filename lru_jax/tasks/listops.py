"""ListOps (Nangia & Bowman 2018) as in the Long Range Arena (Tay et al. 2021), generated
locally by our own seeded generator following LRA's `lra_benchmarks/data/listops.py`."""

from __future__ import annotations

import random

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import (
    SPLITS,
    TaskSpec,
    check_batch_args,
    check_split,
    epoch_batch_indices,
    sequential_indices,
)

PAD = 0
DIGIT0 = 1  # digit d is token DIGIT0 + d
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
MIN, MAX, MED, SM = range(DIGIT0 + 10, DIGIT0 + 14)
END = DIGIT0 + 14
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + list(OPERATORS) + ["]"]
VOCAB_SIZE = len(VOCAB)  # 16
_IDS = {name: i for i, name in enumerate(VOCAB)}
VALUE_P = 0.25  # LRA: below max_depth, a node is an operator with probability 0.25

# The Long Range Arena's sizes (pass them as keyword arguments); generating them takes about a
# minute on one CPU core.
LRA_SIZES = dict(
    num_train=96_000,
    num_valid=2_000,
    num_test=2_000,
    min_length=500,
    max_length=2_000,
    max_depth=10,
    max_args=10,
)


def encode(expression: str) -> np.ndarray:
    """ "[MAX 2 9 [MIN 4 7 ] 0 ]" -> int32 [num_tokens] token ids (whitespace-separated)."""
    try:
        return np.array([_IDS[word] for word in expression.split()], np.int32)
    except KeyError as err:
        raise ValueError(f"expression: unknown token {err.args[0]!r}; known {VOCAB[1:]}") from None


def to_string(tokens) -> str:
    """Token ids int [num_tokens] (padding skipped) -> "[MAX 2 9 [MIN 4 7 ] 0 ]"."""
    return " ".join(VOCAB[int(t)] for t in np.asarray(tokens).ravel() if t != PAD)


def _apply(op: int, args: list[int]) -> int:
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == SM:
        return sum(args) % 10
    # LRA computes int(np.median(args)): for an even count the mean of the two middle values,
    # truncated; for non-negative integers that is floor((lower + upper) / 2).
    s = sorted(args)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) // 2


def _parse(tokens: list[int], pos: int) -> tuple[int, int]:
    """Evaluates the expression starting at tokens[pos]; returns (value, position after it)."""
    if pos >= len(tokens):
        raise ValueError("tokens: expression ends early (missing ']')")
    token = tokens[pos]
    if DIGIT0 <= token < DIGIT0 + 10:
        return token - DIGIT0, pos + 1
    if token not in (MIN, MAX, MED, SM):
        raise ValueError(f"tokens: expected a digit or an operator at {pos}, got {token}")
    args, pos = [], pos + 1
    while pos < len(tokens) and tokens[pos] != END:
        value, pos = _parse(tokens, pos)
        args.append(value)
    if pos >= len(tokens) or not args:
        raise ValueError(f"tokens: operator {VOCAB[token]} needs arguments and a closing ']'")
    return _apply(token, args), pos + 1


def evaluate(tokens) -> int:
    """The value 0..9 of one expression, token ids int [num_tokens] (trailing padding ok)."""
    ids = [int(t) for t in np.asarray(tokens).ravel() if t != PAD]
    value, end = _parse(ids, 0)
    if end != len(ids):
        raise ValueError(f"tokens: {len(ids) - end} tokens after the end of the expression")
    return value


def _sample(rnd: random.Random, depth: int, max_depth: int, max_args: int, out: list, limit: int):
    """Appends one random tree's tokens to `out` as LRA's generate_tree draws it; returns False
    as soon as it exceeds `limit` tokens (the attempt will be rejected anyway)."""
    # The root is always an operator: a bare digit is 1 token, always rejected by min_length.
    if depth > 1 and (depth >= max_depth or rnd.random() > VALUE_P):
        out.append(DIGIT0 + rnd.randrange(10))
        return len(out) <= limit
    out.append(rnd.choice((MIN, MAX, MED, SM)))
    for _ in range(rnd.randint(2, max_args)):
        if not _sample(rnd, depth + 1, max_depth, max_args, out, limit):
            return False
    out.append(END)
    return len(out) <= limit


def _max_tokens(max_depth: int, max_args: int) -> int:
    """The longest expression possible: every node above max_depth with max_args children."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


class ListOps:
    """Evaluate a nested prefix expression of MIN, MAX, MED (median) and SM (sum mod 10) over
    digits 0..9; the answer is one of ten classes.

    Tokens: 0 pad, 1..10 the digits 0..9, 11 "[MIN", 12 "[MAX", 13 "[MED", 14 "[SM", 15 "]"
    (vocabulary 16; no parentheses, as LRA's models read it). Example:
    "[MAX 2 9 [MIN 4 7 ] 0 ]" -> 9.

    Trees are drawn as LRA draws them: the root at depth 1; below max_depth a node is an
    operator with probability 0.25 (else a digit), at max_depth always a digit, so brackets
    nest at most max_depth - 1 deep; an operator has 2..max_args arguments, chosen uniformly,
    and a uniformly chosen operator. Expressions with fewer than min_length or more than
    max_length tokens are rejected (LRA uses strict bounds; ours are inclusive). MED follows
    LRA's int(np.median(.)): for an even count the floor of the mean of the two middle values.
    Targets come from `evaluate`, a parser over the tokens, not from the generator's tree.

    Each split has its own random stream; splits are generated test, valid, train and an
    expression already drawn (in any split) is drawn again, so the splits are disjoint and
    test/valid do not change when num_train does. `LRA_SIZES` holds the benchmark's sizes.

    Batches: inputs int32 [batch, max_length] padded with 0, lengths int32 [batch], targets
    int32 [batch]. Train batches reshuffle every epoch; valid and test read in order, wrapping.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_valid: int = 500,
        num_test: int = 500,
        min_length: int = 32,
        max_length: int = 128,
        max_depth: int = 6,
        max_args: int = 5,
        seed: int = 0,
    ):
        sizes = {
            "train": _checks.integer("num_train", num_train, 1),
            "valid": _checks.integer("num_valid", num_valid, 1),
            "test": _checks.integer("num_test", num_test, 1),
        }
        self.max_depth = _checks.integer("max_depth", max_depth, 2)
        self.max_args = _checks.integer("max_args", max_args, 2)
        longest = _max_tokens(self.max_depth, self.max_args)
        self.min_length = _checks.integer("min_length", min_length, 4, longest)
        self.max_length = _checks.integer("max_length", max_length, self.min_length)
        self.seed = _checks.integer("seed", seed, 0)

        seen: set[bytes] = set()
        self._data = {}
        for split in ("test", "valid", "train"):
            self._data[split] = self._generate(split, sizes[split], seen)
        counts = np.bincount(self._data["train"][2], minlength=10)
        self.spec = TaskSpec(
            name="listops",
            kind="classification",
            seq_len=self.max_length,
            num_outputs=10,
            vocab_size=VOCAB_SIZE,
            baseline=float(counts.max() / counts.sum()),
            baseline_metric="accuracy",
        )

    def _generate(self, split: str, n: int, seen: set[bytes]):
        """n new distinct expressions: flat tokens uint8, offsets int64 [n + 1], answers int32
        [n]."""
        state = np.random.SeedSequence([self.seed, SPLITS.index(split)]).generate_state(2)
        rnd = random.Random(int(state[0]) << 32 | int(state[1]))
        chunks, answers = [], []
        attempts, max_attempts = 0, 10_000 + 1_000 * n
        while len(chunks) < n:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"min_length/max_length: only {len(chunks)} of {n} {split} expressions "
                    f"found in {max_attempts} attempts; widen [{self.min_length}, "
                    f"{self.max_length}] or raise max_depth/max_args"
                )
            out: list[int] = []
            if not _sample(rnd, 1, self.max_depth, self.max_args, out, self.max_length):
                continue
            key = bytes(out)
            if len(out) < self.min_length or key in seen:
                continue
            seen.add(key)
            chunks.append(key)
            answers.append(evaluate(out))
        offsets = np.cumsum([0] + [len(c) for c in chunks])
        flat = np.frombuffer(b"".join(chunks), np.uint8)
        return flat, offsets, np.array(answers, np.int32)

    def num_examples(self, split: str) -> int:
        check_split(split)
        return len(self._data[split][2])

    def examples(self, split: str, rows) -> list[np.ndarray]:
        """The token ids (int32 [length], unpadded) of examples `rows` of `split`."""
        check_split(split)
        flat, offsets, _ = self._data[split]
        return [flat[offsets[r] : offsets[r + 1]].astype(np.int32) for r in rows]

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs int32 [batch_size, max_length] (0-padded), lengths int32
        [batch_size] and targets int32 [batch_size] (the value 0..9)."""
        check_split(split)
        index, batch_size = check_batch_args(index, batch_size)
        n = self.num_examples(split)
        if split == "train":
            rows = epoch_batch_indices(n, self.seed, index, batch_size)
        else:
            rows = sequential_indices(n, index, batch_size)
        inputs = np.zeros((batch_size, self.max_length), np.int32)
        lengths = np.zeros(batch_size, np.int32)
        for i, tokens in enumerate(self.examples(split, rows)):
            inputs[i, : len(tokens)] = tokens
            lengths[i] = len(tokens)
        return {"inputs": inputs, "lengths": lengths, "targets": self._data[split][2][rows]}
