"""Confidence calibration: temperature scaling on validation, expected calibration error.

Guo et al. 2017: one scalar per model, fitted on the validation split's log loss, scales
the logits (``softmax(beta * z)``, ``beta = 1 / T``); argmax, so accuracy and F1, are
unchanged, only how sure the model says it is. Every model's ``fit`` ends with
:meth:`trainer.models.base.Model.calibrate`, and each model folds ``beta`` into its
exported graph, so ONNX Runtime on the Pi returns the calibrated probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as Guo et al.
BETA_BOUNDS = (1e-2, 1e3)  # 1/T: from 100x softer to 1000x sharper


def log_probs(proba: np.ndarray) -> np.ndarray:
    """log p with p = 0 kept as -inf (softmax of it is 0 again)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(proba, np.float64))


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rescale(proba: np.ndarray, beta: float) -> np.ndarray:
    """softmax(beta * log p): the probabilities the same logits give at another temperature."""
    if len(proba) == 0:
        return np.asarray(proba, np.float64)
    return softmax(beta * log_probs(proba))


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log likelihood of the true class (clipped at 1e-12, so one miss is finite)."""
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return float("nan")
    p = np.asarray(proba, np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def fit_inverse_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The scale beta = 1/T minimising validation log loss of softmax(beta * logits)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return 1.0
    z = np.where(np.isfinite(z), z, -1e30)  # a class a tree model gives p = 0 stays at 0

    def loss(log_beta: float) -> float:
        s = z * math.exp(log_beta)
        s = s - s.max(axis=1, keepdims=True)
        return float(-(s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))).mean())

    lo, hi = (math.log(b) for b in BETA_BOUNDS)
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded")
    # Keep 1.0 unless the fit really improves the log loss (ties and flat curves stay put).
    return float(math.exp(res.x)) if res.fun < loss(0.0) - 1e-9 else 1.0


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Top-label confidence vs accuracy per equal-width bin, and the ECE they give.

    ECE = sum over bins of (windows in bin / all windows) * |accuracy - mean confidence|.
    """
    p = np.asarray(proba, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return {"ece": float("nan"), "bins": bins, "confidence": [], "accuracy": [], "count": []}
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    hit = (pred == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    hit_sum = np.bincount(which, weights=hit, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf, acc = conf_sum / count, hit_sum / count
    ece = float(np.nansum(count / len(y) * np.abs(acc - mean_conf)))
    return {
        "ece": ece,
        "bins": bins,
        "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
        "accuracy": [None if c == 0 else float(v) for c, v in zip(count, acc)],
        "count": count.tolist(),
    }


def ece(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return float(reliability(proba, y, bins)["ece"])


def calibration_metrics(proba: np.ndarray, y: np.ndarray, beta: float) -> dict[str, Any]:
    """What the report shows for one model on held-out windows: ECE and NLL before and after.

    ``proba`` is the calibrated output (what ONNX returns); "before" undoes ``beta``.
    """
    before = rescale(proba, 1.0 / beta)
    rel_after, rel_before = reliability(proba, y), reliability(before, y)
    return {
        "temperature": 1.0 / beta,
        "ece_before": rel_before["ece"],
        "ece_after": rel_after["ece"],
        "nll_before": nll(before, y),
        "nll_after": nll(proba, y),
        "reliability_before": rel_before,
        "reliability_after": rel_after,
    }
