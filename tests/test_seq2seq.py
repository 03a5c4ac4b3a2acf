"""The encoder-decoder: teacher forcing against step-by-step decoding, the attention read against
a numpy reference, padding, a short training run that learns to reverse, attention maps."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lru_jax import attention as att
from lru_jax import attention_maps, models
from lru_jax.tasks import CocktailParty, Reverse
from lru_jax.tasks.base import TaskSpec
from lru_jax.training import config as config_lib
from lru_jax.training import loop, steps
from lru_jax.training.checkpoints import Checkpointer
from lru_jax.training.state import TrainState

TASK = Reverse(num_symbols=6, min_length=2, max_length=6)
TOKENS = TASK.spec.special_tokens


@pytest.fixture(scope="module")
def batch():
    return {k: jnp.asarray(v) for k, v in TASK.batch("train", 0, 4).items()}


@functools.cache
def _make(mixer, attention, extra):
    kwargs = dict(extra)
    model = models.EncoderDecoder(
        vocab_size=TASK.spec.vocab_size,
        mixer=mixer,
        d_model=16,
        d_state=8,
        attention=attention,
        **kwargs,
    )
    b = TASK.batch("train", 0, 2)
    init = jax.jit(model.init)
    return model, init(jax.random.key(1), b["inputs"], b["lengths"], b["decoder_inputs"])


def make(mixer="lru", attention="soft", **kwargs):
    """A small model and its initial variables (built once per distinct configuration)."""
    return _make(mixer, attention, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced_and_stepwise(model, v, batch):
    """Teacher-forced (logits, weights) and the same from `decode_step` scanned over time."""
    inputs, lengths, decoder_inputs = batch["inputs"], batch["lengths"], batch["decoder_inputs"]
    logits, weights = model.apply(v, inputs, lengths, decoder_inputs, return_weights=True)
    memory, summary = model.apply(v, inputs, lengths, method="encode")

    def one_step(carry, token):
        carry, out, w = model.apply(v, carry, token, memory, summary, lengths, method="decode_step")
        return carry, (out, w)

    carry = model.apply(v, inputs.shape[0], method="initial_carry")
    _, (outs, ws) = jax.lax.scan(one_step, carry, decoder_inputs.T)
    ws = None if ws is None else jnp.swapaxes(ws, 0, 1)
    return (logits, weights), (jnp.swapaxes(outs, 0, 1), ws)


@pytest.mark.parametrize(
    "cell, attention, extra",
    [
        ("lru", "soft", {}),
        ("gru", "hard", {}),
        ("lstm", "none", {"bidirectional": False}),
    ],
)
def test_teacher_forcing_equals_step_by_step_decoding(batch, cell, attention, extra):
    model, v = make(cell, attention, **extra)
    (logits, weights), (step_logits, step_weights) = teacher_forced_and_stepwise(model, v, batch)
    np.testing.assert_allclose(step_logits, logits, atol=1e-5)
    if attention == "none":
        assert weights is None and step_weights is None
    else:
        np.testing.assert_allclose(step_weights, weights, atol=1e-6)


def test_greedy_decoding_is_a_fixed_point_of_teacher_forcing(batch):
    """Feeding the greedy output back as teacher-forced input reproduces it step by step."""
    model, v = make("gru", "soft")
    tokens, weights = models.greedy_decode(
        model, v, batch["inputs"], batch["lengths"], 7, **TOKENS._asdict()
    )
    assert tokens.shape == (4, 7) and weights.shape == (4, 7, 6)
    raw, _ = models._greedy_decode(model, v, batch["inputs"], batch["lengths"], 7, 1)
    decoder_inputs = jnp.concatenate([jnp.ones((4, 1), jnp.int32), raw[:, :-1]], axis=1)
    logits = jax.jit(model.apply)(v, batch["inputs"], batch["lengths"], decoder_inputs)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), raw)
    # After the first EOS the returned tokens are PAD.
    for row_raw, row in zip(np.asarray(raw), tokens, strict=True):
        end = np.flatnonzero(row_raw == 2)
        cut = end[0] + 1 if end.size else 7
        np.testing.assert_array_equal(row[:cut], row_raw[:cut])
        assert (row[cut:] == 0).all()
    # The ids come from the caller (the task's spec): another start and padding id are used.
    other, _ = models.greedy_decode(
        model, v, batch["inputs"], batch["lengths"], 7, bos=3, eos=TOKENS.eos, pad=9
    )
    raw, _ = models._greedy_decode(model, v, batch["inputs"], batch["lengths"], 7, 3)
    for row_raw, row in zip(np.asarray(raw), other, strict=True):
        end = np.flatnonzero(row_raw == TOKENS.eos)
        cut = end[0] + 1 if end.size else 7
        assert list(row) == list(row_raw[:cut]) + [9] * (7 - cut)


def reference_scores(read, q, memory, attention, score):
    """Scores [S] of one query q [d] against memory [S, d], from the parameters by numpy."""
    if attention == "hard":  # scaled dot product of the projected query
        return memory @ (q @ read["query"]["kernel"]) / np.sqrt(q.size)
    if score == "additive":  # Bahdanau: v . tanh(W_q q + W_k m_j + b)
        hidden = q @ read["W_q"]["kernel"] + memory @ read["W_k"]["kernel"] + read["W_k"]["bias"]
        return np.tanh(hidden) @ read["v"][:, 0]
    return (memory @ read["W_a"]["kernel"]) @ q  # Luong's general: q . W_a m_j


@pytest.mark.parametrize(
    "cell, attention, score",
    [("lru", "soft", "additive"), ("lru", "soft", "dot"), ("gru", "hard", "additive")],
)
def test_attention_read_matches_a_numpy_reference(cell, attention, score):
    model, v = make(cell, attention) if score == "additive" else make(cell, attention, score=score)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3, 4, 16)).astype(np.float32)
    memory = rng.normal(size=(3, 5, 16)).astype(np.float32)
    lengths = np.array([5, 2, 3], np.int32)
    read = jax.jit(lambda *a: model.apply(*a, True, method=models.EncoderDecoder._read))
    logits, weights, _ = read(v, queries, memory, jnp.asarray(lengths))
    p = jax.tree.map(np.asarray, v["params"])
    for b in range(3):
        n = lengths[b]
        for t in range(4):
            scores = reference_scores(p["read"], queries[b, t], memory[b, :n], attention, score)
            soft = np.exp(scores - scores.max())
            soft /= soft.sum()
            np.testing.assert_allclose(weights[b, t, :n], soft, rtol=1e-4, atol=1e-6)
            assert (weights[b, t, n:] == 0).all()
            if attention == "soft":
                context = soft @ memory[b, :n]
            else:  # evaluation: the single most likely state
                context = memory[b, np.argmax(scores)]
            hidden = np.concatenate([queries[b, t], context]) @ p["combine"]["kernel"]
            out = np.tanh(hidden + p["combine"]["bias"]) @ p["head"]["kernel"] + p["head"]["bias"]
            np.testing.assert_allclose(logits[b, t], out, rtol=1e-4, atol=1e-4)


def test_padding_is_never_read(batch):
    model, v = make("lru", "soft")
    apply = jax.jit(functools.partial(model.apply, return_weights=True))
    logits, weights = apply(v, batch["inputs"], batch["lengths"], batch["decoder_inputs"])
    valid = np.arange(6)[None, :] < np.asarray(batch["lengths"])[:, None]
    assert (np.asarray(weights)[~np.broadcast_to(valid[:, None], weights.shape)] == 0).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    noisy = jnp.where(valid, batch["inputs"], 7)  # other tokens where the source is padding
    again, _ = apply(v, noisy, batch["lengths"], batch["decoder_inputs"])
    np.testing.assert_allclose(again, logits, atol=1e-5)


def test_hard_attention_samples_in_training_and_trains_through_straight_through(batch):
    model, v = make("gru", "hard")
    args = (batch["inputs"], batch["lengths"], batch["decoder_inputs"])

    def total(params, key):
        out = model.apply({"params": params}, *args, deterministic=False, rngs={"dropout": key})
        return out.sum()

    value_and_grad = jax.jit(jax.value_and_grad(total))
    (a, grads), (b, _) = (
        value_and_grad(v["params"], jax.random.key(0)),
        value_and_grad(v["params"], jax.random.key(1)),
    )
    assert a != b  # different sampled positions
    assert np.abs(grads["read"]["query"]["kernel"]).max() > 0  # soft gradients reach scores


def _reinforce_reference(p, captured, batch, positions, baseline, decay, weight):
    """numpy float64: REINFORCE's surrogate loss, its gradient for the hard attention's query
    kernel and the new baseline mean, from the model's own decoder queries, memory, logits and
    draws (step t rewarded by log p(target t); the entropy bonus weighted by `weight`)."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    queries = f64(captured["decoder_norm"]["__call__"][0])  # [B, T, d]
    memory = f64(captured["encoder_norm"]["__call__"][0])  # [B, S, d], padding not yet zeroed
    logits = f64(captured["__call__"][0])
    targets, mask = np.asarray(batch["targets"]), f64(batch["mask"])
    valid = np.arange(memory.shape[1]) < np.asarray(batch["lengths"])[:, None]  # [B, S]
    memory = np.where(valid[..., None], memory, 0.0)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    reward = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    advantage = reward - baseline.mean / (1 - decay**baseline.count)
    kernel = f64(p["read"]["query"]["kernel"])
    d = kernel.shape[0]
    scores = np.einsum("btd,bsd->bts", queries @ kernel, memory) / np.sqrt(d)
    scores = np.where(valid[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    log_probs = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -np.sum(probs * log_probs, -1)
    picked = np.eye(scores.shape[-1])[positions]  # [B, T, S]
    drawn_log_p = np.sum(picked * log_probs, -1)
    count = mask.sum()
    loss = -np.sum(advantage * drawn_log_p * mask) / count - weight * np.sum(entropy * mask) / count
    # d log p(j) / d scores = onehot(j) - p; d H / d scores = -p (log p + H)
    d_entropy = -probs * (log_probs + entropy[..., None])
    d_scores = -(advantage * mask / count)[..., None] * (picked - probs)
    d_scores -= weight * (mask / count)[..., None] * d_entropy
    d_kernel = np.einsum("bts,btd,bse->de", d_scores, queries, memory) / np.sqrt(d)
    new_mean = decay * baseline.mean + (1 - decay) * np.sum(reward * mask) / count
    return loss, d_kernel, new_mean


def test_the_train_steps_reinforce_gradient_is_the_estimators_and_its_baseline_is_saved(
    batch, tmp_path
):
    decay, weight = 0.8, 0.3
    model, v = make(
        "gru", "hard", hard_estimator="reinforce", baseline_decay=decay, entropy_weight=weight
    )
    assert set(v) >= {"params", "baselines"}
    tx = optax.sgd(1.0)  # the update is minus the gradient
    baseline = att.Baseline(jnp.float32(-1.5), jnp.int32(3))  # mid-run: debiased -1.5/(1-.8^3)
    state = TrainState.create(jax.tree.map(jnp.copy, v), tx)  # the step donates its state
    state = state.replace(model_state={"baselines": {"reward": baseline}})
    p = jax.tree.map(np.array, v["params"])
    seed = 5
    new_state, metrics = steps.make_train_step(model, tx, TASK.spec, seed=seed)(state, batch)

    # The same forward pass, its draws from the train step's key for step 0.
    key = jax.random.fold_in(jax.random.key(seed), 0)
    args = (batch["inputs"], batch["lengths"], batch["decoder_inputs"])
    forward = functools.partial(
        model.apply, deterministic=False, capture_intermediates=True, mutable=["intermediates"]
    )
    _, seen = jax.jit(forward)(v, *args, rngs={"dropout": key})
    captured = seen["intermediates"]
    positions = np.asarray(captured["read"]["positions"][0])[..., 0]
    baseline64 = att.Baseline(-1.5, 3)
    loss, d_kernel, new_mean = _reinforce_reference(
        p, captured, batch, positions, baseline64, decay, weight
    )
    got = p["read"]["query"]["kernel"] - np.asarray(new_state.params["read"]["query"]["kernel"])
    assert np.abs(d_kernel).max() > 1e-3  # the signal is well above the tolerance
    np.testing.assert_allclose(got, d_kernel, atol=2e-6, rtol=1e-4)
    assert float(metrics["losses/reinforce"]) == pytest.approx(loss, rel=1e-5)
    moved = new_state.model_state["baselines"]["reward"]
    assert int(moved.count) == 4 and float(moved.mean) == pytest.approx(new_mean, rel=1e-5)

    # The baseline is saved and restored with the parameters.
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    checkpointer.save(1, new_state)
    restored = checkpointer.restore(TrainState.create(v, tx), 1)
    checkpointer.close()
    assert int(restored.model_state["baselines"]["reward"].count) == 4
    assert float(restored.model_state["baselines"]["reward"].mean) == float(moved.mean)
    np.testing.assert_array_equal(
        np.asarray(restored.params["read"]["query"]["kernel"]),
        np.asarray(new_state.params["read"]["query"]["kernel"]),
    )


def test_sequence_accuracy_on_a_hand_written_batch():
    spec = TaskSpec("reverse", "seq2seq", 3, 5, vocab_size=5, target_len=3, special_tokens=TOKENS)
    targets = jnp.array([[3, 4, 2], [4, 2, 0]])
    mask = jnp.array([[1.0, 1, 1], [1, 1, 0]])
    predicted = jnp.array([[3, 4, 2], [4, 3, 1]])  # row 0 right; row 1 wrong at step 1
    logits = jax.nn.one_hot(predicted, 5) * 10.0

    @jax.jit  # one compile, not one per operation
    def metrics_of(logits, batch):
        return steps.summarise(spec, steps.loss_sums(spec, logits, batch))

    metrics = metrics_of(logits, {"targets": targets, "mask": mask})
    assert float(metrics["accuracy"]) == pytest.approx(4 / 5)
    assert float(metrics["sequence_accuracy"]) == pytest.approx(1 / 2)


# ---------------------------------------------------------------- a short training run


def reverse_config():
    c = config_lib.default_config()
    c.task = {"name": "reverse", "num_symbols": 6, "min_length": 2, "max_length": 6}
    c.model.update({"d_model": 32, "lru": {"d_state": 32}, "num_layers": 1, "dropout_rate": 0.0})
    c.train.update(
        {
            "batch_size": 32,
            "num_steps": 300,
            "learning_rate": 5e-3,
            "warmup_steps": 30,
            "weight_decay": 0.0,
            "log_every": 100,
            "eval_every": 300,
            "checkpoint_every": 300,
            "eval_batches": 2,
        }
    )
    c.generate.num_samples = 0
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reverse model trained for 300 steps, loaded back from its checkpoint."""
    workdir = str(tmp_path_factory.mktemp("reverse"))
    final = loop.train_and_evaluate(reverse_config(), workdir)
    return workdir, final, attention_maps.load_run(workdir)


def test_short_training_run_learns_to_reverse(trained):
    _, final, (_, task, model, variables) = trained
    b = task.batch("test", 0, 64)
    tokens, _ = models.greedy_decode(
        model, variables, b["inputs"], b["lengths"], 7, **TOKENS._asdict()
    )
    exact = [
        list(out[: n + 1]) == list(src[:n][::-1]) + [2]
        for src, n, out in zip(b["inputs"], b["lengths"], tokens, strict=True)
    ]
    assert np.mean(exact) >= 0.9
    assert final["test"]["loss"] < 0.2 * task.spec.baseline
    # Teacher-forced sequence accuracy is exactly greedy decoding's exact-match rate.
    logits = jax.jit(model.apply)(variables, b["inputs"], b["lengths"], b["decoder_inputs"])
    metrics = steps.summarise(task.spec, steps.loss_sums(task.spec, logits, b))
    assert float(metrics["sequence_accuracy"]) == pytest.approx(np.mean(exact))


def test_a_run_saved_before_the_model_keys_were_grouped_still_loads(trained, tmp_path):
    workdir, _, (config, _, model, variables) = trained
    old = str(tmp_path / "old_run")
    shutil.copytree(workdir, old)
    saved = json.loads(config.to_json())
    m = saved["model"]
    flat = {k: v for k, v in m.items() if k not in ("mixer", "lru", "rnn", "attention", "seq2seq")}
    ring = {k: v for k, v in m["lru"].items() if k != "layer_rings"}  # newer than the layout
    newer = ("hard_estimator", "baseline_decay", "entropy_weight")  # keys newer than the layout
    s2s = {k: v for k, v in m["seq2seq"].items() if k not in newer}
    flat.update(cell=m["mixer"], **ring, **m["attention"], **s2s)  # no grad_chunk
    saved["model"] = flat
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(saved, f)
    config_old, _, model_old, variables_old = attention_maps.load_run(old)
    assert model_old == model
    assert config_old.model.to_dict() == config.model.to_dict()
    for got, want in zip(jax.tree.leaves(variables_old), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_attention_maps_of_reverse_are_anti_diagonal(trained, tmp_path):
    workdir, _, (_, task, model, variables) = trained
    summary = attention_maps.attention_maps(workdir, str(tmp_path), num_examples=64)
    assert len(summary["images"]) == 4  # at most `max_images` PNGs
    for path in summary["images"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert json.load(f)["exact_match"] >= 0.9
    # Recomputed here: output step t reads source step n - 1 - t.
    b = task.batch("test", 0, 64)
    _, weights = models.greedy_decode(
        model, variables, b["inputs"], b["lengths"], 7, **TOKENS._asdict()
    )
    hits = [
        np.argmax(weights[i, t]) == n - 1 - t for i, n in enumerate(b["lengths"]) for t in range(n)
    ]
    assert np.mean(hits) >= 0.9


def test_attention_maps_decode_with_the_runs_scan_choices(trained, tmp_path, monkeypatch):
    """A run's saved scan_choices.json decides the encoder's "auto" scans while its attention
    maps are drawn (the method the built-in rule would not run): the model is built with it."""
    from lru_jax import scan

    workdir = trained[0]
    built_in = scan.choose_method(8, 256, dtype=jnp.complex64)  # the rule without a table
    preferred = "sequential" if built_in == "associative" else "associative"
    entry = {"dtype": "complex64", "time": 8, "state_size": 256, "mode": "fwd",
             "times_ms": {built_in: 2.0, preferred: 1.0}}  # fmt: skip
    saved = os.path.join(workdir, "scan_choices.json")
    with open(saved, "w") as f:
        json.dump({"backend": jax.default_backend(), "entries": [entry]}, f)
    traced, trace, load_run = [], scan._scan, attention_maps.load_run
    monkeypatch.setattr(scan, "_scan", lambda m, *a, **k: traced.append(m) or trace(m, *a, **k))
    # the scans of building the model's template state (before the table) do not count
    monkeypatch.setattr(attention_maps, "load_run", lambda w: (load_run(w), traced.clear())[0])
    try:
        attention_maps.attention_maps(workdir, str(tmp_path), num_examples=8, max_images=1)
    finally:
        os.remove(saved)
    assert traced and set(traced) == {preferred}


def test_cued_speaker_attention_and_its_heatmap_on_a_hand_written_case(tmp_path):
    task = CocktailParty(num_sources=2, tokens_per_source=2, max_burst=2)
    b = task.batch("test", 0, 2)
    weights = np.zeros((2, 3, 5))  # [batch, T = M + 1, S = 1 + K M]
    # Example 0 reads its cued speaker's steps at output steps 0 and 1; example 1 reads the
    # other speaker at step 0 and splits step 1 half and half. EOS steps do not count.
    for i, reads in enumerate([[1.0, 1.0], [0.0, 0.5]]):
        cued = np.flatnonzero(b["speakers"][i] == b["cued_source"][i]) + 1
        other = np.flatnonzero(b["speakers"][i] != b["cued_source"][i]) + 1
        for t, share in enumerate(reads):
            weights[i, t, cued[0]] = share
            weights[i, t, other[0]] = 1.0 - share
        weights[i, 2, 0] = 1.0
    summary = task.attention_summary(weights, b)
    assert summary["attention_on_cued_speaker"] == pytest.approx(2.5 / 4)
    assert summary["cued_speaker_share_of_steps"] == 0.5  # two speakers, two words each
    (colours, caption), _ = task.source_annotations(b)
    assert colours[0] is None and len(colours) == 5 and "speaker" in caption
    cued = b["speakers"][0] == b["cued_source"][0]  # example 0's mixture steps 1..4
    assert len({colours[1 + s] for s in np.flatnonzero(cued)}) == 1
    assert colours[1 + np.flatnonzero(cued)[0]] != colours[1 + np.flatnonzero(~cued)[0]]
    path = tmp_path / "cocktail.png"
    attention_maps.plot_example(
        path, weights[0], b["inputs"][0], b["targets"][0], colours, num_cues=2, title=caption
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_naming_the_argument(batch, tmp_path):
    with pytest.raises(ValueError, match="attention"):
        make(attention="local")
    with pytest.raises(ValueError, match="score"):
        make(score="cosine")
    with pytest.raises(ValueError, match="mixer"):
        make(mixer="attention")
    model, v = make()
    with pytest.raises(ValueError, match="decoder_inputs"):
        model.apply(v, batch["inputs"], batch["lengths"])
    with pytest.raises(TypeError, match="decoder_inputs"):
        model.apply(v, batch["inputs"], batch["lengths"], batch["decoder_inputs"] * 1.0)
    with pytest.raises(ValueError, match="decoder_inputs"):
        model.apply(v, batch["inputs"], batch["lengths"], batch["decoder_inputs"][:2])
    with pytest.raises(ValueError, match="seq_lengths"):
        model.apply(v, batch["inputs"], batch["lengths"] + 5, batch["decoder_inputs"])
    with pytest.raises(ValueError, match="max_length"):
        models.greedy_decode(model, v, batch["inputs"], batch["lengths"], 0, **TOKENS._asdict())
    with pytest.raises(TypeError, match="inputs"):
        models.greedy_decode(
            model, v, batch["inputs"] * 1.0, batch["lengths"], 3, **TOKENS._asdict()
        )
    c = reverse_config()
    c.model.seq2seq.attention = "sparse"
    with pytest.raises(ValueError, match="config.model.seq2seq.attention"):
        config_lib.validate(c)
    c = reverse_config()
    c.model.mixer = "attention"
    with pytest.raises(ValueError, match="config.model.mixer"):
        config_lib.check_against_task(c, TASK.spec)
    c = reverse_config()
    c.model.remat = True
    with pytest.raises(ValueError, match="config.model.remat"):
        config_lib.check_against_task(c, TASK.spec)
    c = reverse_config()
    c.model.pooling = "last"
    with pytest.raises(ValueError, match="config.model.pooling"):
        config_lib.check_against_task(c, TASK.spec)
    with pytest.raises(ValueError, match="workdir"):
        attention_maps.load_run(str(tmp_path))
