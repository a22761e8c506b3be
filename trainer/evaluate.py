"""Metrics that respect episodes: macro F1, bootstrap CIs over episodes, paired gaps, baselines.

Windows of one episode overlap by half and share a host, a sample and a VM, so they are
not independent draws: every confidence interval here resamples whole episodes. All
bootstraps work on per-episode confusion matrices, so one resample is one matrix
product, not a pass over the windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from schema.vocab import PHASES


def labels_seen(*arrays: np.ndarray) -> np.ndarray:
    """Sorted union of the labels in any of the arrays."""
    return np.unique(np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]))


def confusion(
    y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, matrix) with rows = true, columns = predicted, over the union of labels seen."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    labels = labels_seen(y_true, y_pred) if labels is None else np.asarray(labels, np.int64)
    k = len(labels)
    ti, pi = np.searchsorted(labels, y_true), np.searchsorted(labels, y_pred)
    if len(y_true) and (
        ti.max() >= k or pi.max() >= k or (labels[ti] != y_true).any() or (labels[pi] != y_pred).any()
    ):
        raise KeyError("a label outside `labels`")
    cm = np.bincount(ti * k + pi, minlength=k * k).reshape(k, k)
    return labels, cm


def f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 from (..., K, K) confusion matrices.

    A class with no true and no predicted windows is NaN."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    denom = cm.sum(axis=-1) + cm.sum(axis=-2)  # 2*tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def macro_f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    f1 = f1_from_confusion(cm)
    present = ~np.isnan(f1)
    return np.where(
        present.any(axis=-1), np.nansum(f1, axis=-1) / np.maximum(present.sum(axis=-1), 1), np.nan
    )


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the union of labels in y_true and y_pred (sklearn's convention)."""
    if len(y_true) == 0:
        return float("nan")
    _, cm = confusion(y_true, y_pred)
    return float(macro_f1_from_confusion(cm))


def per_class_f1(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(PHASES)
) -> dict[str, float | None]:
    """F1 per phase name; None for a phase that is neither true nor predicted anywhere."""
    _, cm = confusion(y_true, y_pred, labels=np.arange(n_classes))
    names = PHASES if n_classes == len(PHASES) else tuple(str(i) for i in range(n_classes))
    return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, f1_from_confusion(cm))}


def _group_confusions(
    y_true: np.ndarray, preds: list[np.ndarray], groups: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-group confusion matrices (G, K, K) for each prediction array."""
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(g.max()) + 1 if len(g) else 0
    k = len(labels)
    pos = np.full(int(labels.max()) + 1, -1, np.int64)
    pos[labels] = np.arange(k)
    ti = pos[np.asarray(y_true, np.int64)]
    out = []
    for p in preds:
        flat = g * k * k + ti * k + pos[np.asarray(p, np.int64)]
        out.append(np.bincount(flat, minlength=n_groups * k * k).reshape(n_groups, k, k))
    return np.arange(n_groups), out


BOOT_CHUNK_CELLS = 4_000_000  # resamples x episodes drawn at once: 32 MB of counts, whatever n_boot


def _resampled(cms: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """For each (G, K, K) stack, the (n_boot, K, K) confusion of every episode resample.

    The (n_boot, G) draw counts come in chunks of resamples from one generator, so the
    numbers are those of one big draw and the memory is bounded by BOOT_CHUNK_CELLS."""
    n_groups = cms[0].shape[0]
    rng = np.random.default_rng(seed)
    p = np.full(n_groups, 1.0 / n_groups)
    step = max(1, BOOT_CHUNK_CELLS // max(1, n_groups))
    out: list[list[np.ndarray]] = [[] for _ in cms]
    for lo in range(0, n_boot, step):
        w = rng.multinomial(n_groups, p, size=min(step, n_boot - lo))
        for acc, cm in zip(out, cms):
            acc.append(np.einsum("bg,gij->bij", w, cm))
    return [np.concatenate(a) if a else np.zeros((0, *c.shape[1:]), np.int64) for a, c in zip(out, cms)]


@dataclass(frozen=True)
class CI:
    point: float
    lo: float
    hi: float
    n_groups: int
    n_boot: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> CI:
    """Macro F1 and its percentile CI, resampling groups (episodes) with replacement."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError("y_true, y_pred and groups must have one entry per window")
    point = macro_f1(y_true, y_pred)
    if len(y_true) == 0:
        return CI(point, float("nan"), float("nan"), 0, n_boot)
    labels = labels_seen(y_true, y_pred)
    gids, (cms,) = _group_confusions(y_true, [y_pred], groups, labels)
    (boot_cm,) = _resampled([cms], n_boot, seed)
    boot = macro_f1_from_confusion(boot_cm)
    lo, hi = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    return CI(point, float(lo), float(hi), len(gids), n_boot)


@dataclass(frozen=True)
class PairedGap:
    """F1(a) - F1(b) on the same windows, with its CI over episode resamples."""

    diff: float
    lo: float
    hi: float
    p_value: float  # two-sided share of resamples on the other side of zero
    significant: bool  # the CI excludes zero

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedGap:
    """Is model a's macro F1 really different from b's? Both are scored on each same resample."""
    y_true = np.asarray(y_true)
    if not (len(y_true) == len(pred_a) == len(pred_b) == len(groups)):
        raise ValueError("y_true, pred_a, pred_b and groups must have one entry per window")
    diff = macro_f1(y_true, pred_a) - macro_f1(y_true, pred_b)
    if len(y_true) == 0:
        return PairedGap(float("nan"), float("nan"), float("nan"), float("nan"), False)
    labels = labels_seen(y_true, pred_a, pred_b)
    _, (cm_a, cm_b) = _group_confusions(y_true, [pred_a, pred_b], groups, labels)
    boot_a, boot_b = _resampled([cm_a, cm_b], n_boot, seed)
    # Each model's F1 over the labels its own predictions and the truth hold (as macro_f1 does).
    d = macro_f1_from_confusion(boot_a) - macro_f1_from_confusion(boot_b)
    d = d[~np.isnan(d)]
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = 2 * min(float((d <= 0).mean()), float((d >= 0).mean()))
    return PairedGap(float(diff), float(lo), float(hi), min(1.0, p), bool(lo > 0 or hi < 0))


def breakdown(
    y_true: np.ndarray, y_pred: np.ndarray, keys: np.ndarray, groups: np.ndarray | None = None
) -> dict[str, dict[str, Any]]:
    """Macro F1 and accuracy per key value (a profile, a host)."""
    keys = np.asarray(keys).astype(str)
    out: dict[str, dict[str, Any]] = {}
    for key in np.unique(keys):
        m = keys == key
        row: dict[str, Any] = {
            "n_windows": int(m.sum()),
            "macro_f1": macro_f1(y_true[m], y_pred[m]),
            "accuracy": float((y_true[m] == y_pred[m]).mean()),
        }
        if groups is not None:
            row["n_episodes"] = int(len(np.unique(np.asarray(groups)[m])))
        out[str(key)] = row
    return out


def evaluate_predictions(
    y_true: np.ndarray,
    proba: np.ndarray,
    episode: np.ndarray,
    host: np.ndarray,
    profile: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report shows for one model on one held-out set."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(proba).argmax(axis=1)
    labels, cm = confusion(y_true, y_pred)
    return {
        "n_windows": int(len(y_true)),
        "n_episodes": int(len(np.unique(episode))),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": bootstrap_ci(y_true, y_pred, episode, n_boot=n_boot, seed=seed).as_dict(),
        "per_class_f1": per_class_f1(y_true, y_pred, proba.shape[1]),
        "per_profile": breakdown(y_true, y_pred, profile, episode),
        "per_host": breakdown(y_true, y_pred, host, episode),
        "confusion": {
            "labels": [PHASES[i] if i < len(PHASES) else str(i) for i in labels],
            "matrix": cm.tolist(),
        },
    }


# --- baselines: what the models must clearly beat -------------------------------------


def majority_baseline(y_train: np.ndarray, n: int, n_classes: int = len(PHASES)) -> np.ndarray:
    """Probabilities that always name the most common training class."""
    proba = np.zeros((n, n_classes), np.float32)
    proba[:, int(np.bincount(y_train, minlength=n_classes).argmax())] = 1.0
    return proba


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0):
    """Class-balanced logistic regression on signed-log, standardised summary features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    clf = make_pipeline(
        FunctionTransformer(_signed_log),
        StandardScaler(),
        LogisticRegression(max_iter=500, class_weight="balanced", random_state=seed),
    )
    return clf.fit(x_train, y_train)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


LOGISTIC_ROWS = 8192  # rows per predict_proba call: the pipeline's signed-log and scaling copy each


def logistic_proba(clf, x: np.ndarray, n_classes: int = len(PHASES)) -> np.ndarray:
    """(N, n_classes) probabilities of a fitted ``fit_logistic``; classes it never saw get 0.

    Row by row independent, so predicted LOGISTIC_ROWS at a time: on a 96 MB chunk of
    oracle summaries the pipeline's temporaries were ~0.3 GB more at once."""
    proba = np.zeros((len(x), n_classes), np.float32)
    for lo in range(0, len(x), LOGISTIC_ROWS):
        proba[lo : lo + LOGISTIC_ROWS, clf.classes_] = clf.predict_proba(x[lo : lo + LOGISTIC_ROWS])
    return proba


def logistic_baseline(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int = len(PHASES), seed: int = 0
) -> np.ndarray:
    """Class-balanced logistic regression on signed-log, standardised summary features."""
    return logistic_proba(fit_logistic(x_train, y_train, seed=seed), x_test, n_classes)
