"""Fit and evaluate the out-of-distribution flag (the score itself lives in schema/ood.py).

Per threat model, on the training split only:

- the training hosts' episodes are split (profile-stratified, seeded) into a fit part
  (``1 - holdback``) and an unseen part; the fit part sets each summary feature's median
  and MAD, the unseen part sets the threshold at the ``quantile`` of the raw score, so a
  flag means "stranger than 95 % of windows from hosts we trained on";
- evaluation, on windows the detector never saw: AUROC of the score separating held-out-host
  windows (positives) from the unseen training-host windows (negatives), with a 95 % CI
  resampling episodes on both sides; the same for the validation host; and, per model,
  accuracy on flagged vs unflagged held-out windows with CIs and the paired gap
  (unflagged - flagged) by episode bootstrap. A useful flag has AUROC well above 0.5 and
  a positive gap: the windows it flags are the ones the models get wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from schema.artifacts import OodEntry
from schema.channels import CHANNEL_NAMES, N_CHANNELS, SUMMARY_STATS
from schema.extract import view_channels
from schema.ood import (
    FLAG_AT,
    OodDetector,
    OodError,
    OodEvaluation,
    encode,
    feature_index,
    ood_file,
    ood_score,
    raw_score,
    read_detector,
    signed_log,
)

QUANTILE = 0.95
HOLDBACK = 0.2
MAD_TO_SD = 1.4826
HIST_BINS = 20
# Memory is set by these two, not by the store: the fit holds at most MAX_FIT_ROWS rows of the
# view's features (float64: 48 MB realistic, 74 MB oracle) plus one chunk being read; scoring
# reads SCORE_CHUNK full-width rows (1.5 kB each: 24 MB) at a time. Per window the detector
# keeps only index arrays and one score (int64 / float64: 8 bytes each, a few per window).
MAX_FIT_ROWS = 25_000  # medians and MADs from a seeded sample of at most this many windows
SCORE_CHUNK = 16_384  # windows read and scored at a time
MEDIAN_COLUMNS = 16  # features whose median and MAD are computed at a time (bounds the copies)


def _take(summary: Any, idx: np.ndarray) -> np.ndarray:
    """Full-width summaries of windows ``idx``: an array, a rows.Gather or Rows over every window."""
    idx = np.asarray(idx, np.int64)
    if isinstance(summary, np.ndarray) or not hasattr(summary, "take"):  # an array or a rows.Gather
        return np.asarray(summary[idx], np.float32)
    return summary.take(idx)


def _score(det: OodDetector, summary: Any, idx: np.ndarray, raw: bool = False) -> np.ndarray:
    """Scores of windows ``idx``, read SCORE_CHUNK at a time: (len(idx),) float64."""
    fn = raw_score if raw else ood_score
    out = np.zeros(len(idx))
    for i in range(0, len(idx), SCORE_CHUNK):
        out[i : i + SCORE_CHUNK] = fn(det, _take(summary, idx[i : i + SCORE_CHUNK]))
    return out


def _codes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted, int64 code of each element): one 8-byte code a window, no strings."""
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    return uniq, inv.astype(np.int64).reshape(-1)


def _holdback_episodes(episode: np.ndarray, profile: np.ndarray, share: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    uniq, first = np.unique(np.asarray(episode), return_index=True)  # one entry an episode
    prof = np.asarray(profile)[first]
    by_profile: dict[str, list[str]] = {}
    for e, p in sorted(zip((str(e) for e in uniq), (str(p) for p in prof))):
        by_profile.setdefault(p, []).append(e)
    held: set[str] = set()
    singles: list[str] = []
    for eps in by_profile.values():
        rng.shuffle(eps)
        if len(eps) > 1:
            held.update(eps[: max(1, round(len(eps) * share))])
        else:
            singles.append(eps[0])
    # Profiles with one training episode: hold back the same share of them, as a group.
    rng.shuffle(singles)
    k = round(len(singles) * share)
    if k == 0 and not held and len(singles) > 1:
        k = 1
    held.update(singles[:k])
    return held


def fit_detector(
    summary: Any,
    train: np.ndarray,
    episode: np.ndarray,
    profile: np.ndarray,
    threat: str,
    seed: int = 0,
    quantile: float = QUANTILE,
    holdback: float = HOLDBACK,
) -> tuple[OodDetector, np.ndarray]:
    """The detector for ``threat`` from full-width summaries; also the unseen training-host windows."""
    width = summary.shape[1] if hasattr(summary, "shape") else summary.row_shape[0]
    if width != N_CHANNELS * len(SUMMARY_STATS):
        raise ValueError(f"ood: expected full-width summaries, got rows of width {width}")
    channels = [CHANNEL_NAMES[i] for i in view_channels(threat)]
    train = np.asarray(train, np.int64)
    held = _holdback_episodes(episode[train], profile[train], holdback, seed)
    names, code = _codes(episode[train])
    held_codes = np.flatnonzero(np.isin(names, np.array(sorted(held), dtype=names.dtype)))
    unseen_mask = np.isin(code, held_codes)
    del code
    fit_idx, unseen = train[~unseen_mask], train[unseen_mask]
    if len(fit_idx) == 0 or len(unseen) == 0:
        raise ValueError(
            f"ood ({threat}): too few training episodes to fit and hold back ({len(train)} windows)"
        )
    rng = np.random.default_rng(seed)
    sample = (
        np.sort(rng.choice(fit_idx, MAX_FIT_ROWS, replace=False)) if len(fit_idx) > MAX_FIT_ROWS else fit_idx
    )
    cols = feature_index(channels)
    z = np.empty((len(sample), len(cols)))  # (S, F) signed-log features of the sample, S <= MAX_FIT_ROWS
    for i in range(0, len(sample), SCORE_CHUNK):
        z[i : i + SCORE_CHUNK] = signed_log(
            _take(summary, sample[i : i + SCORE_CHUNK])[:, cols].astype(np.float64)
        )
    center, mad = np.empty(len(cols)), np.empty(len(cols))
    for j in range(0, len(cols), MEDIAN_COLUMNS):
        block = z[:, j : j + MEDIAN_COLUMNS]  # (S, <=16): nanmedian copies only this block
        center[j : j + MEDIAN_COLUMNS] = np.nanmedian(block, axis=0)
        mad[j : j + MEDIAN_COLUMNS] = np.nanmedian(np.abs(block - center[j : j + MEDIAN_COLUMNS]), axis=0)
    del z
    det = OodDetector(
        threat_model=threat,
        channels=channels,
        stats=list(SUMMARY_STATS),
        center=[float(v) for v in np.nan_to_num(center)],
        scale=[float(v) for v in np.maximum(np.nan_to_num(MAD_TO_SD * mad), 0.05)],
        threshold=1.0,
        quantile=quantile,
        fitted_on=f"{len(fit_idx)} training-host windows; threshold on {len(unseen)} unseen ones",
        n_fit=int(len(fit_idx)),
    )
    raw = _score(det, summary, unseen, raw=True)
    det.threshold = max(1e-6, float(np.quantile(raw, quantile)))
    return det, unseen


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def auroc_ci(
    pos: np.ndarray, pos_groups: np.ndarray, neg: np.ndarray, neg_groups: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float, float]:
    """AUROC and its 95 % CI, resampling episodes of each side with replacement.

    A resample is the scores of the drawn episodes, each as often as it was drawn; its
    AUROC is the Mann-Whitney statistic with each window weighted by its episode's draw
    count, from per-value weight sums over the scores sorted once (no copy and no sort per
    resample: O(windows) a resample, the same resamples and statistic as concatenating).
    """
    point = _auroc(pos, neg)
    if not np.isfinite(point):
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    _, gp = _codes(pos_groups)
    _, gn = _codes(neg_groups)
    n_gp, n_gn = int(gp.max()) + 1, int(gn.max()) + 1
    _, value = _codes(np.concatenate([pos, neg]))  # rank of each score among the distinct scores
    vp, vn = value[: len(pos)], value[len(pos) :]
    n_values = int(value.max()) + 1
    boot = np.empty(n_boot)
    for b in range(n_boot):
        times_p = np.bincount(rng.integers(n_gp, size=n_gp), minlength=n_gp)  # draws of each episode
        times_n = np.bincount(rng.integers(n_gn, size=n_gn), minlength=n_gn)
        wp = np.bincount(vp, weights=times_p[gp], minlength=n_values)  # (V,) positives at each score
        wn = np.bincount(vn, weights=times_n[gn], minlength=n_values)
        below = np.cumsum(wn) - wn  # negatives strictly below each score
        boot[b] = float((wp * (below + 0.5 * wn)).sum() / (wp.sum() * wn.sum()))
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    return point, float(lo), float(hi)


def flagged_accuracy(
    hit: np.ndarray, flagged: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Accuracy on flagged vs unflagged windows, CIs and the paired gap, by episode bootstrap."""
    _, inv = _codes(groups)
    n_g = int(inv.max()) + 1 if len(inv) else 0
    sums = np.stack(
        [
            np.bincount(inv, weights=flagged.astype(float), minlength=n_g),
            np.bincount(inv, weights=(hit & flagged).astype(float), minlength=n_g),
            np.bincount(inv, weights=(~flagged).astype(float), minlength=n_g),
            np.bincount(inv, weights=(hit & ~flagged).astype(float), minlength=n_g),
        ],
        axis=1,
    )  # (G, 4): flagged n, flagged hits, unflagged n, unflagged hits

    def accs(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return s[..., 1] / s[..., 0], s[..., 3] / s[..., 2]

    out: dict[str, Any] = {
        "n_flagged": int(flagged.sum()),
        "n_unflagged": int((~flagged).sum()),
    }
    a_f, a_u = accs(sums.sum(axis=0))
    out["accuracy_flagged"], out["accuracy_unflagged"] = float(a_f), float(a_u)
    if n_g == 0:
        return out
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot).astype(float)
    bf, bu = accs(np.einsum("bg,gj->bj", w, sums))
    d = bu - bf
    ok = np.isfinite(d)

    def ci(v: np.ndarray) -> list[float | None]:
        v = v[np.isfinite(v)]
        return [float(x) for x in np.quantile(v, [0.025, 0.975])] if len(v) else [None, None]

    out["accuracy_flagged_ci"], out["accuracy_unflagged_ci"] = ci(bf), ci(bu)
    lo, hi = ci(d)
    out["gap"] = {
        "diff": float(a_u - a_f),
        "lo": lo,
        "hi": hi,
        "significant": bool(ok.any() and lo is not None and hi is not None and (lo > 0 or hi < 0)),
        "what": "accuracy(unflagged) - accuracy(flagged)",
    }
    return out


def ood_for_threat(
    summary: Any,
    idx: dict[str, np.ndarray],
    y: np.ndarray,
    test_pred: dict[str, tuple[np.ndarray, np.ndarray]],
    episode: np.ndarray,
    profile: np.ndarray,
    threat: str,
    out: Path,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit, write ``ood-<threat>.json`` into the run and return the report section.

    A training side too small to fit and hold back episodes gets no detector (its
    predictions carry no ``ood``) and a ``skipped`` reason in the report, not a failed run.
    """
    try:
        det, unseen = fit_detector(summary, idx["train"], episode, profile, threat, seed=seed)
    except ValueError as e:
        return {"skipped": str(e)}
    te, va = idx["test"], idx["val"]
    s_unseen, s_test, s_val = (_score(det, summary, i) for i in (unseen, te, va))
    auc, lo, hi = auroc_ci(s_test, episode[te], s_unseen, episode[unseen], n_boot, seed)
    auc_v, lo_v, hi_v = auroc_ci(s_val, episode[va], s_unseen, episode[unseen], n_boot, seed)
    flagged = s_test >= FLAG_AT
    det.evaluation = OodEvaluation(
        auroc=auc,
        auroc_ci=[lo, hi],
        flagged_share_heldout=float(flagged.mean()),
        flagged_share_training_hosts=float((s_unseen >= FLAG_AT).mean()),
    )
    path = Path(out) / ood_file(threat)
    path.write_bytes(encode(det))
    per_model: dict[str, Any] = {}
    te_order = np.argsort(te, kind="stable")  # where each window index sits in te, by binary search
    te_sorted = te[te_order]
    for key, (gidx, pred) in test_pred.items():
        if not key.endswith(f"-{threat}") or key.split("-")[0] in ("majority", "logreg"):
            continue
        gidx = np.asarray(gidx, np.int64)
        at = np.minimum(np.searchsorted(te_sorted, gidx), max(len(te) - 1, 0))
        keep = te_sorted[at] == gidx if len(te) else np.zeros(len(gidx), bool)
        rows = te_order[at[keep]]
        hit = np.asarray(pred)[keep] == y[te[rows]]
        per_model[key] = flagged_accuracy(hit, flagged[rows], episode[te[rows]], n_boot, seed)
    return {
        "file": path.name,
        "threshold": det.threshold,
        "quantile": det.quantile,
        "fitted_on": det.fitted_on,
        "auroc_heldout_vs_training_hosts": {"point": auc, "lo": lo, "hi": hi, "n_pos": int(len(te))},
        "auroc_validation_host_vs_training_hosts": {"point": auc_v, "lo": lo_v, "hi": hi_v},
        "n_training_host_windows_unseen": int(len(unseen)),
        "flagged_share_heldout": float(flagged.mean()),
        "flagged_share_validation_host": float((s_val >= FLAG_AT).mean()),
        "flagged_share_training_hosts": float((s_unseen >= FLAG_AT).mean()),
        "accuracy_flagged_vs_unflagged": per_model,
        # ood score histograms (20 equal bins over 0-1) for the report's figure
        "histogram": {
            "edges": np.linspace(0, 1, HIST_BINS + 1).tolist(),
            "training_hosts_unseen": np.histogram(s_unseen, HIST_BINS, (0, 1))[0].tolist(),
            "validation_host": np.histogram(s_val, HIST_BINS, (0, 1))[0].tolist(),
            "heldout_hosts": np.histogram(s_test, HIST_BINS, (0, 1))[0].tolist(),
        },
    }


def ship_detectors(run: Path, dest: Path, threats: list[str]) -> list[OodEntry]:
    """Copy each threat model's checked detector from the run into a models directory being built.

    A run from before the OOD flag has no ``ood-<threat>.json``: its predictions carry no
    ``ood`` and nothing fails. A detector that does not decode stops the export (the
    message names the file), as a bad checkpoint does.
    """
    out: list[OodEntry] = []
    for threat in threats:
        src = Path(run) / ood_file(threat)
        if not src.exists():
            continue
        det = read_detector(src)
        if det.threat_model != threat:
            raise OodError(f"{src}: threat_model {det.threat_model!r}, expected {threat!r}")
        (Path(dest) / src.name).write_bytes(encode(det))
        out.append(
            OodEntry(file=src.name, threat_model=threat, threshold=det.threshold, evaluation=det.evaluation)
        )
    return out
