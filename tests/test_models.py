"""Every model behind one interface: learning, determinism, checkpoints, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schema.vocab import MODEL_INPUT, MODELS
from trainer.evaluate import macro_f1
from trainer.models import SchemaMismatch, build_model, load_model

# Small and quick: a few epochs/rounds on a few hundred rows.
# No wall-clock budget: on a loaded CI machine it would cut training short and break
# determinism. One thread: tiny batches gain nothing from two, and lose a lot when the
# cores are shared.
FAST = {
    "gbt": {"rounds": 40, "threads": 1},
    "mlp": {"epochs": 15, "patience": 15, "max_seconds": None, "threads": 1},
    **{
        m: {"epochs": 8, "patience": 8, "max_seconds": None, "threads": 1}
        for m in ("cnn", "gru", "lstm", "transformer")
    },
    "rocket": {"threads": 1},
}
C, T, F = 6, 20, 24
# Raw-unit spread like the real channels: % next to B/s; the models must normalise themselves.
SCALE = np.array([1.0, 100.0, 1e3, 1e5, 1e7, 10.0], np.float32)


def toy(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable by construction: class k raises channel (feature) k, in raw units."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    if kind == "tensor":
        x = rng.gamma(2.0, 1.0, size=(n, C, T)).astype(np.float32)
        x[np.arange(n), y, :] += 8.0
        return (x * SCALE[:, None]).astype(np.float32), y
    x = rng.gamma(2.0, 1.0, size=(n, F)).astype(np.float32)
    x[np.arange(n), y] += 8.0
    return (x * np.tile(SCALE, F // C)).astype(np.float32), y


def fitted(name: str, seed: int = 0, n: int = 500):
    kind = MODEL_INPUT[name]
    x_tr, y_tr = toy(kind, n, seed=1)
    x_val, y_val = toy(kind, 150, seed=2)
    model = build_model(name, x_tr.shape[1:], n_classes=5, profile="demo", seed=seed, **FAST[name])
    model.fit(x_tr, y_tr, x_val, y_val)
    return model


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: fitted(name) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_learns_a_separable_toy_problem(models: dict, name: str) -> None:
    x, y = toy(MODEL_INPUT[name], 300, seed=3)
    proba = models[name].predict_proba(x)
    assert proba.dtype == np.float32 and proba.shape == (300, 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert macro_f1(y, proba.argmax(axis=1)) > 0.9
    fit = models[name].fit_result
    assert fit is not None and 1 <= fit.best_epoch <= fit.epochs_run and fit.best_val_f1 > 0.9


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_probabilities(models: dict, name: str) -> None:
    again = fitted(name)
    x, _ = toy(MODEL_INPUT[name], 64, seed=4)
    np.testing.assert_array_equal(models[name].predict_proba(x), again.predict_proba(x))


def test_another_seed_another_model() -> None:
    x, _ = toy("tensor", 64, seed=4)
    assert not np.array_equal(fitted("cnn", seed=0).predict_proba(x), fitted("cnn", seed=1).predict_proba(x))


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_and_schema_refusal(models: dict, name: str, tmp_path: Path) -> None:
    model = models[name]
    model.save(tmp_path / name, schema_hash="a" * 64)
    back = load_model(tmp_path / name, expected_schema_hash="a" * 64)
    x, _ = toy(MODEL_INPUT[name], 50, seed=5)
    np.testing.assert_array_equal(model.predict_proba(x), back.predict_proba(x))
    assert back.fit_result == model.fit_result and back.config == model.config
    with pytest.raises(SchemaMismatch) as e:
        load_model(tmp_path / name, expected_schema_hash="b" * 64)
    assert "a" * 64 in str(e.value) and "b" * 64 in str(e.value)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_predict_proba(models: dict, name: str, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    path = models[name].to_onnx(tmp_path / f"{name}.onnx", opset=17)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) == 17
    # Only standard ONNX domains: the Pi's onnxruntime has no custom ops.
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx", "ai.onnx.ml"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 37):  # the batch axis is dynamic
        x, _ = toy(MODEL_INPUT[name], n, seed=6)
        got = sess.run(["probabilities"], {"features": x})[0]
        assert got.shape == (n, 5)
        assert np.abs(got - models[name].predict_proba(x)).max() <= 1e-4


def test_normalisation_is_fitted_on_train_data(models: dict) -> None:
    norm = models["cnn"].norm
    # channel 4 holds ~1e7 B/s: its signed-log mean is ~16, not the initial 0
    assert norm.mean.shape == (C, 1) and 14 < float(norm.mean[4, 0]) < 18
    assert models["mlp"].norm.mean.shape == (F,)


def test_gbt_keeps_all_classes_when_one_is_absent_from_training() -> None:
    x, y = toy("summary", 300, seed=7)
    keep = y != 3
    model = build_model("gbt", (F,), profile="demo", rounds=10, threads=1)
    model.fit(x[keep], y[keep], x[keep][:50], y[keep][:50])
    assert model.predict_proba(x[:5]).shape == (5, 5)


def test_gbt_small_set_settings_below_the_threshold_explicit_ones_win_and_export(tmp_path: Path) -> None:
    """quick gbt: under ``small_rows`` training rows the small-set settings train (and are
    recorded); at or above it the profile's own; an explicit setting is never replaced."""
    import json

    import onnxruntime as ort

    x, y = toy("summary", 400, seed=9)
    x_val, y_val = toy("summary", 60, seed=10)

    def fit(n: int, **over: object):
        model = build_model("gbt", (F,), profile="quick", rounds=30, threads=1, small_rows=200, **over)
        model.fit(x[:n], y[:n], x_val, y_val)
        # What xgboost itself trained with: max_depth, min_child_weight, colsample_bynode.
        tp = json.loads(model.booster.save_config())["learner"]["gradient_booster"]["tree_train_param"]
        used = (
            int(tp["max_depth"]),
            round(float(tp["min_child_weight"]), 6),
            round(float(tp["colsample_bynode"]), 6),
        )
        return model, used

    small, used = fit(150)
    assert used == (4, 0.1, 0.1) and small.config["max_depth"] == 4
    assert fit(150, max_depth=2)[1] == (2, 0.1, 0.1)
    big, used = fit(300)
    assert used == (6, 1.0, 0.3) and big.config["max_depth"] == 6
    path = small.to_onnx(tmp_path / "gbt-small.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"features": x[150:]}
    )[0]
    assert np.abs(got - small.predict_proba(x[150:])).max() <= 1e-4
    assert (got.argmax(axis=1) == small.predict(x[150:])).all()


def test_bad_inputs_name_the_problem() -> None:
    model = build_model("mlp", (F,), profile="demo")
    x, y = toy("summary", 40, seed=8)
    x_nan = x.copy()
    x_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="1 rows contain NaN"):
        model.fit(x_nan, y, x, y)
    with pytest.raises(ValueError, match=r"expected shape \(N, 24\)"):
        model.fit(x[:, :10], y, x, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        model.fit(x, y + 5, x, y)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("svm", (F,))
    with pytest.raises(ValueError, match="reads tensor input"):
        build_model("cnn", (F,))


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_kept_weights_are_the_best_on_validation(ema: float) -> None:
    """With ``ema`` on, what validation scored and what is kept are the averaged weights."""
    kind = "tensor"
    x_tr, y_tr = toy(kind, 300, seed=1)
    x_val, y_val = toy(kind, 100, seed=9)
    # Noisy labels on half the training set make later epochs worse than the best one.
    y_tr = np.where(np.arange(300) % 2 == 0, (y_tr + 1) % 5, y_tr)
    model = build_model(
        "cnn",
        x_tr.shape[1:],
        profile="demo",
        seed=0,
        epochs=8,
        patience=8,
        max_seconds=None,
        threads=1,
        ema=ema,
    )
    fit = model.fit(x_tr, y_tr, x_val, y_val)
    scores = [row["val_f1"] for row in fit.history]
    assert fit.best_val_f1 == max(scores) and scores[fit.best_epoch - 1] == max(scores)
    assert macro_f1(y_val, model.predict(x_val)) == pytest.approx(fit.best_val_f1)


def test_a_tie_on_validation_f1_goes_to_the_lower_loss() -> None:
    """A separable set saturates validation F1 at 1.0 early; the kept epoch is the tied one
    with the lowest validation loss, not the first to reach 1.0."""
    x_tr, y_tr = toy("summary", 300, seed=1)
    x_val, y_val = toy("summary", 100, seed=2)
    cfg = {**FAST["mlp"], "epochs": 12, "patience": 3}
    model = build_model("mlp", x_tr.shape[1:], profile="demo", seed=0, **cfg)
    fit = model.fit(x_tr, y_tr, x_val, y_val)
    top = max(r["val_f1"] for r in fit.history)
    tied = [r for r in fit.history if r["val_f1"] == top]
    assert len(tied) > 1, "toy problem should saturate validation F1 over several epochs"
    assert fit.best_epoch == min(tied, key=lambda r: r["val_loss"])["epoch"] != tied[0]["epoch"]


def test_schedule_and_class_weights() -> None:
    from trainer.loop import class_weights, jitter_gain, lr_at

    lrs = [lr_at(s, total=100, warmup=10, base=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.05
    w = class_weights(np.array([0, 0, 0, 1]), 5).numpy()
    assert w[1] == pytest.approx(3 * w[0]) and w[2] == 1.0
    import torch

    # A summary row's features of one channel share one gain, so ratios within a channel survive.
    x = torch.ones(4, 3 * 8)
    g = jitter_gain(x, 0.5, 8, torch.Generator().manual_seed(0)).reshape(4, 3, 8)
    assert torch.allclose(g, g[:, :, :1].expand_as(g)) and not torch.allclose(g[:, 0], g[:, 1])


@pytest.mark.parametrize("name", [m for m in MODELS if MODEL_INPUT[m] == "tensor"])
@pytest.mark.parametrize("profile", ["demo", "quick", "full"])
def test_any_length_builds_and_exports(name: str, profile: str, tmp_path: Path) -> None:
    """20 to 200 steps, primes included: every tensor model builds, runs and exports to plain ONNX."""
    import onnx
    import onnxruntime as ort

    for steps in (20, 29, 57, 100, 151, 200):
        model = build_model(name, (C, steps), profile=profile, seed=0)
        x, _ = toy("tensor", 3, seed=steps)
        x = np.ascontiguousarray(np.resize(x, (3, C, steps)), np.float32)
        proba = model.predict_proba(x)
        assert proba.shape == (3, 5) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        path = model.to_onnx(tmp_path / f"{name}-{profile}-{steps}.onnx")
        proto = onnx.load(str(path))
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx", "ai.onnx.ml"}
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"features": x}
        )[0]
        assert np.abs(got - proba).max() <= 1e-4, (name, profile, steps)


def test_budget_fits_the_data() -> None:
    from trainer.loop import LoopConfig, plan_budget

    cfg = LoopConfig(epochs=20, batch_size=128, patience=5, min_steps=600, min_batches=8, min_batch_size=16)
    big = plan_budget(100_000, cfg)  # a large set keeps the configured batch and epochs
    assert (big.batch_size, big.epochs, big.patience) == (128, 20, 5)
    small = plan_budget(200, cfg)  # 200 rows: 25 a batch, 8 steps an epoch, 75 epochs
    assert small.batch_size == 25 and small.steps_per_epoch == 8
    assert small.total_steps >= 600 and small.epochs == 75 and small.patience == 19
    tiny = plan_budget(40, cfg)  # never below min_batch_size rows, never a batch of one
    assert tiny.batch_size == 16 and tiny.total_steps >= 600
    assert plan_budget(3, cfg).batch_size == 3


def test_small_set_gets_its_step_floor() -> None:
    """200 rows with epochs=2: the floor, not the epoch count, sets how long it trains."""
    x_tr, y_tr = toy("tensor", 200, seed=1)
    x_val, y_val = toy("tensor", 60, seed=2)
    model = build_model(
        "gru", x_tr.shape[1:], profile="demo", epochs=2, patience=2, min_steps=60, max_seconds=0.0, threads=1
    )
    fit = model.fit(x_tr, y_tr, x_val, y_val)
    # 200 rows -> batch 25, 8 steps an epoch: 60 steps need 8 epochs, and the time budget
    # (already spent) cannot stop the run before the floor.
    assert fit.epochs_run == 8 and fit.history[-1]["epochs"] == 8


def test_rocket_dual_and_primal_ridge_agree() -> None:
    """Fewer windows than features take the N x N (dual) solve; it is the same ridge."""
    x_tr, y_tr = toy("tensor", 120, seed=1)
    x_val, y_val = toy("tensor", 60, seed=2)
    fits = {
        s: build_model("rocket", x_tr.shape[1:], profile="demo", solver=s, threads=1)
        for s in ("dual", "primal")
    }
    for m in fits.values():
        m.fit(x_tr, y_tr, x_val, y_val)
    assert fits["dual"].config["alpha"] == fits["primal"].config["alpha"]
    x, _ = toy("tensor", 50, seed=3)
    np.testing.assert_allclose(fits["dual"].predict_proba(x), fits["primal"].predict_proba(x), atol=1e-4)


def _rocket_reference(net, x: np.ndarray) -> np.ndarray:
    """rocket's soft PPVs from their definition, one dilation at a time, nothing folded."""
    import torch

    from trainer.models.rocket import KERNEL_LENGTH, N_KERNELS

    z = net.norm(torch.from_numpy(x))
    out = []
    for i, d in enumerate(net.dilations):
        summed = torch.nn.functional.conv1d(z, getattr(net, f"select{i}"))
        pad = (KERNEL_LENGTH - 1) // 2 * d
        v = torch.nn.functional.conv1d(
            summed, net.kernels, dilation=d, padding=pad, groups=N_KERNELS
        ).unsqueeze(2)
        u = (v - getattr(net, f"bias{i}")) * getattr(net, f"inv_tau{i}")  # (N, 84, B, T)
        s = torch.sigmoid(u) if net.ppv == "sigmoid" else torch.clamp(u / 4 + 0.5, 0.0, 1.0)
        out.append(s.mean(dim=3).flatten(1))
    return torch.cat(out, dim=1).numpy()


@pytest.mark.parametrize(("ppv", "steps"), [("ramp", 20), ("sigmoid", 20), ("ramp", 9)])
def test_rocket_folded_graph_computes_the_defined_features(ppv: str, steps: int) -> None:
    """Standardisation and width folded into the kernels, dilations fused: the same PPVs."""
    import torch

    x_tr, y_tr = toy("tensor", 120, seed=1)
    x_tr = np.ascontiguousarray(x_tr[..., :steps])
    model = build_model("rocket", x_tr.shape[1:], profile="demo", ppv=ppv, threads=1)
    model.fit(x_tr[:80], y_tr[:80], x_tr[80:], y_tr[80:])
    x, _ = toy("tensor", 30, seed=3)
    x = np.ascontiguousarray(x[..., :steps])
    with torch.no_grad():
        got = model.net.features(torch.from_numpy(x)).numpy()
    want = _rocket_reference(model.net, x)
    assert got.shape == want.shape == (30, model.net.n_features)
    assert 0.05 < want.mean() < 0.95  # biases from the outputs' quantiles: neither all 0 nor all 1
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rocket_checkpoint_without_ppv_loads_with_the_sigmoid(tmp_path: Path) -> None:
    """A model saved before the ramp PPV (config without "ppv") keeps the step it was fitted with."""
    import json

    x_tr, y_tr = toy("tensor", 120, seed=1)
    model = build_model("rocket", x_tr.shape[1:], profile="demo", ppv="sigmoid", threads=1)
    model.fit(x_tr[:80], y_tr[:80], x_tr[80:], y_tr[80:])
    model.save(tmp_path / "old", schema_hash="a" * 64)
    doc_path = tmp_path / "old" / "model.json"
    doc = json.loads(doc_path.read_text())
    del doc["config"]["ppv"]
    doc_path.write_text(json.dumps(doc))
    back = load_model(tmp_path / "old", expected_schema_hash="a" * 64)
    assert back.net.ppv == "sigmoid"
    x, _ = toy("tensor", 20, seed=3)
    np.testing.assert_array_equal(back.predict_proba(x), model.predict_proba(x))
    assert build_model("rocket", x_tr.shape[1:], profile="demo").net.ppv == "ramp"
