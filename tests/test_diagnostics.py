"""lru_jax.diagnostics and the diagnose command, against cases worked by hand, numpy and
finite differences."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lru_jax import cells, diagnose, diagnostics, lru, models, tasks
from lru_jax.training import config as config_lib
from lru_jax.training import optim
from lru_jax.training.loop import train_and_evaluate
from scripts.results import load_config


def test_linear_rnn_jacobians_are_matrix_powers():
    # h_t = W h_{t-1} + x_t  =>  ∂h_T/∂h_{T-d} = W^d exactly.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4)) / 2
    carry0, xs = rng.normal(size=4), rng.normal(size=(6, 4))
    with jax.enable_x64(True):

        def step(h, x):
            return jnp.asarray(w) @ h + x

        products = np.asarray(diagnostics.jacobian_products(step, jnp.asarray(carry0), xs))
        norms = np.asarray(diagnostics.jacobian_norms(step, jnp.asarray(carry0), xs))
    powers = np.stack([np.linalg.matrix_power(w, d) for d in range(7)])
    np.testing.assert_allclose(products, powers, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(norms, np.linalg.norm(powers, ord=2, axis=(1, 2)), rtol=1e-12)


def test_lru_state_decays_as_lambda_to_the_distance():
    params = lru.init(jax.random.key(1), d_model=3, d_state=4, r_min=0.5, r_max=0.95)
    xs = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    step = diagnostics.lru_step(params)
    carry0 = (jnp.zeros(4), jnp.zeros(4))
    products = np.asarray(diagnostics.jacobian_products(step, carry0, xs))
    norms = np.asarray(diagnostics.jacobian_norms(step, carry0, xs))

    nu, theta = np.asarray(params["nu_log"], np.float64), np.asarray(params["theta_log"])
    lam = np.exp(-np.exp(nu) + 1j * np.exp(theta.astype(np.float64)))
    for d in range(9):
        power = lam**d  # the (real, imag) pair rotates by d θ and shrinks by |λ|^d
        expected = np.block(
            [
                [np.diag(power.real), np.diag(-power.imag)],
                [np.diag(power.imag), np.diag(power.real)],
            ]
        )
        np.testing.assert_allclose(products[d], expected, rtol=1e-5, atol=1e-6)
        mode_norms = [
            np.linalg.norm(products[d][np.ix_([i, i + 4], [i, i + 4])], 2) for i in range(4)
        ]
        np.testing.assert_allclose(mode_norms, np.abs(lam) ** d, rtol=1e-5)
    np.testing.assert_allclose(norms, np.abs(lam).max() ** np.arange(9), rtol=1e-5)


def test_simple_rnn_step_spectra_match_the_hand_jacobian():
    cell = cells.simple_rnn()
    params = cell.init(jax.random.key(2), 2, 5)
    params["w_hh"] = params["w_hh"] * 1.5
    xs = np.random.default_rng(2).normal(size=(7, 2)).astype(np.float32)
    spectra = diagnostics.step_spectra(
        diagnostics.cell_step(cell, params), jnp.zeros(5), xs, every=2
    )
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h, radii, norms = np.zeros(5), [], []
    for t, x in enumerate(xs):
        new = np.tanh(x @ p["w_ih"] + p["b"] + h @ p["w_hh"])
        jac = np.diag(1 - new**2) @ p["w_hh"].T  # ∂h'_i/∂h_j = (1 - h'_i²) W_hh[j, i]
        if t % 2 == 0:
            radii.append(np.abs(np.linalg.eigvals(jac)).max())
            norms.append(np.linalg.svd(jac, compute_uv=False)[0])
        h = new
    np.testing.assert_allclose(spectra["spectral_radius"], radii, rtol=1e-4)
    np.testing.assert_allclose(spectra["spectral_norm"], norms, rtol=1e-4)


def test_lru_spectrum_is_abs_and_phase_of_lambda():
    params = lru.init(jax.random.key(3), 2, 6, r_min=0.4, r_max=0.9, max_phase=1.0)
    spectrum = diagnostics.lru_spectrum(params)
    radius = np.exp(-np.exp(np.asarray(params["nu_log"], np.float64)))
    np.testing.assert_allclose(spectrum["abs"], radius, rtol=1e-5)
    np.testing.assert_allclose(
        spectrum["phase"], np.exp(np.asarray(params["theta_log"])), rtol=1e-5
    )


@pytest.mark.parametrize("cell", ["lstm", "lru"])
def test_probe_gradients_equal_finite_differences(cell):
    # One layer, pooling "last": perturbing the carry after step t < T - 1 and continuing from
    # it is exactly perturbing h_t. LSTM: a (c, h) carry, in float64 (central differences to
    # 1e-6). LRU: a complex state, in float32 (its input term is complex64 by design); the step
    # 1e-2 keeps the O(ε²) error and the rounding error both under the 2e-3 tolerance.
    x64 = cell == "lstm"
    dtype = np.float64 if x64 else np.float32
    batch = tasks.get_task("adding", seq_len=6, seed=0).batch("train", 0, 2)
    model = models.SequenceModel(
        1, mixer=cell, d_model=4, d_state=3, num_layers=1, pooling="last", dtype=dtype
    )
    rng = np.random.default_rng(0)
    with jax.enable_x64(x64):
        inputs, targets = jnp.asarray(batch["inputs"], dtype), jnp.asarray(batch["targets"], dtype)
        variables = jax.jit(model.init)(jax.random.key(0), inputs)  # one compile, not per op
        variables = jax.tree.map(lambda v: v.astype(dtype), variables)

        def loss_fn(out):
            return jnp.mean((out - targets) ** 2)

        (grads,) = diagnostics.state_gradients(model, variables, inputs, loss_fn).values()
        for t in (0, 3):
            g = [leaf[:, t] for leaf in jax.tree.leaves(grads)]
            direction = [rng.normal(size=leaf.shape).astype(dtype) for leaf in g]
            analytic = sum(float(jnp.sum(a * b)) for a, b in zip(g, direction, strict=True))
            # the model's carry: (c, h) for the LSTM; complex for the LRU, probed as (re, im)
            perturb = jax.lax.complex(*direction) if cell == "lru" else tuple(direction)

            @jax.jit
            def split_loss(e, t=t, perturb=perturb):
                ((carry,), _) = model.apply(variables, inputs[:, : t + 1], return_carry=True)
                carry = jax.tree.map(lambda c, d: c + e * d, carry, perturb)
                return loss_fn(model.apply(variables, inputs[:, t + 1 :], initial_carry=(carry,)))

            eps = 1e-5 if x64 else 1e-2
            finite = (float(split_loss(eps)) - float(split_loss(-eps))) / (2 * eps)
            np.testing.assert_allclose(analytic, finite, rtol=1e-6 if x64 else 2e-3)
        (norms,) = diagnostics.hidden_state_grads(model, variables, inputs, loss_fn).values()
    # the norm runs over the whole state: (c, h) together, real and imaginary parts together
    squares = sum(np.sum(np.square(leaf), -1) for leaf in jax.tree.leaves(grads))
    np.testing.assert_allclose(norms, np.sqrt(squares), rtol=1e-6)


def test_group_norms_from_the_gradient_tree():
    rng = np.random.default_rng(4)
    grads = {
        "lru": {
            "nu_log": rng.normal(size=3),
            "B_re": rng.normal(size=(3, 2)),
            "D": rng.normal(size=2),
        },
        "dense": {"kernel": rng.normal(size=(2, 2)), "bias": rng.normal(size=2)},
    }
    norms = optim.group_norms(grads)

    def norm(*arrays):
        return np.sqrt(sum(np.sum(a**2) for a in arrays))

    assert sorted(norms) == ["grad_norm/default", "grad_norm/no_decay", "grad_norm/recurrent"]
    np.testing.assert_allclose(
        norms["grad_norm/recurrent"], norm(grads["lru"]["nu_log"], grads["lru"]["B_re"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        norms["grad_norm/no_decay"], norm(grads["lru"]["D"], grads["dense"]["bias"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        norms["grad_norm/default"], norm(grads["dense"]["kernel"]), rtol=1e-6
    )


def _tiny_overrides(cell="gru"):
    return {
        "task.seq_len": 8,
        "model.mixer": cell,
        "model.d_model": 4,
        "model.lru.d_state": 3,
        "model.num_layers": 1,
        "train.batch_size": 4,
        "train.num_steps": 3,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
        "train.eval_batches": 1,
    }


def test_diagnose_command_on_a_trained_run(tmp_path, capsys):
    overrides = _tiny_overrides()
    workdir, out = tmp_path / "run", tmp_path / "diag"
    train_and_evaluate(load_config("adding.py", overrides), str(workdir))
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    for r in train:  # the group norms add up to the global norm
        groups = [v for k, v in r.items() if k.startswith("grad_norm/")]
        assert len(groups) == 2  # a GRU model: matrices (default) and vectors (no_decay)
        np.testing.assert_allclose(np.sqrt(np.sum(np.square(groups))), r["grad_norm"], rtol=1e-5)

    # the run's config comes from its config.json: no --config, no overrides to repeat
    argv = [f"--workdir={workdir}", f"--out={out}", "--batch_size=3", "--num_examples=2"]
    assert diagnose.main(argv) == 0
    assert "at step 3 (trained)" in capsys.readouterr().out
    names = ["diagnostics.json", "grad_per_step.png", "jacobian_by_distance.png", "spectrum.png"]
    for name in [*names, "grad_norms_training.png"]:
        assert (out / name).stat().st_size > 0
    result = json.load(open(out / "diagnostics.json"))
    layer = result["layers"]["blocks_0/mixer"]
    assert result["step"] == 3 and layer["kind"] == "gru"
    assert len(layer["grad_norm_per_step"]) == 8
    assert len(layer["jacobian_norm_by_distance"]) == 9
    assert layer["jacobian_norm_by_distance"][0] == pytest.approx(1.0)
    assert np.shape(layer["spectrum"]["spectral_radius"]) == (2, 1)  # 2 examples, t = 1


def test_bad_inputs_are_named():
    step = diagnostics.cell_step(cells.gru(), cells.gru().init(jax.random.key(0), 2, 3))
    with pytest.raises(ValueError, match="xs"):
        diagnostics.jacobian_norms(step, jnp.zeros(3), np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="carry0"):
        diagnostics.jacobian_norms(step, jnp.zeros((2, 3)), np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="xs"):
        diagnostics.jacobian_products(step, jnp.zeros(3), np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match="every"):
        diagnostics.step_spectra(step, jnp.zeros(3), np.zeros((4, 2), np.float32), every=0)

    model = models.SequenceModel(1, mixer="gru", d_model=4, num_layers=1, pooling="last")
    x = jnp.zeros((2, 5, 2))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_examples"):
        diagnostics.model_diagnostics(model, variables, x, jnp.sum, num_examples=0)
    with pytest.raises(ValueError, match="seq_lengths"):
        diagnostics.hidden_state_grads(model, variables, x, jnp.sum, jnp.array([5, 3]))
    dense = nn.Dense(3)
    with pytest.raises(ValueError, match="recurrent layers"):
        diagnostics.layer_calls(dense, dense.init(jax.random.key(0), x), x)
    config = load_config("adding.py", _tiny_overrides())
    model, task, state, step = diagnose.load(config)
    assert step == 0
    with pytest.raises(ValueError, match="num_examples"):
        diagnose.diagnose_state(model, task, state.variables(), batch_size=2, num_examples=3)


def test_sgd_optimizer_option_is_momentum_sgd_and_names_are_checked():
    config = load_config("adding.py", {"train.optimizer": "sgd", "train.warmup_steps": 1})
    config.unlock()
    config.train.grad_clip_norm = 0.0
    tx = optim.make_optimizer(config.train)
    params = {"bias": jnp.zeros(3)}  # the no_decay group: plain momentum SGD
    g0, g1 = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 1.0, -1.0])
    state = tx.init(params)
    update0, state = tx.update({"bias": g0}, state, params)  # lr(0) = 0 during warmup
    update1, _ = tx.update({"bias": g1}, state, params)
    lr = config.train.learning_rate
    np.testing.assert_allclose(update0["bias"], np.zeros(3), atol=1e-12)
    np.testing.assert_allclose(update1["bias"], -lr * (0.9 * g0 + g1), rtol=1e-6)
    config.train.optimizer = "adam_typo"
    with pytest.raises(ValueError, match="config.train.optimizer"):
        config_lib.validate(config)
