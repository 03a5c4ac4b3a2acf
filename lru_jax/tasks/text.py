"""Byte-level language modelling on text that ships with installed packages (no downloads)."""

from __future__ import annotations

import bz2
import functools
import lzma
import os
import re
import sysconfig

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import (
    SPLITS,
    TaskSpec,
    check_batch_args,
    check_split,
    sequential_indices,
    split_rng,
)

CORPORA = ("jokes", "stdlib", "pydoc")
STDLIB_MAX_BYTES = 3_000_000  # cap on the "stdlib" corpus
# The general-purpose compressors a language model's test bits per byte are held against.
COMPRESSORS = {
    "bz2": lambda data: bz2.compress(data, 9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),  # xz -9e
}
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@functools.lru_cache(maxsize=2)
def load_corpus(corpus: str) -> tuple[str, ...]:
    """The documents of a corpus, deduplicated, in a fixed order, each ending with "\\n".

    "jokes": every English joke of the `pyjokes` package (all categories), one per document.
    "stdlib": the top-level .py files of this Python's standard library in sorted order, up to
    STDLIB_MAX_BYTES in all, one file per document (so it differs between Python versions).
    "pydoc": the English prose of Python's interactive help (`pydoc_data.topics`), one paragraph
    per document, its lines joined into one (as a joke is one line), paragraphs of fewer than
    five words left out; about 330 KB (its text, like stdlib's, depends on the Python version).
    """
    _checks.one_of("corpus", corpus, CORPORA)
    if corpus == "jokes":
        from pyjokes.jokes_en import jokes_en

        docs = [joke + "\n" for category in jokes_en.values() for joke in category]
    elif corpus == "pydoc":
        from pydoc_data.topics import topics

        paragraphs = (p for name in sorted(topics) for p in re.split(r"\n\s*\n", topics[name]))
        lines = (" ".join(p.split()) for p in paragraphs)
        docs = [line + "\n" for line in lines if len(line.split()) >= 5]
    else:
        root = sysconfig.get_paths()["stdlib"]
        docs, total = [], 0
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not (name.endswith(".py") and os.path.isfile(path)):
                continue
            with open(path, "rb") as f:
                raw = f.read()
            if total + len(raw) > STDLIB_MAX_BYTES:
                break
            total += len(raw)
            text = raw.decode("utf-8", errors="replace")
            docs.append(text if text.endswith("\n") else text + "\n")
    return tuple(dict.fromkeys(docs))  # dict keeps the first occurrence's order


def encode(text: str) -> np.ndarray:
    """str -> int32 [num_bytes] UTF-8 byte values."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    """int [num_bytes] byte values -> str (invalid UTF-8 becomes U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"ids: expected byte values in [0, 255], got [{ids.min()}, {ids.max()}]")
    return bytes(ids.astype(np.uint8).ravel()).decode("utf-8", errors="replace")


def compressed_bits_per_byte(context: bytes, text: bytes, compressor: str) -> float:
    """Bits per byte a compressor spends on `text` once it has seen `context`:
    8 * (len(compress(context + text)) - len(compress(context))) / len(text), the cost a
    language model trained on `context` is compared with. `compressor`: bz2 (level 9) | xz
    (preset 9, extreme: `xz -9e`)."""
    _checks.one_of("compressor", compressor, tuple(COMPRESSORS))
    for name, value in (("context", context), ("text", text)):
        if not isinstance(value, bytes):
            raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")
    if not text:
        raise ValueError("text: expected at least one byte, got none")
    compress = COMPRESSORS[compressor]
    return 8 * (len(compress(context + text)) - len(compress(context))) / len(text)


def known_word_share(texts: list[str], reference: str) -> tuple[float, int]:
    """(share, count): of the `count` words (runs of letters, with an apostrophe inside) in
    `texts`, the share that also occur as words of `reference`, case kept (0.0 if none)."""
    vocabulary = set(WORD.findall(reference))
    words = [w for text in texts for w in WORD.findall(text)]
    if not words:
        return 0.0, 0
    return sum(w in vocabulary for w in words) / len(words), len(words)


class CharText:
    """Predict the next byte of text: byte-level language modelling (vocabulary 256).

    The corpus's documents are split by a permutation drawn from `split_seed` (kept apart from
    `seed` so every run evaluates on the same text): `valid_fraction` and `test_fraction` of
    them (5% each by default), the rest train, so no document is in two splits. A split's text
    is its documents concatenated.

    Batches: inputs and targets int32 [batch, seq_len], targets the inputs shifted by one byte
    (the next byte), mask float32 all ones. Train windows start at offsets drawn from
    `split_rng(seed, "train", index)`; valid and test tile their text with consecutive,
    non-overlapping windows, batch `index` holding windows index * batch .. (wrapping), so
    `num_examples` counts those windows (None for train). The baseline is the unigram entropy of
    the training bytes in nats: the loss of a model that ignores context.

    `pack_documents`: training windows stay the same (documents back to back, no padding, a
    long document running on into the next window), and batches also carry `resets`, bool
    [batch_size, seq_len], true at each byte that starts a document, so the model restarts
    its state there (`SequenceModel(..., resets=...)`) and no document sees the one before.
    The last byte of a document still has the next document's first byte as its target.
    Valid and test rows then hold whole documents: rows of `eval_seq_len` bytes (0: seq_len),
    filled with documents back to back, a document that does not fit starting the next row,
    the rest of the row padded (mask 0); only a document longer than a row is cut, into
    row-sized pieces. So every byte is predicted from its document's start, as it is when a
    compressor reads the text, not from the start of an arbitrary window.
    Without `pack_documents` (the default, which configs saved before the flag existed get)
    there are no resets and the state runs on from one document into the next.
    """

    def __init__(
        self,
        corpus: str = "jokes",
        seq_len: int = 128,
        seed: int = 0,
        split_seed: int = 0,
        pack_documents: bool = False,
        eval_seq_len: int = 0,
        valid_fraction: float = 0.05,
        test_fraction: float = 0.05,
        extra_corpus: str = "",
        extra_fraction: float = 0.5,
        extra_steps: int = 0,
    ):
        self.corpus = _checks.one_of("corpus", corpus, CORPORA)
        self.seq_len = _checks.integer("seq_len", seq_len, 1)
        self.seed = _checks.integer("seed", seed, 0)
        self.split_seed = _checks.integer("split_seed", split_seed, 0)
        self.pack_documents = _checks.boolean("pack_documents", pack_documents)
        self.eval_seq_len = _checks.integer("eval_seq_len", eval_seq_len, 0) or self.seq_len
        self.fractions = {
            "valid": _checks.number("valid_fraction", valid_fraction, 0.0, 0.5),
            "test": _checks.number("test_fraction", test_fraction, 0.0, 0.5),
        }
        self._docs = self._split_documents(load_corpus(corpus))
        if extra_corpus != "":
            _checks.one_of("extra_corpus", extra_corpus, CORPORA)
        self.extra_corpus = extra_corpus
        if self.extra_corpus == corpus:
            raise ValueError(f"extra_corpus: expected a corpus other than {corpus!r}, got it")
        self.extra_fraction = _checks.number("extra_fraction", extra_fraction, 0.0, 1.0)
        self.extra_steps = _checks.integer("extra_steps", extra_steps, 0)
        self._extra_docs = list(load_corpus(extra_corpus)) if extra_corpus else []
        self._extra_text = encode("".join(self._extra_docs)).astype(np.uint8)
        self._text = {s: encode("".join(self._docs[s])).astype(np.uint8) for s in SPLITS}
        self._starts = {s: self._document_starts(self._docs[s]) for s in SPLITS}
        # training rows are cut from one stream: the training split, then the extra text
        self._train_stream = np.concatenate([self._text["train"], self._extra_text])
        self._train_stream_starts = np.concatenate(
            [self._starts["train"], self._document_starts(self._extra_docs)]
        )
        self._rows = {s: self._document_rows(s) for s in ("valid", "test")}
        for split, text in self._text.items():
            if len(text) < self.seq_len + 1:
                raise ValueError(
                    f"seq_len: expected at most {len(text) - 1} (the {split} text of corpus "
                    f"{corpus!r} has {len(text)} bytes), got {self.seq_len}"
                )
        self.spec = TaskSpec(
            name="text",
            kind="per_step",
            seq_len=self.seq_len,
            num_outputs=256,
            vocab_size=256,
            baseline=self._unigram_entropy(self._text["train"]),
            baseline_metric="loss",
            is_language_model=True,
        )

    def _split_documents(self, docs: tuple[str, ...]) -> dict[str, list[str]]:
        order = np.random.default_rng([self.split_seed, 0xD0C5]).permutation(len(docs))
        counts = {s: max(1, round(f * len(docs))) for s, f in self.fractions.items()}
        valid_end = counts["valid"]
        test_end = valid_end + counts["test"]
        parts = {"valid": order[:valid_end], "test": order[valid_end:test_end]}
        parts["train"] = order[test_end:]
        # Sorted so each split reads in the corpus's own order.
        return {s: [docs[i] for i in sorted(parts[s])] for s in SPLITS}

    @staticmethod
    def _document_starts(docs: list[str]) -> np.ndarray:
        """bool [num_bytes] over the split's text: true at the first byte of each document."""
        lengths = np.array([len(doc.encode("utf-8")) for doc in docs], np.int64)
        starts = np.zeros(int(lengths.sum()), bool)
        starts[np.cumsum(lengths) - lengths] = True
        return starts

    def _document_rows(self, split: str) -> np.ndarray | None:
        """int [rows, 2]: (first, end) of each evaluation row of `split` (with
        pack_documents), positions of predicted bytes (a byte at p predicts the byte at p + 1),
        rows cut only at document starts unless a document is longer than eval_seq_len."""
        if not self.pack_documents:
            return None
        end = len(self._text[split]) - 1  # the last byte predicts nothing
        starts = np.flatnonzero(self._starts[split])
        rows, first = [], 0
        while first < end:
            limit = first + self.eval_seq_len
            if limit >= end:
                last = end
            else:
                # the last document start inside (first, limit]; none: a long document, cut
                k = np.searchsorted(starts, limit, side="right") - 1
                last = int(starts[k]) if k >= 0 and starts[k] > first else limit
            rows.append((first, last))
            first = last
        return np.array(rows, np.int64)

    @staticmethod
    def _unigram_entropy(text: np.ndarray) -> float:
        p = np.bincount(text, minlength=256) / len(text)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    encode = staticmethod(encode)
    decode = staticmethod(decode)

    def documents(self, split: str) -> list[str]:
        """The documents of `split`, in corpus order."""
        check_split(split)
        return list(self._docs[split])

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        if split == "train":
            return None
        if self.pack_documents:
            return len(self._rows[split])
        return (len(self._text[split]) - 1) // self.seq_len

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs, targets int32 [batch_size, seq_len] and mask float32 [batch_size,
        seq_len] (all ones); with `pack_documents`, also resets bool [batch_size, seq_len]
        (true at the first byte of each document), and valid and test batches are
        [batch_size, eval_seq_len] rows of whole documents (mask 0 on the padding)."""
        check_split(split)
        index, batch_size = check_batch_args(index, batch_size)
        if split != "train" and self.pack_documents:
            return self._document_batch(split, index, batch_size)
        text, doc_starts, t = self._text[split], self._starts[split], self.seq_len
        if split == "train":
            text, doc_starts = self._train_stream, self._train_stream_starts
            rng = split_rng(self.seed, split, index)
            starts = rng.integers(0, len(self._text["train"]) - t, batch_size)
            if self.extra_corpus:  # rows drawn from the extra text instead, after the above
                extra = rng.random(batch_size) < self.extra_share(index)
                extra_starts = rng.integers(0, len(self._extra_text) - t, batch_size)
                starts = np.where(extra, len(self._text["train"]) + extra_starts, starts)
        else:
            starts = t * sequential_indices(self.num_examples(split), index, batch_size)
        positions = starts[:, None] + np.arange(t + 1)
        windows = text[positions].astype(np.int32)
        batch = {
            "inputs": windows[:, :-1],
            "targets": windows[:, 1:],
            "mask": np.ones((batch_size, t), np.float32),
        }
        if self.pack_documents:
            batch["resets"] = doc_starts[positions[:, :-1]]
        return batch

    def extra_share(self, index: int) -> float:
        """The share of training batch `index`'s rows drawn from the extra corpus:
        extra_fraction, falling linearly to 0 at batch extra_steps if that is set (a
        pretraining on the extra text that hands over to the main corpus)."""
        if not self.extra_corpus:
            return 0.0
        if not self.extra_steps:
            return self.extra_fraction
        return self.extra_fraction * max(0.0, 1.0 - index / self.extra_steps)

    def _document_batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rows = self._rows[split][sequential_indices(len(self._rows[split]), index, batch_size)]
        t = self.eval_seq_len
        offsets = np.arange(t)
        valid = offsets[None] < (rows[:, 1] - rows[:, 0])[:, None]
        positions = np.where(valid, rows[:, :1] + offsets, 0)
        text = self._text[split]
        return {
            "inputs": np.where(valid, text[positions], 0).astype(np.int32),
            "targets": np.where(valid, text[positions + 1], 0).astype(np.int32),
            "mask": valid.astype(np.float32),
            "resets": valid & self._starts[split][positions],
        }

    def compressor_bits_per_byte(self, split: str, compressor: str) -> float:
        """What `compressor` spends per byte of `split`'s text given the training text (see
        `compressed_bits_per_byte`): the number this task's bits_per_char is held against."""
        check_split(split)
        context = bytes(self._extra_text) + bytes(self._text["train"]) if split != "train" else b""
        return compressed_bits_per_byte(context, bytes(self._text[split]), compressor)

    def known_word_share(self, texts: list[str]) -> tuple[float, int]:
        """(share, count) of the words in `texts` that are words of the training text."""
        return known_word_share(texts, "".join(self._extra_docs + self._docs["train"]))
