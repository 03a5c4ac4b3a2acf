"""Tasks against independent checks: hand-written layouts, targets recovered from the inputs by
separate code, baselines measured on batches, and a second ListOps evaluator built on eval."""

import collections
import math
import subprocess

import numpy as np
import pytest

from lru_jax.tasks import (
    MNIST1D,
    TASKS,
    AddingProblem,
    AssociativeRecall,
    CharText,
    CocktailParty,
    CopyMemory,
    ListOps,
    Reverse,
    SelectiveCopy,
    Sort,
    get_task,
)
from lru_jax.tasks import listops as listops_lib
from lru_jax.tasks.text import compressed_bits_per_byte, known_word_share, load_corpus

SPLITS = ("train", "valid", "test")

# Small but non-trivial arguments for every registered task.
SMALL = {
    "adding": dict(seq_len=20),
    "copy": dict(delay=12),
    "selective_copy": dict(seq_len=24, num_tokens=4),
    "associative_recall": dict(num_pairs=4, num_queries=3, seq_len=20),
    "mnist1d": dict(num_samples=1000),
    "listops": dict(num_train=200, num_valid=50, num_test=50, min_length=8, max_length=40),
    "text": dict(seq_len=32),
    "reverse": dict(max_length=8),
    "sort": dict(max_length=8),
    "cocktail_party": dict(tokens_per_source=5, max_burst=3),
}


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name, **kwargs) for name, kwargs in SMALL.items()}


def test_small_configs_cover_the_registry():
    assert set(SMALL) == set(TASKS)


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_shapes_and_dtypes_match_spec(tasks, name):
    task, spec = tasks[name], tasks[name].spec
    assert spec.name == name
    for split in SPLITS:
        b = task.batch(split, 1, 5)
        x, y = b["inputs"], b["targets"]
        if spec.vocab_size is not None:
            assert x.dtype == np.int32 and x.shape == (5, spec.seq_len)
            assert 0 <= x.min() and x.max() < spec.vocab_size
        else:
            assert x.dtype == np.float32 and x.shape == (5, spec.seq_len, spec.input_dim)
        if spec.kind == "classification":
            assert y.dtype == np.int32 and y.shape == (5,)
            assert 0 <= y.min() and y.max() < spec.num_outputs
        elif spec.kind == "regression":
            assert y.dtype == np.float32 and y.shape == (5, spec.num_outputs)
        else:
            time = spec.target_len if spec.kind == "seq2seq" else spec.seq_len
            assert y.dtype == np.int32 and y.shape == (5, time)
            assert 0 <= y.min() and y.max() < spec.num_outputs
            assert b["mask"].dtype == np.float32 and b["mask"].shape == (5, time)
        if spec.kind == "seq2seq":
            d = b["decoder_inputs"]
            assert d.dtype == np.int32 and d.shape == (5, spec.target_len)
        if "lengths" in b:
            assert b["lengths"].dtype == np.int32 and b["lengths"].shape == (5,)
        n = task.num_examples(split)
        assert n is None or n > 0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batches_are_deterministic_and_vary(tasks, name):
    twin = get_task(name, **SMALL[name])  # a fresh instance: nothing carried between objects
    first = tasks[name].batch("train", 3, 8)
    again = twin.batch("train", 3, 8)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["inputs"], twin.batch("train", 4, 8)["inputs"])
    assert not np.array_equal(first["inputs"], twin.batch("valid", 3, 8)["inputs"])


@pytest.mark.parametrize(
    "name", ["adding", "copy", "selective_copy", "associative_recall", "reverse", "cocktail_party"]
)
def test_seed_changes_generated_data(name):
    a = get_task(name, **SMALL[name], seed=0).batch("train", 0, 8)["inputs"]
    b = get_task(name, **SMALL[name], seed=1).batch("train", 0, 8)["inputs"]
    assert not np.array_equal(a, b)


def test_get_task_errors_name_the_problem():
    with pytest.raises(ValueError, match="listops"):
        get_task("lisptops")
    with pytest.raises(TypeError, match="sequence_length"):
        get_task("adding", sequence_length=10)
    with pytest.raises(ValueError, match="seq_len"):
        get_task("adding", seq_len=1)
    with pytest.raises(TypeError, match="delay"):
        get_task("copy", delay=2.5)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: CopyMemory(delay=0), "delay"),
        (lambda: CopyMemory(num_categories=1), "num_categories"),
        (lambda: SelectiveCopy(seq_len=4, num_tokens=5), "seq_len"),
        (lambda: AssociativeRecall(num_pairs=4, num_queries=5), "num_queries"),
        (lambda: AssociativeRecall(num_pairs=8, num_queries=8, seq_len=20), "seq_len"),
        (lambda: AssociativeRecall(num_pairs=8, num_keys=4), "num_keys"),
        (lambda: ListOps(min_length=50, max_length=40), "max_length"),
        (lambda: ListOps(max_depth=2, max_args=3, min_length=20), "min_length"),
        (lambda: MNIST1D(num_samples=10), "num_samples"),
        (lambda: CharText(corpus="shakespeare"), "corpus"),
        (lambda: CharText(seq_len=0), "seq_len"),
        (lambda: CharText(seq_len=10**6), "seq_len"),
        (lambda: AddingProblem(seed=-1), "seed"),
        (lambda: Reverse(min_length=5, max_length=4), "max_length"),
        (lambda: Sort(num_symbols=1), "num_symbols"),
        (lambda: CocktailParty(num_sources=1), "num_sources"),
        (lambda: CocktailParty(tokens_per_source=3, max_burst=4), "max_burst"),
        (lambda: CocktailParty(num_private=2, num_shared=1, branching=4), "branching"),
    ],
)
def test_bad_arguments_raise_naming_them(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_bad_batch_arguments_raise(tasks):
    with pytest.raises(ValueError, match="split"):
        tasks["copy"].batch("validation", 0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        tasks["listops"].batch("train", 0, 0)
    with pytest.raises(ValueError, match="index"):
        tasks["text"].batch("valid", -1, 4)


# ---------------------------------------------------------------- adding


def test_adding_target_is_the_sum_of_the_two_marked_values():
    task = AddingProblem(seq_len=11)
    b = task.batch("train", 0, 500)
    values, markers = b["inputs"][..., 0], b["inputs"][..., 1]
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers[:, :5].sum(1) == 1).all() and (markers[:, 5:].sum(1) == 1).all()
    assert values.min() >= 0 and values.max() < 1
    expected = np.array([values[i][markers[i] == 1].sum() for i in range(500)])
    np.testing.assert_allclose(b["targets"][:, 0], expected, rtol=1e-6)
    # Both halves' every position gets marked sometimes (uniform placement).
    assert (markers.sum(0) > 0).all()


def test_adding_baseline_is_the_mse_of_predicting_one():
    task = AddingProblem(seq_len=50)
    targets = np.concatenate([task.batch("train", i, 5000)["targets"] for i in range(4)])
    mse = np.mean((targets - 1.0) ** 2)
    assert abs(mse - 1 / 6) < 0.006
    assert task.spec.baseline == pytest.approx(1 / 6) and task.spec.baseline_metric == "mse"


# ---------------------------------------------------------------- copy memory


def test_copy_layout_on_a_hand_written_case():
    task = CopyMemory(delay=3, num_symbols=2, num_categories=4)
    assert task.spec.seq_len == 7 and task.spec.vocab_size == 6
    b = task.batch("test", 0, 64)
    for x, y in zip(b["inputs"], b["targets"], strict=True):
        a, c = x[0], x[1]
        assert 1 <= a <= 4 and 1 <= c <= 4
        np.testing.assert_array_equal(x, [a, c, 0, 0, 5, 0, 0])
        np.testing.assert_array_equal(y, [0, 0, 0, 0, 0, a, c])
    np.testing.assert_array_equal(b["mask"], np.ones((64, 7)))


def test_copy_baseline_is_the_loss_of_the_best_memoryless_predictor():
    task = CopyMemory(delay=20, num_symbols=5, num_categories=6)
    targets = task.batch("train", 0, 20000)["targets"]
    # Best predictor that sees only the position: the targets' empirical marginal per step.
    loss = 0.0
    for column in targets.T:
        p = np.bincount(column) / len(column)
        p = p[p > 0]
        loss -= (p * np.log(p)).sum()
    loss /= targets.shape[1]
    assert task.spec.baseline == pytest.approx(5 * math.log(6) / 30)
    assert loss == pytest.approx(task.spec.baseline, rel=0.01)


# ---------------------------------------------------------------- selective copy


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = SelectiveCopy(seq_len=30, num_tokens=5, num_categories=6)
    b = task.batch("train", 2, 200)
    assert task.spec.seq_len == 36
    for x, y, m in zip(b["inputs"], b["targets"], b["mask"], strict=True):
        data = [t for t in x[:30] if t != 0]
        assert len(data) == 5 and all(1 <= t <= 6 for t in data)
        assert x[30] == 7 and (x[31:] == 0).all()
        np.testing.assert_array_equal(y[31:], data)
        assert (y[:31] == 0).all()
        np.testing.assert_array_equal(m, [0] * 31 + [1] * 5)
    # The spacing varies: data positions differ between examples.
    positions = {tuple(np.flatnonzero(x[:30])) for x in b["inputs"]}
    assert len(positions) > 150


# ---------------------------------------------------------------- associative recall


def test_associative_recall_targets_are_the_queried_values():
    p, q, n, nk, nv = 6, 4, 40, 10, 12
    task = AssociativeRecall(num_pairs=p, num_queries=q, seq_len=n, num_keys=nk, num_values=nv)
    b = task.batch("valid", 0, 200)
    for x, y, m in zip(b["inputs"], b["targets"], b["mask"], strict=True):
        keys, values = x[: 2 * p : 2], x[1 : 2 * p : 2]
        assert ((1 <= keys) & (keys <= nk)).all() and len(set(keys)) == p
        assert ((nk < values) & (values <= nk + nv)).all()
        table = dict(zip(keys.tolist(), values.tolist(), strict=True))
        asked = np.flatnonzero(x[2 * p :]) + 2 * p
        assert len(asked) == q and len(set(x[asked])) == q
        np.testing.assert_array_equal(np.flatnonzero(m), asked)
        np.testing.assert_array_equal(y[asked], [table[k] for k in x[asked]])
        assert (np.delete(y, asked) == 0).all()
    assert task.spec.baseline == pytest.approx(math.log(nv))


# ---------------------------------------------------------------- ListOps


@pytest.mark.parametrize(
    "expression, value",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[SM 5 6 7 ]", 8),
        ("[MED 1 9 3 ]", 3),
        ("[MIN 3 [MAX 8 1 ] [SM 9 9 ] ]", 3),
        ("[MED 1 4 ]", 2),  # LRA: int(np.median([1, 4])) = int(2.5)
        ("[MED 3 0 9 8 ]", 5),  # int(5.5)
        ("[SM [MED 7 7 ] [MAX 0 0 0 ] 4 ]", 1),
        ("7", 7),
    ],
)
def test_listops_evaluator_on_hand_written_expressions(expression, value):
    assert listops_lib.evaluate(listops_lib.encode(expression)) == value
    assert listops_lib.to_string(listops_lib.encode(expression)) == expression


@pytest.mark.parametrize("expression", ["[MAX 2 9", "[MAX ]", "[MIN 1 2 ] 3", "]", "[FOO 1 ]"])
def test_listops_evaluator_rejects_malformed(expression):
    with pytest.raises(ValueError):
        listops_lib.evaluate(listops_lib.encode(expression))


def eval_with_python(tokens) -> int:
    """A second evaluator: the token string rewritten as Python calls and eval'd."""
    words = {"[MIN": "mn(", "[MAX": "mx(", "[MED": "md(", "[SM": "sm(", "]": "),"}
    source = "".join(words.get(w, w + ",") for w in listops_lib.to_string(tokens).split())
    env = {
        "mn": lambda *a: min(a),
        "mx": lambda *a: max(a),
        "md": lambda *a: int(np.median(a)),
        "sm": lambda *a: sum(a) % 10,
    }
    return eval(source.rstrip(","), env)


def nesting(tokens) -> int:
    depth = deepest = 0
    for w in listops_lib.to_string(tokens).split():
        depth += w.startswith("[") - (w == "]")
        deepest = max(deepest, depth)
    return deepest


@pytest.fixture(scope="module")
def listops():
    return ListOps(
        num_train=300, num_valid=60, num_test=60, min_length=10, max_length=60, max_depth=4
    )


def test_listops_examples_are_valid_and_bounded(listops):
    assert listops.spec.vocab_size == 16 and listops.spec.seq_len == 60
    for split in SPLITS:
        n = listops.num_examples(split)
        b = listops.batch(split, 0, n)
        for x, length, y in zip(b["inputs"], b["lengths"], b["targets"], strict=True):
            assert 10 <= length <= 60
            assert (x[length:] == 0).all() and (x[:length] != 0).all()
            assert eval_with_python(x) == y
            assert nesting(x) <= 4 - 1  # the root is depth 1; leaves may sit at depth 4
    inputs = listops.batch("train", 0, 300)["inputs"]
    words = {w for x in inputs for w in listops_lib.to_string(x).split()}
    assert set(listops_lib.OPERATORS) <= words  # every operator occurs


def test_listops_splits_are_disjoint_and_complete(listops):
    seen = {}
    for split in SPLITS:
        n = listops.num_examples(split)
        # An epoch of train batches, and sequential valid/test, each reach every example once.
        rows = [tuple(x) for k in range(n // 10) for x in listops.batch(split, k, 10)["inputs"]]
        assert len(set(rows)) == n
        seen[split] = set(rows)
    assert not seen["train"] & seen["valid"]
    assert not seen["train"] & seen["test"]
    assert not seen["valid"] & seen["test"]


def test_listops_baseline_is_the_majority_class_of_train(listops):
    y = listops.batch("train", 0, listops.num_examples("train"))["targets"]
    majority = collections.Counter(y.tolist()).most_common(1)[0][1] / len(y)
    assert listops.spec.baseline == pytest.approx(majority)
    assert listops.spec.baseline_metric == "accuracy"


def test_listops_test_split_does_not_depend_on_train_size(listops):
    bigger = ListOps(
        num_train=400, num_valid=60, num_test=60, min_length=10, max_length=60, max_depth=4
    )
    np.testing.assert_array_equal(
        bigger.batch("test", 0, 60)["inputs"], listops.batch("test", 0, 60)["inputs"]
    )


def test_listops_default_sizes():
    # (Generating them takes about 0.13 s on the 2-core CI machine; no test times it.)
    task = ListOps()
    assert [task.num_examples(s) for s in SPLITS] == [2000, 500, 500]


# ---------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist(tasks):
    return tasks["mnist1d"]


def test_mnist1d_splits(mnist):
    sizes = [mnist.num_examples(s) for s in SPLITS]
    assert sizes == [720, 80, 200]
    everything = []
    for split, n in zip(SPLITS, sizes, strict=True):
        b = mnist.batch(split, 0, n)
        assert b["inputs"].shape == (n, 40, 1)
        assert set(np.unique(b["targets"])) == set(range(10))
        everything.append({x.tobytes() for x in b["inputs"]})
        assert len(everything[-1]) == n
    assert not (everything[0] & everything[1] or everything[0] & everything[2])
    assert not everything[1] & everything[2]
    x = mnist.batch("train", 0, 720)["inputs"]
    assert abs(x.mean()) < 0.1 and 0.8 < x.std() < 1.2


def test_mnist1d_shuffled_is_one_fixed_time_permutation(mnist):
    shuffled = MNIST1D(num_samples=1000, shuffled=True)
    for split in SPLITS:
        plain = mnist.batch(split, 2, 64)
        mixed = shuffled.batch(split, 2, 64)
        np.testing.assert_array_equal(plain["targets"], mixed["targets"])
        a, b = plain["inputs"][..., 0], mixed["inputs"][..., 0]
        # For each shuffled step, the one original step whose values match in every example.
        perm = [int(np.flatnonzero((a == b[:, [j]]).all(0))[0]) for j in range(40)]
        assert sorted(perm) == list(range(40)) and perm != list(range(40))
        np.testing.assert_array_equal(a[:, perm], b)


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    MNIST1D(num_samples=200, data_seed=7)
    assert np.random.rand() == expected  # noqa: NPY002


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module", params=["jokes", "stdlib"])
def text(request):
    return CharText(corpus=request.param, seq_len=32)


def test_text_encode_decode_round_trip():
    s = "Größe → λx. x + 1\n"
    ids = CharText.encode(s)
    assert ids.dtype == np.int32 and len(ids) == len(s.encode("utf-8"))
    assert CharText.decode(ids) == s
    assert CharText.decode([0xFF, 65]) == "\ufffdA"


def test_text_windows_are_raw_text_shifted_by_one(text):
    for split in ("valid", "test"):
        raw = np.frombuffer("".join(text.documents(split)).encode("utf-8"), np.uint8)
        n = text.num_examples(split)
        assert n == (len(raw) - 1) // 32
        b = text.batch(split, 1, 3)
        for i in range(3):
            start = 32 * ((3 + i) % n)
            np.testing.assert_array_equal(b["inputs"][i], raw[start : start + 32])
            np.testing.assert_array_equal(b["targets"][i], raw[start + 1 : start + 33])
    train = "".join(text.documents("train")).encode("utf-8")
    b = text.batch("train", 5, 16)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for x, y in zip(b["inputs"], b["targets"], strict=True):
        assert bytes(np.append(x, y[-1]).astype(np.uint8)) in train
    assert (b["mask"] == 1).all()


def test_text_splits_are_disjoint_documents(text):
    docs = {s: text.documents(s) for s in SPLITS}
    sets = {s: set(d) for s, d in docs.items()}
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"])
    assert not sets["valid"] & sets["test"]
    total = sum(len(d) for d in docs.values())
    assert len(docs["valid"]) >= 0.03 * total and len(docs["train"]) >= 0.85 * total
    assert all(d.endswith("\n") for d in docs["train"])


def test_text_baseline_is_the_unigram_entropy_of_train(text):
    counts = collections.Counter("".join(text.documents("train")).encode("utf-8"))
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert text.spec.baseline == pytest.approx(entropy)
    assert text.spec.is_language_model and text.spec.vocab_size == 256


def test_jokes_corpus_is_every_english_joke():
    from pyjokes import get_jokes

    jokes = CharText(corpus="jokes")
    ours = {d for s in SPLITS for d in jokes.documents(s)}
    assert ours == {j + "\n" for j in get_jokes("en", "all")}


def _document_rows_by_hand(docs: list[bytes], width: int) -> list[bytes]:
    """Rows of whole documents, a plain loop: the reference for packed evaluation batches.
    The split's last byte predicts nothing, so it is dropped first."""
    docs = docs[:-1] + [docs[-1][:-1]]
    rows, row = [], b""
    for doc in docs:
        if len(row) + len(doc) <= width:
            row += doc
            continue
        if row:
            rows.append(row)
        while len(doc) > width:  # a document longer than a row: cut into rows
            rows.append(doc[:width])
            doc = doc[width:]
        row = doc
    return rows + [row] if row else rows


@pytest.mark.parametrize("width", [160, 48])  # longer than every joke; shorter than many
def test_packed_evaluation_rows_hold_whole_documents(width):
    task = CharText(corpus="jokes", seq_len=32, pack_documents=True, eval_seq_len=width)
    for split in ("valid", "test"):
        docs = [d.encode("utf-8") for d in task.documents(split)]
        text = b"".join(docs)
        expected = _document_rows_by_hand(docs, width)
        n = task.num_examples(split)
        assert n == len(expected)
        b = task.batch(split, 0, n)
        assert b["inputs"].shape == b["mask"].shape == b["resets"].shape == (n, width)
        first = 0
        for i, row in enumerate(expected):
            size = len(row)
            np.testing.assert_array_equal(b["mask"][i], [1] * size + [0] * (width - size))
            assert bytes(b["inputs"][i, :size].astype(np.uint8)) == row
            assert (
                bytes(b["targets"][i, :size].astype(np.uint8)) == text[first + 1 : first + size + 1]
            )
            starts = {
                first + j
                for j in range(size)
                if text[: first + j].endswith(b"\n") or first + j == 0
            }
            assert set(np.flatnonzero(b["resets"][i]) + first) == starts
            assert not b["inputs"][i, size:].any() and not b["resets"][i, size:].any()
            first += size
        assert first == len(text) - 1  # every predicted byte once
    if width == 160:  # every row starts at a document
        assert b["resets"][:, 0].all()


def test_text_split_fractions_and_evaluation_errors():
    task = CharText(corpus="jokes", valid_fraction=0.1, test_fraction=0.2)
    total = sum(len(task.documents(s)) for s in SPLITS)
    assert len(task.documents("test")) == round(0.2 * total)
    assert len(task.documents("valid")) == round(0.1 * total)
    for kwargs, name in [
        ({"eval_seq_len": -1}, "eval_seq_len"),
        ({"valid_fraction": 0.7}, "valid_fraction"),
        ({"test_fraction": "0.1"}, "test_fraction"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            CharText(corpus="jokes", **kwargs)
    with pytest.raises(ValueError, match="compressor"):
        task.compressor_bits_per_byte("test", "zip")


@pytest.mark.parametrize("compressor, command", [("bz2", "bzip2 -9"), ("xz", "xz -9e")])
def test_compressed_bits_per_byte_equals_the_command_line_tools(compressor, command):
    """The reference is the command-line tool itself (bzip2 and xz, in every Linux base image)."""
    context = b"the quick brown fox jumps over the lazy dog\n" * 40
    text = b"the lazy dog jumps over the quick brown fox\n" * 3

    def size(data):
        return len(subprocess.run([*command.split(), "-c"], input=data, capture_output=True).stdout)

    expected = 8 * (size(context + text) - size(context)) / len(text)
    assert compressed_bits_per_byte(context, text, compressor) == pytest.approx(expected)


@pytest.mark.parametrize("compressor", ["bz2", "xz"])
def test_compressed_bits_per_byte_charges_little_for_text_seen_before(compressor):
    noise = np.random.default_rng(0).bytes(4000)
    assert compressed_bits_per_byte(noise, noise, compressor) < 2
    assert compressed_bits_per_byte(b"", noise, compressor) > 7.5


def test_extra_training_text_fills_its_share_of_training_rows():
    plain = CharText(corpus="jokes", seq_len=40, pack_documents=True)
    mixed = CharText(
        corpus="jokes", seq_len=40, pack_documents=True, extra_corpus="pydoc", extra_fraction=0.25
    )
    jokes = "".join(plain.documents("train")).encode("utf-8")
    pydoc_docs = list(load_corpus("pydoc"))
    pydoc = "".join(pydoc_docs).encode("utf-8")
    extra_rows = 0
    for index in range(4):
        b, old = mixed.batch("train", index, 64), plain.batch("train", index, 64)
        for i in range(64):
            window = bytes(np.append(b["inputs"][i], b["targets"][i, -1]).astype(np.uint8))
            if (b["inputs"][i] == old["inputs"][i]).all():  # a jokes row, drawn as before
                assert window in jokes
                continue
            extra_rows += 1
            at = pydoc.find(window)
            assert at >= 0
            starts = {at + j for j in range(40) if at + j == 0 or pydoc[at + j - 1] == 10}
            assert set(np.flatnonzero(b["resets"][i]) + at) == starts
    assert 0.15 < extra_rows / 256 < 0.35
    # valid and test are the main corpus's alone; the compressor reads both training texts
    for name in ("valid", "test"):
        np.testing.assert_array_equal(
            mixed.batch(name, 0, 4)["inputs"], plain.batch(name, 0, 4)["inputs"]
        )
    test = "".join(mixed.documents("test")).encode("utf-8")
    expected = compressed_bits_per_byte(pydoc + jokes, test, "bz2")
    assert mixed.compressor_bits_per_byte("test", "bz2") == expected
    assert all(len(d.split()) >= 5 and d.count("\n") == 1 for d in pydoc_docs)
    # a pretraining on the extra text that hands over: the share falls linearly to 0
    handover = CharText(
        corpus="jokes", seq_len=40, pack_documents=True, extra_corpus="pydoc", extra_steps=100
    )
    shares = [handover.extra_share(i) for i in (0, 50, 100, 300)]
    assert shares == [0.5, 0.25, 0.0, 0.0] and plain.extra_share(0) == 0.0
    np.testing.assert_array_equal(
        handover.batch("train", 150, 16)["inputs"], plain.batch("train", 150, 16)["inputs"]
    )
    with pytest.raises(ValueError, match="extra_corpus"):
        CharText(corpus="jokes", extra_corpus="jokes")
    with pytest.raises(ValueError, match="extra_corpus"):
        CharText(corpus="jokes", extra_corpus="poems")


def test_known_word_share_counted_by_hand():
    reference = "The cat sat on the mat. Don't!"
    assert known_word_share(["the cat sat, dogz don't"], reference) == (3 / 5, 5)
    assert known_word_share(["1 2 3 ..."], reference) == (0.0, 0)
    task = CharText(corpus="jokes")
    share, count = task.known_word_share(["Chuck Norris writes code qwzx"])
    assert (share, count) == (4 / 5, 5)


# ---------------------------------------------------------------- seq2seq: reverse and sort

SEQ2SEQ = {"reverse": lambda s: s[::-1], "sort": sorted}


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_seq2seq_layout_rebuilt_by_a_python_loop(name):
    task = get_task(name, num_symbols=5, min_length=2, max_length=7)
    b = task.batch("train", 1, 300)
    assert task.spec.seq_len == 7 and task.spec.target_len == 8 and task.spec.vocab_size == 8
    for x, n, d, y, m in zip(
        b["inputs"], b["lengths"], b["decoder_inputs"], b["targets"], b["mask"], strict=True
    ):
        source = list(x[:n])
        assert 2 <= n <= 7 and all(3 <= t < 8 for t in source) and (x[n:] == 0).all()
        out = list(SEQ2SEQ[name](source))
        np.testing.assert_array_equal(y, out + [2] + [0] * (7 - n))  # EOS, then PAD
        np.testing.assert_array_equal(d, [1] + out + [0] * (7 - n))  # BOS, target shifted
        np.testing.assert_array_equal(m, [1] * (n + 1) + [0] * (7 - n))
    assert set(b["lengths"]) == set(range(2, 8))


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_seq2seq_baseline_is_the_entropy_of_the_targets_by_enumeration(name):
    """Every source of every length enumerated: the entropy of the target sequences (EOS
    included) per expected target step is the best loss without reading the source."""
    import itertools

    v, lo, hi = 3, 1, 4
    probability = collections.Counter()
    for n in range(lo, hi + 1):
        for source in itertools.product(range(v), repeat=n):
            probability[tuple(SEQ2SEQ[name](list(source)))] += 1 / (hi - lo + 1) / v**n
    entropy = -sum(p * math.log(p) for p in probability.values())
    mean_steps = np.mean(np.arange(lo, hi + 1)) + 1
    task = get_task(name, num_symbols=v, min_length=lo, max_length=hi)
    assert task.spec.baseline == pytest.approx(entropy / mean_steps, rel=1e-9)


# ---------------------------------------------------------------- cocktail party


def test_cocktail_party_target_is_the_cued_speakers_words():
    task = CocktailParty(num_sources=3, tokens_per_source=6, num_private=3, num_shared=2)
    k, m = 3, 6
    b = task.batch("valid", 0, 200)
    assert task.spec.seq_len == k * m + 1 and task.spec.target_len == m + 1
    shared = {6, 7}  # after PAD, BOS, EOS and three cues
    private = [set(range(8 + 3 * s, 11 + 3 * s)) for s in range(k)]
    runs = []
    for x, speakers, cued, y, d in zip(
        b["inputs"],
        b["speakers"],
        b["cued_source"],
        b["targets"],
        b["decoder_inputs"],
        strict=True,
    ):
        assert x[0] == 3 + cued  # the cue token
        mixture = x[1:]
        assert sorted(np.bincount(speakers, minlength=k)) == [m] * k
        for s in range(k):
            said = mixture[speakers == s]
            assert set(said) <= shared | private[s]  # its own alphabet
            for a, c in zip(said[:-1], said[1:], strict=True):  # successions of its own chain
                row = list(task.alphabets[s]).index(a)
                assert c in task.alphabets[s][task.successors[s, row]]
        np.testing.assert_array_equal(y, list(mixture[speakers == cued]) + [2])
        np.testing.assert_array_equal(d, [1] + list(mixture[speakers == cued]))
        runs.append(1 + np.count_nonzero(np.diff(speakers)))
    assert np.mean(runs) > 6  # speakers take turns many times
    assert set(b["cued_source"]) == {0, 1, 2}
    # Shared symbols occur in every speaker's words: the mixture is ambiguous token by token.
    every = b["inputs"][:, 1:]
    for s in range(k):
        assert np.isin(every[b["speakers"] == s], list(shared)).any()
    # The speakers' chains differ.
    assert not np.array_equal(task.successors[0], task.successors[1])


def test_cocktail_party_baseline_is_the_entropy_of_the_cued_words_given_the_cue():
    """Estimated by counting: with 2 words per speaker the targets have few values."""
    task = CocktailParty(
        num_sources=2, tokens_per_source=2, num_private=2, num_shared=1, branching=2, max_burst=2
    )
    b = task.batch("train", 0, 16000)
    entropy = 0.0
    for cue in (0, 1):
        rows = b["targets"][b["cued_source"] == cue]
        counts = np.array(list(collections.Counter(map(tuple, rows)).values()))
        p = counts / counts.sum()
        entropy += -(p * np.log(p)).sum() / 2
    assert task.spec.baseline == pytest.approx(entropy / 3, rel=0.01)
