"""Temperature scaling and expected calibration error (trainer.calibrate) and its fold into every model."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.calibrate import (
    calibration_metrics,
    ece,
    fit_inverse_temperature,
    nll,
    reliability,
    rescale,
    softmax,
)


def overconfident(n: int, seed: int, sharpen: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so softmax(z) is calibrated), reported as softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 5))
    p_true = softmax(z)
    y = np.array([rng.choice(5, p=p) for p in p_true])
    return z, y, softmax(sharpen * z)


def test_ece_is_small_when_calibrated_and_large_when_overconfident() -> None:
    z, y, sharp = overconfident(4000, seed=0, sharpen=4.0)
    assert ece(softmax(z), y) < 0.03
    assert ece(sharp, y) > 0.15
    rel = reliability(sharp, y)
    assert sum(rel["count"]) == 4000 and len(rel["confidence"]) == rel["bins"] == 15
    # Overconfident: in the top bins accuracy trails confidence.
    top = [i for i, c in enumerate(rel["count"]) if c > 50][-1]
    assert rel["accuracy"][top] < rel["confidence"][top] - 0.1


def test_temperature_recovers_the_sharpening() -> None:
    z, y, _ = overconfident(4000, seed=1, sharpen=1.0)
    beta = fit_inverse_temperature(4.0 * z, y)  # logits 4x too large: T ~ 4
    assert beta == pytest.approx(0.25, rel=0.15)
    assert fit_inverse_temperature(z, y) == pytest.approx(1.0, rel=0.15)


def test_rescale_undoes_and_keeps_argmax() -> None:
    z, y, sharp = overconfident(500, seed=2, sharpen=3.0)
    back = rescale(sharp, 1 / 3.0)
    np.testing.assert_allclose(back, softmax(z), atol=1e-9)
    assert (back.argmax(axis=1) == sharp.argmax(axis=1)).all()
    m = calibration_metrics(sharp, y, beta=3.0)  # sharp is "after" a (bad) beta of 3
    assert m["temperature"] == pytest.approx(1 / 3)
    assert m["ece_before"] < m["ece_after"] and m["nll_before"] < m["nll_after"]
    assert nll(np.eye(5)[y], y) == pytest.approx(0.0, abs=1e-9)


def test_every_model_is_calibrated_on_validation_and_exports_it(tmp_path) -> None:
    """Noisy labels make an overconfident net; calibration lowers its validation NLL, argmax unchanged."""
    import onnxruntime as ort
    from test_models import toy

    from trainer.models import build_model

    x_tr, y_tr = toy("tensor", 300, seed=1)
    x_val, y_val = toy("tensor", 200, seed=2)
    rng = np.random.default_rng(0)
    flip = rng.random(300) < 0.3
    y_tr = np.where(flip, rng.integers(0, 5, 300), y_tr)
    y_val = np.where(rng.random(200) < 0.3, rng.integers(0, 5, 200), y_val)
    for name, extra in (
        ("cnn", {"epochs": 30, "patience": 30, "min_steps": 0, "max_seconds": None, "threads": 1}),
        ("rocket", {"threads": 1}),
    ):
        model = build_model(name, x_tr.shape[1:], profile="demo", seed=0, **extra)
        fit = model.fit(x_tr, y_tr, x_val, y_val)
        cal = fit.calibration
        assert cal is not None and cal["temperature"] == pytest.approx(1 / model.inverse_temperature)
        assert model.inverse_temperature != 1.0
        assert cal["val_nll_after"] < cal["val_nll_before"] - 0.01, (name, cal)
        model.config["inverse_temperature"] = 1.0
        raw = model.predict_proba(x_val)
        model.config["inverse_temperature"] = 1 / cal["temperature"]
        got = model.predict_proba(x_val)
        assert (got.argmax(axis=1) == raw.argmax(axis=1)).all()
        sess = ort.InferenceSession(
            str(model.to_onnx(tmp_path / f"{name}.onnx")), providers=["CPUExecutionProvider"]
        )
        onnx_p = sess.run(["probabilities"], {"features": x_val})[0]
        assert np.abs(onnx_p - got).max() <= 1e-4 and np.abs(onnx_p - raw).max() > 1e-3


def test_gbt_folds_the_temperature_into_its_graph(tmp_path) -> None:
    import onnx
    import onnxruntime as ort
    from test_models import toy

    from trainer.models import build_model

    x, y = toy("summary", 400, seed=3)
    model = build_model("gbt", x.shape[1:], profile="demo", rounds=30, threads=1)
    model.fit(x[:300], y[:300], x[300:], y[300:])
    model.config["inverse_temperature"] = 0.5  # any beta: the graph must follow it
    path = model.to_onnx(tmp_path / "gbt.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {"Log", "Mul", "Softmax"} <= {n.op_type for n in proto.graph.node}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"features": x[:50]}
    )[0]
    assert np.abs(got - model.predict_proba(x[:50])).max() <= 1e-5


def test_ece_bootstrap_matches_the_point_estimate_and_sees_the_gain() -> None:
    from trainer.calibrate import ece_bootstrap

    z, y, sharp = overconfident(3000, seed=4, sharpen=4.0)
    groups = np.repeat(np.arange(300), 10)  # 300 "episodes" of 10 windows
    b = ece_bootstrap(sharp, softmax(z), y, groups, n_boot=300, seed=0)
    assert b["gap"]["diff"] == pytest.approx(ece(softmax(z), y) - ece(sharp, y), abs=1e-9)
    assert b["before_ci"][0] <= ece(sharp, y) <= b["before_ci"][1]
    assert b["after_ci"][0] <= ece(softmax(z), y) <= b["after_ci"][1]
    assert b["gap"]["significant"] and b["gap"]["hi"] < 0 and b["n_groups"] == 300


def test_ood_holdback_keeps_whole_episodes_and_every_multi_episode_profile() -> None:
    from trainer.ood import _holdback_episodes

    ep = np.array([f"e{i}" for i in range(10) for _ in range(3)])
    prof = np.array(["a"] * 15 + ["b"] * 12 + ["c"] * 3)  # a: 5 episodes, b: 4, c: 1
    held = _holdback_episodes(ep, prof, 0.2, seed=0)
    assert {e for e in held if e in {"e0", "e1", "e2", "e3", "e4"}} and {
        e for e in held if e in {"e5", "e6", "e7", "e8"}
    }
    assert "e9" not in held  # a lone episode of its profile stays in the fit
    only_singles = _holdback_episodes(np.array(["x", "y", "z"]), np.array(["p", "q", "r"]), 0.2, seed=0)
    assert len(only_singles) == 1
