"""Memory set by settings, not by the number of windows: the OOD detector (MAX_FIT_ROWS,
SCORE_CHUNK) and the models' chunked prediction over Rows (a quarter of --memory-budget).

The detector reads full-width summaries (1.5 kB a window) through a Rows that counts its
reads; fitted on 4x the windows it must read the same sample, never more than a chunk at a
time, and its peak traced memory may grow only by index arrays (a few 8-byte values a
window), never by anything summary-sized.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schema.channels import N_SUMMARY
from trainer import ood
from trainer.rows import Gather

WINDOWS_PER_EPISODE = 20
PROFILES = ("clean_only", "miner", "ransom", "rat", "worm")
INDEX_BYTES_PER_WINDOW = 160  # codes, masks, index and score arrays; a summary row is 1,472 bytes


class CountingRows:
    """Full-width summaries made up from their position on demand (nothing held): counts reads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.row_shape = (N_SUMMARY,)
        self.groups = np.arange(n) // WINDOWS_PER_EPISODE
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def take(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        self.reads.append(len(pos))
        ep = (pos // WINDOWS_PER_EPISODE)[:, None]
        cols = np.arange(N_SUMMARY)[None, :]
        return (50.0 * np.sin(0.37 * ep + 0.11 * cols) + 0.01 * (pos[:, None] % 97) + cols).astype(np.float32)


def corpus(n: int) -> tuple[CountingRows, dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """n windows in episodes of 20 on 5 hosts: the last host is test, the one before it validation."""
    n_ep = n // WINDOWS_PER_EPISODE
    names = np.empty(n_ep, dtype=object)
    names[:] = [sys.intern(f"2026-11-30-host{e % 5}-{e:07d}") for e in range(n_ep)]  # as the store holds them
    prof = np.empty(n_ep, dtype=object)
    prof[:] = [PROFILES[(e // 5) % len(PROFILES)] for e in range(n_ep)]
    episode, profile = np.repeat(names, WINDOWS_PER_EPISODE), np.repeat(prof, WINDOWS_PER_EPISODE)
    host = np.repeat(np.arange(n_ep) % 5, WINDOWS_PER_EPISODE)
    idx = {
        "train": np.flatnonzero(host < 3),
        "val": np.flatnonzero(host == 3),
        "test": np.flatnonzero(host == 4),
    }
    y = np.arange(n) % 4
    return CountingRows(n), idx, episode, profile, y


def traced_peak(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Peak traced bytes above the start while ``fn(*args, **kwargs)`` runs, and its result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def warm_up() -> None:
    """One small fit first, so one-off allocations (numpy's caches) fall outside the compared peaks."""
    rows, idx, episode, profile, _ = corpus(2_000)
    ood.fit_detector(Gather(rows), idx["train"], episode, profile, "realistic", seed=0)


@pytest.fixture
def small_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ood, "MAX_FIT_ROWS", 3_000)
    monkeypatch.setattr(ood, "SCORE_CHUNK", 1_024)


def test_fit_reads_a_bounded_sample_in_chunks_and_its_memory_grows_only_by_index_arrays(
    small_settings: None,
) -> None:
    peaks, dets = {}, {}
    warm_up()
    for n in (20_000, 80_000):
        rows, idx, episode, profile, _ = corpus(n)
        peak, (det, unseen) = traced_peak(
            ood.fit_detector, Gather(rows), idx["train"], episode, profile, "realistic", seed=0
        )
        assert max(rows.reads) <= ood.SCORE_CHUNK  # never the whole split at once
        # what it read: the fit sample (at most MAX_FIT_ROWS) once, then the unseen windows once
        assert sum(rows.reads) == min(det.n_fit, ood.MAX_FIT_ROWS) + len(unseen)
        assert det.n_fit > ood.MAX_FIT_ROWS and 0 < len(unseen) < len(idx["train"])
        assert set(episode[unseen]).isdisjoint(episode[np.setdiff1d(idx["train"], unseen)])
        peaks[n], dets[n] = peak, det
    grown = peaks[80_000] - peaks[20_000]
    assert grown <= INDEX_BYTES_PER_WINDOW * 60_000, (peaks, grown / 60_000)
    # the sample really is bounded: 4x the windows, a peak far below one summary row a window
    assert peaks[80_000] < 80_000 * N_SUMMARY * 4 / 4, peaks
    assert np.isfinite(dets[80_000].center).all() and dets[80_000].threshold > 0


def test_the_whole_ood_section_is_bounded_too(small_settings: None, tmp_path: Path) -> None:
    """Scoring, AUROC with episode bootstrap and flagged accuracy: index-sized per window."""
    peaks, reports = {}, {}
    warm_up()
    for n in (20_000, 80_000):
        rows, idx, episode, profile, y = corpus(n)
        rng = np.random.default_rng(0)
        te = idx["test"]
        test_pred = {"gbt-realistic": (te[rng.permutation(len(te))], rng.integers(0, 4, len(te)))}
        out = tmp_path / str(n)
        out.mkdir()
        peak, rep = traced_peak(
            ood.ood_for_threat, Gather(rows), idx, y, test_pred, episode, profile, "realistic", out, n_boot=20
        )
        assert max(rows.reads) <= ood.SCORE_CHUNK
        peaks[n], reports[n] = peak, rep
    grown = peaks[80_000] - peaks[20_000]
    assert grown <= 2 * INDEX_BYTES_PER_WINDOW * 60_000, (peaks, grown / 60_000)
    for n, rep in reports.items():
        f = rep["accuracy_flagged_vs_unflagged"]["gbt-realistic"]
        assert f["n_flagged"] + f["n_unflagged"] == n // 5  # every test window matched to its prediction
        a = rep["auroc_heldout_vs_training_hosts"]
        assert 0 <= a["lo"] <= a["point"] <= a["hi"] <= 1


def test_auroc_bootstrap_by_weights_equals_resampling_by_concatenation() -> None:
    """The weighted statistic is the AUROC of the concatenated resample, draw for draw."""
    rng = np.random.default_rng(4)
    pos = np.round(rng.normal(0.6, 1, 700), 1)  # rounded: many ties, within and across sides
    neg = np.round(rng.normal(0.0, 1, 900), 1)
    pos_g = np.array([f"p{i}" for i in rng.integers(0, 23, len(pos))], dtype=object)
    neg_g = np.array([f"n{i}" for i in rng.integers(0, 31, len(neg))], dtype=object)

    def by_concatenation(n_boot: int, seed: int) -> tuple[float, float, float]:
        r = np.random.default_rng(seed)
        gp = [pos[pos_g == g] for g in np.unique(pos_g)]
        gn = [neg[neg_g == g] for g in np.unique(neg_g)]
        boot = []
        for _ in range(n_boot):
            p = np.concatenate([gp[i] for i in r.integers(len(gp), size=len(gp))])
            n = np.concatenate([gn[i] for i in r.integers(len(gn), size=len(gn))])
            boot.append(ood._auroc(p, n))
        lo, hi = np.nanquantile(boot, [0.025, 0.975])
        return ood._auroc(pos, neg), float(lo), float(hi)

    got = ood.auroc_ci(pos, pos_g, neg, neg_g, 300, seed=9)
    assert got == pytest.approx(by_concatenation(300, 9), abs=1e-12)
    assert 0.5 < got[1] < got[0] < got[2] < 1


def test_predict_rows_reads_a_quarter_of_the_memory_budget_at_a_time() -> None:
    """Calibration predicts the whole validation split through predict_rows: in budget-sized
    chunks (at 4,800 episodes one 65,536-row chunk was the whole 890 MB oracle split)."""
    from trainer.models import build_model
    from trainer.rows import chunk_rows

    rows = CountingRows(6_000)
    model = build_model("mlp", rows.row_shape, n_classes=5, profile="demo", seed=0, memory_mb=2.0)
    p = model.predict_rows(rows)
    assert p.shape == (6_000, 5) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    chunk = chunk_rows(rows, 2.0 * 2**20 / 4)
    assert chunk < 6_000 and max(rows.reads) <= chunk and sum(rows.reads) == 6_000


def test_logistic_baseline_predicts_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its pipeline copies the chunk several times (signed log, scaling): a few thousand rows
    at a time, with the same probabilities as one call."""
    from trainer import evaluate as ev

    rng = np.random.default_rng(0)
    clf = ev.fit_logistic(rng.lognormal(2, 1, (2_000, N_SUMMARY)), rng.integers(0, 5, 2_000))
    x = rng.lognormal(2, 1, (16_384, N_SUMMARY)).astype(np.float32)  # 24 MB
    monkeypatch.setattr(ev, "LOGISTIC_ROWS", len(x))
    whole_peak, whole = traced_peak(ev.logistic_proba, clf, x)
    monkeypatch.setattr(ev, "LOGISTIC_ROWS", 1_024)
    piece_peak, pieces = traced_peak(ev.logistic_proba, clf, x)
    assert np.array_equal(whole, pieces)
    assert piece_peak < whole_peak / 4 and piece_peak < 8 * 2**20, (whole_peak, piece_peak)
