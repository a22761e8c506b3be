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


def _group_bins(proba: np.ndarray, y: np.ndarray, gidx: np.ndarray, n_groups: int, bins: int) -> np.ndarray:
    """(G, bins, 3): per episode and bin, windows, summed confidence, summed hits."""
    p = np.asarray(proba, np.float64)
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    cell = gidx * bins + np.minimum((conf * bins).astype(int), bins - 1)
    out = np.zeros((n_groups * bins, 3))
    for j, w in enumerate((np.ones_like(conf), conf, hit)):
        out[:, j] = np.bincount(cell, weights=w, minlength=n_groups * bins)
    return out.reshape(n_groups, bins, 3)


def _ece_of(sums: np.ndarray) -> np.ndarray:
    """ECE from (..., bins, 3) bin sums."""
    n, conf, hit = sums[..., 0], sums[..., 1], sums[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(n > 0, np.abs(hit - conf) / np.where(n > 0, n, 1), 0.0)
    return (n * gap).sum(axis=-1) / np.maximum(n.sum(axis=-1), 1)


def ece_bootstrap(
    before: np.ndarray,
    after: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    bins: int = ECE_BINS,
) -> dict[str, Any]:
    """ECE before/after with 95% CIs resampling episodes, and the paired gap after - before."""
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        nan = float("nan")
        return {"before_ci": [nan, nan], "after_ci": [nan, nan], "gap": {"diff": nan, "lo": nan, "hi": nan}}
    gids, gidx = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    sb = _group_bins(before, y, gidx, len(gids), bins)
    sa = _group_bins(after, y, gidx, len(gids), bins)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(gids), np.full(len(gids), 1.0 / len(gids)), size=n_boot).astype(np.float64)
    eb = _ece_of(np.einsum("bg,gkj->bkj", w, sb))
    ea = _ece_of(np.einsum("bg,gkj->bkj", w, sa))
    d = ea - eb
    lo, hi = np.quantile(d, [0.025, 0.975])
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {
        "before_ci": [float(v) for v in np.quantile(eb, [0.025, 0.975])],
        "after_ci": [float(v) for v in np.quantile(ea, [0.025, 0.975])],
        "gap": {
            "diff": float(_ece_of(sa.sum(axis=0)) - _ece_of(sb.sum(axis=0))),
            "lo": float(lo),
            "hi": float(hi),
            "p_value": p,
            "significant": bool(lo > 0 or hi < 0),
        },
        "n_groups": int(len(gids)),
        "n_boot": int(n_boot),
    }


def calibration_metrics(
    proba: np.ndarray,
    y: np.ndarray,
    beta: float,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """What the report shows for one model on held-out windows: ECE and NLL before and after.

    ``proba`` is the calibrated output (what ONNX returns); "before" undoes ``beta``. With
    ``groups`` (episodes), CIs and the paired after-minus-before gap by episode bootstrap.
    """
    before = rescale(proba, 1.0 / beta)
    rel_after, rel_before = reliability(proba, y), reliability(before, y)
    out: dict[str, Any] = {
        "temperature": 1.0 / beta,
        "ece_before": rel_before["ece"],
        "ece_after": rel_after["ece"],
        "nll_before": nll(before, y),
        "nll_after": nll(proba, y),
        "reliability_before": rel_before,
        "reliability_after": rel_after,
    }
    if groups is not None:
        out["bootstrap"] = ece_bootstrap(before, proba, y, groups, n_boot=n_boot, seed=seed)
    return out
