"""Metrics: macro F1, confusion over the union of labels, episode bootstrap, paired gaps, baselines."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from trainer import evaluate as ev


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 5, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
        assert ev.macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    # a label only ever predicted (never true) still counts, as in sklearn
    assert ev.macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx(f1_score([0, 0, 1], [0, 2, 1], average="macro"))


def test_confusion_is_over_the_union_of_labels_seen() -> None:
    labels, cm = ev.confusion(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 3]))
    assert labels.tolist() == [0, 1, 3]
    assert cm.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert cm.sum() == 4


def test_per_class_f1_names_phases_and_leaves_absent_ones_empty() -> None:
    f1 = ev.per_class_f1(np.array([0, 0, 2]), np.array([0, 0, 2]))
    assert f1["clean"] == 1.0 and f1["infecting"] == 1.0
    assert f1["armed"] is None and f1["dormant"] is None


def episodes(n_eps: int, per_ep: int, correlated: bool, acc: float, seed: int) -> tuple[np.ndarray, ...]:
    """Windows of n_eps episodes; correlated: an episode is right or wrong as a whole."""
    rng = np.random.default_rng(seed)
    ep = np.repeat(np.arange(n_eps), per_ep)
    y = rng.integers(0, 5, len(ep))
    right = (rng.random(n_eps) < acc)[ep] if correlated else rng.random(len(ep)) < acc
    pred = np.where(right, y, (y + 1) % 5)
    return y, pred, ep


def test_bootstrap_ci_contains_the_point_and_resamples_episodes() -> None:
    y, p, ep = episodes(40, 25, correlated=False, acc=0.7, seed=1)
    ci = ev.bootstrap_ci(y, p, ep, n_boot=500, seed=0)
    assert ci.lo <= ci.point <= ci.hi and ci.n_groups == 40
    # Same windows, but errors shared within an episode: far fewer independent draws.
    yc, pc, epc = episodes(40, 25, correlated=True, acc=0.7, seed=1)
    cic = ev.bootstrap_ci(yc, pc, epc, n_boot=500, seed=0)
    assert cic.lo <= cic.point <= cic.hi
    assert (cic.hi - cic.lo) > 2.5 * (ci.hi - ci.lo)
    # Had it resampled windows, one single episode would still get a wide CI; it gets none.
    one = ev.bootstrap_ci(y, p, np.zeros_like(ep), n_boot=200, seed=0)
    assert one.lo == pytest.approx(one.point) and one.hi == pytest.approx(one.point)


def test_bootstrap_is_seeded() -> None:
    y, p, ep = episodes(30, 10, correlated=True, acc=0.6, seed=2)
    assert ev.bootstrap_ci(y, p, ep, n_boot=300, seed=5) == ev.bootstrap_ci(y, p, ep, n_boot=300, seed=5)


def test_paired_bootstrap_flags_a_real_gap_and_not_a_null_one() -> None:
    rng = np.random.default_rng(3)
    y, good, ep = episodes(60, 20, correlated=False, acc=0.9, seed=3)
    bad = np.where(rng.random(len(y)) < 0.6, y, (y + 2) % 5)
    gap = ev.paired_bootstrap(y, good, bad, ep, n_boot=500, seed=0)
    assert gap.significant and gap.diff > 0.2 and gap.lo > 0 and gap.p_value < 0.01
    # Another model as good as `good`, with its errors elsewhere: no significant gap.
    also_good = np.where(rng.random(len(y)) < 0.9, y, (y + 3) % 5)
    null = ev.paired_bootstrap(y, good, also_good, ep, n_boot=500, seed=0)
    assert not null.significant and null.lo < 0 < null.hi and null.p_value > 0.05
    same = ev.paired_bootstrap(y, good, good, ep, n_boot=200, seed=0)
    assert same.diff == 0 and not same.significant


def test_breakdown_per_key() -> None:
    y = np.array([0, 1, 0, 1, 2, 2])
    p = np.array([0, 1, 0, 0, 2, 2])
    out = ev.breakdown(y, p, np.array(["a", "a", "b", "b", "c", "c"]), groups=np.array([1, 1, 2, 3, 4, 4]))
    assert out["a"]["macro_f1"] == 1.0 and out["c"]["accuracy"] == 1.0
    assert out["b"]["accuracy"] == 0.5 and out["b"]["n_episodes"] == 2 and out["b"]["n_windows"] == 2


def test_baselines() -> None:
    rng = np.random.default_rng(4)
    y_tr = rng.integers(0, 3, 300)
    y_tr[:150] = 1  # class 1 is the majority
    x_tr = rng.normal(size=(300, 8)).astype(np.float32)
    x_tr[np.arange(300), y_tr] += 1e4  # raw units; the baseline must log-scale them itself
    maj = ev.majority_baseline(y_tr, 10)
    assert maj.shape == (10, 5) and (maj.argmax(axis=1) == 1).all()
    y_te = rng.integers(0, 3, 100)
    x_te = rng.normal(size=(100, 8)).astype(np.float32)
    x_te[np.arange(100), y_te] += 1e4
    proba = ev.logistic_baseline(x_tr, y_tr, x_te)
    assert proba.shape == (100, 5) and (proba[:, 3:] == 0).all()
    assert (
        ev.macro_f1(y_te, proba.argmax(axis=1))
        > 0.95
        > ev.macro_f1(y_te, ev.majority_baseline(y_tr, 100).argmax(axis=1))
    )


def test_evaluate_predictions_report_shape() -> None:
    y, p, ep = episodes(10, 8, correlated=False, acc=0.8, seed=5)
    proba = np.eye(5, dtype=np.float32)[p]
    host = np.where(ep < 5, "h1", "h2")
    prof = np.where(ep % 2 == 0, "cpu-saturate", "none")
    m = ev.evaluate_predictions(y, proba, ep, host, prof, n_boot=100)
    assert m["n_windows"] == 80 and m["n_episodes"] == 10
    assert set(m["per_host"]) == {"h1", "h2"} and set(m["per_profile"]) == {"cpu-saturate", "none"}
    assert m["macro_f1"]["lo"] <= m["macro_f1"]["point"] <= m["macro_f1"]["hi"]
    assert np.asarray(m["confusion"]["matrix"]).sum() == 80
