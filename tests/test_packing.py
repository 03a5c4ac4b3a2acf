"""Documents packed back to back into rows with `resets`: every mixer restarts at a document
start, so each document gets the outputs it gets alone; the text task marks the starts."""

import jax
import numpy as np
import optax
import pytest

from lru_jax import models, tasks
from lru_jax.tasks.text import CharText
from lru_jax.training import config as config_lib
from lru_jax.training import loop, steps
from lru_jax.training.state import TrainState

VOCAB, TIME = 11, 9
# Each row: its documents' lengths, filling the row back to back.
ROWS = [(4, 2, 3), (9,), (1, 5, 3)]


def _packed_and_alone(rng):
    """(rows [R, T], resets [R, T]) and the same documents one per row, padded: (docs [D, T],
    lengths [D], resets [D, T] true at step 0 only)."""
    tokens = rng.integers(0, VOCAB, (len(ROWS), TIME)).astype(np.int32)
    resets = np.zeros(tokens.shape, bool)
    docs, lengths = [], []
    for r, sizes in enumerate(ROWS):
        starts = np.cumsum((0,) + sizes[:-1])
        resets[r, starts] = True
        for start, size in zip(starts, sizes, strict=True):
            docs.append(np.pad(tokens[r, start : start + size], (0, TIME - size)))
            lengths.append(size)
    alone_resets = np.zeros((len(docs), TIME), bool)
    alone_resets[:, 0] = True  # a document alone starts at step 0 (RG-LRU's normaliser)
    return (tokens, resets), (np.stack(docs), np.array(lengths, np.int32), alone_resets)


def _model(mixer, **kw):
    options = config_lib.default_config().model
    if mixer in models.OPTION_MIXERS:
        kw["mixer_options"] = tuple(sorted(options[mixer].to_dict().items()))
    kw = {"num_layers": 2, **kw}
    return models.SequenceModel(
        num_outputs=VOCAB, vocab_size=VOCAB, mixer=mixer, d_model=8, d_state=4, num_heads=2,
        max_len=2 * TIME, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("mixer", ["lru", "lstm", "gru", "attention", "mingru"])
def test_a_packed_row_gives_each_document_its_outputs_alone(mixer):
    (rows, resets), (docs, lengths, alone_resets) = _packed_and_alone(np.random.default_rng(0))
    model = _model(mixer, num_layers=2 if mixer == "lru" else 1)  # two: every block resets
    variables = jax.jit(model.init)(jax.random.key(1), rows)
    # One call: the packed rows (full length) and the documents alone (padded) together.
    tokens = np.concatenate([rows, docs])
    full = np.full(len(rows), TIME, np.int32)
    out = jax.jit(model.apply)(
        variables,
        tokens,
        np.concatenate([full, lengths]),
        resets=np.concatenate([resets, alone_resets]),
    )
    packed, alone = np.asarray(out[: len(rows)]), np.asarray(out[len(rows) :])
    d = 0
    for r, sizes in enumerate(ROWS):
        start = 0
        for size in sizes:
            np.testing.assert_allclose(
                packed[r, start : start + size], alone[d, :size], atol=2e-5, rtol=2e-5
            )
            start, d = start + size, d + 1


def test_segments_carry_state_within_a_document_but_not_across_one():
    """Truncated BPTT's way: two segments with the carry handed on equal the whole row, for
    attention (its key/value cache) and an LSTM (its carry), a document crossing the cut."""
    (rows, resets), _ = _packed_and_alone(np.random.default_rng(2))
    for mixer in ("attention", "lstm"):
        model = _model(mixer, num_layers=1)
        variables = jax.jit(model.init)(jax.random.key(3), rows)
        apply = jax.jit(model.apply, static_argnames="return_carry")
        whole = apply(variables, rows, resets=resets)
        cut = 5  # inside row 0's second document [4, 6) and row 2's second [1, 6)
        carry, first = apply(variables, rows[:, :cut], resets=resets[:, :cut], return_carry=True)
        second = apply(variables, rows[:, cut:], initial_carry=carry, resets=resets[:, cut:])
        np.testing.assert_allclose(
            np.concatenate([first, second], 1), whole, atol=2e-5, rtol=2e-5, err_msg=mixer
        )


def _mean_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, targets[..., None], -1).mean()


def test_remat_chunks_and_truncated_bptt_pass_resets_on():
    """The LRU model with remat (chunks of 4 steps) and a train step with truncated BPTT
    (segments of 4) see the resets: their outputs and loss equal the whole rows' with resets,
    which differ from the rows' without."""
    (rows, resets), _ = _packed_and_alone(np.random.default_rng(4))
    targets = np.roll(rows, -1, axis=1)
    model = _model("lru", num_layers=1)
    variables = jax.jit(model.init)(jax.random.key(5), rows)
    apply = jax.jit(model.apply)
    whole = apply(variables, rows, resets=resets)
    leaky = apply(variables, rows)
    chunked = _model("lru", num_layers=1, remat=True, remat_chunk=4)
    np.testing.assert_allclose(
        jax.jit(chunked.apply)(variables, rows, resets=resets), whole, atol=2e-5, rtol=2e-5
    )

    spec = tasks.TaskSpec(
        name="text", kind="per_step", seq_len=TIME, num_outputs=VOCAB, vocab_size=VOCAB
    )
    batch = {"inputs": rows, "targets": targets, "mask": np.ones(rows.shape, np.float32)}
    train = steps.make_train_step(model, optax.sgd(0.0), spec, seed=0, tbptt_length=4)
    state = TrainState.create(variables, optax.sgd(0.0))  # donated to the step
    _, metrics = train(state, {**batch, "resets": resets})
    want = _mean_cross_entropy(whole, targets)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    assert abs(_mean_cross_entropy(leaky, targets) - want) > 1e-3


def _start_mask(docs):
    """bool over the documents' concatenated bytes: true at each document's first byte."""
    sizes = [len(doc.encode("utf-8")) for doc in docs]
    mask = np.zeros(sum(sizes), bool)
    mask[np.cumsum([0] + sizes[:-1])] = True
    return mask


def test_text_batches_mark_exactly_the_document_starts():
    task = CharText(corpus="jokes", seq_len=48, pack_documents=True)
    plain = CharText(corpus="jokes", seq_len=48)
    # Training windows (valid and test rows of whole documents: tests/test_tasks.py)
    split = "train"
    docs = task.documents(split)
    text = "".join(docs).encode("utf-8")
    starts = _start_mask(docs)
    batch = task.batch(split, 1, 16)
    assert batch["resets"].dtype == np.bool_ and batch["resets"].shape == (16, 48)
    # Packing adds the resets and changes nothing else.
    old = plain.batch(split, 1, 16)
    assert set(batch) == set(old) | {"resets"} and "resets" not in old
    for name in old:
        np.testing.assert_array_equal(batch[name], old[name])
    found = 0
    for row, resets in zip(batch["inputs"], batch["resets"], strict=True):
        window = bytes(row.astype(np.uint8))
        at = text.find(window)
        assert at >= 0
        if text.count(window) == 1:  # where the window sits in the split is certain
            np.testing.assert_array_equal(resets, starts[at : at + 48])
            found += resets.sum()
    assert found > 0  # some windows hold a document start (jokes are short)


def test_the_text_configs_pack_and_older_configs_do_not():
    assert config_lib.default_config().task.pack_documents is True
    stdlib = config_lib.load_config("configs/stdlib_text.py")
    assert stdlib.task.pack_documents is True
    # A run saved before the flag: its task has no such key and builds as before.
    saved = config_lib.default_config().to_dict()
    del saved["task"]["pack_documents"]
    task = loop.build_task(config_lib.upgrade(saved), seq_len=16)
    assert task.pack_documents is False and "resets" not in task.batch("train", 0, 2)
    with pytest.raises(TypeError, match="pack_documents"):
        CharText(pack_documents="yes")
