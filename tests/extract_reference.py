"""The extractor as it was before issue 13 (extractor v1), kept verbatim as the reference.

``schema.extract`` was rewritten for speed (fewer numpy calls per window) with the promise
that its output did not change by one bit; tests/test_extract_parity.py holds it to that
against this straightforward version, and benchmarks/bench_extract.py times the two side by
side. Only the ``Window`` wrapper is gone: ``extract_window`` returns (tensor, coverage).
Do not "improve" this file: its worth is that it is the old code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from schema.channels import (
    CHANNELS,
    HOLD_NS,
    LOOKBACK_NS,
    MIN_COVERAGE,
    N_CHANNELS,
    SOURCE_SLICE,
    STEP_NS,
    STRIDE_STEPS,
    SUMMARY_STATS,
    WINDOW_STEPS,
)
from schema.vocab import SOURCES


class Columns(Protocol):
    t_wall_ns: np.ndarray
    values: np.ndarray


_SOURCE_POS = {s: i for i, s in enumerate(SOURCES)}


def _columns_of(source: str, kind: str) -> np.ndarray:
    return np.array(
        [j for j, c in enumerate(CHANNELS[SOURCE_SLICE[source]]) if c.transform == kind], dtype=np.intp
    )


def _index(cols: np.ndarray) -> slice | np.ndarray:
    """A slice where the columns are contiguous (a view, not a gather), else the indices."""
    if cols.size and int(cols[-1]) - int(cols[0]) + 1 == cols.size:
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


@dataclass(frozen=True)
class _Plan:
    """Per source, precomputed once: how row fields become channels (``Transform``)."""

    n_ch: int
    scale: np.ndarray  # (n_ch,) 1 for identity (and rates, overwritten), 1/1024 for kb -> MB
    rate: slice | np.ndarray | None  # counters -> per-second rates
    interval: slice | np.ndarray | None  # netflow: counts per interval_ms -> per second
    hold_ns: int


def _plan(source: str) -> _Plan:
    n_ch = SOURCE_SLICE[source].stop - SOURCE_SLICE[source].start
    scale = np.ones(n_ch)
    # x * 2**-10 and x / 1024 are the same real number, so the same correctly rounded double.
    scale[_columns_of(source, "kb_to_mb")] = 1.0 / 1024.0
    rate, interval = _columns_of(source, "rate"), _columns_of(source, "interval_rate")
    return _Plan(
        n_ch,
        scale,
        _index(rate) if rate.size else None,
        _index(interval) if interval.size else None,
        HOLD_NS[source],
    )


_PLANS = {s: _plan(s) for s in SOURCES}
_STEP_OFFSETS = np.arange(WINDOW_STEPS, dtype=np.int64) * STEP_NS
_INT64_MIN = np.iinfo(np.int64).min


def _transform(source: str, t: np.ndarray, v: np.ndarray, increasing: bool = False) -> np.ndarray:
    """Row fields (n, fields) -> channel values (n, channels) for one source, float64.

    Rates are between rows adjacent in arrival order (a counter that went down restarted
    from zero: its delta is its new value); a pair that does not move forward has none."""
    p = _PLANS[source]
    out = v[:, : p.n_ch] * p.scale
    if p.rate is not None:
        out[0, p.rate] = np.nan  # no previous row in the span
        if len(t) > 1:
            dt_s = (t[1:] - t[:-1]).astype(np.float64) / 1e9
            if not increasing:
                dt_s[dt_s <= 0] = np.nan
            cum = v[:, p.rate]
            delta = cum[1:] - cum[:-1]
            np.copyto(delta, cum[1:], where=delta < 0)  # the counter restarted from zero
            out[1:, p.rate] = delta / dt_s[:, None]
    if p.interval is not None:
        interval_s = v[:, p.n_ch] / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, p.interval] = np.where(
                (interval_s > 0)[:, None], v[:, p.interval] / interval_s[:, None], np.nan
            )
    return out


def _fill_holes(block: np.ndarray) -> np.ndarray:
    """Hold the previous finite value along time, then back-fill the leading gap. (T, C)."""
    n = block.shape[0]
    t_idx = np.arange(n)[:, None]
    ok = np.isfinite(block)
    prev = np.where(ok, t_idx, -1)
    np.maximum.accumulate(prev, axis=0, out=prev)
    nxt = np.where(ok, t_idx, n)
    nxt = np.minimum.accumulate(nxt[::-1], axis=0)[::-1]
    src = np.where(prev >= 0, prev, nxt)
    np.minimum(src, n - 1, out=src)
    return np.take_along_axis(block, src, axis=0)


def _rows_in(cols: Columns, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The rows with ``lo <= t_wall_ns <= hi``, in arrival order (views when contiguous), and
    whether their clock strictly increases (then no row is dropped after a step back)."""
    t_all = cols.t_wall_ns
    n = len(t_all)
    # The daemon hands over exactly a window's rows (ColumnBuilder.window), the trainer a
    # window's slice of a sorted stream (extract_streams): both are whole and, nearly
    # always, increasing, which two scalar reads and one comparison confirm.
    whole = bool(n) and int(t_all[0]) >= lo and int(t_all[n - 1]) <= hi
    if whole and (n == 1 or bool((t_all[1:] > t_all[:-1]).all())):
        return t_all, cols.values, True
    sel = np.flatnonzero((t_all >= lo) & (t_all <= hi))
    if sel.size == 0:
        return None
    a, b = int(sel[0]), int(sel[-1]) + 1
    t, v = (t_all[a:b], cols.values[a:b]) if b - a == sel.size else (t_all[sel], cols.values[sel])
    return t, v, len(t) == 1 or bool((t[1:] > t[:-1]).all())


# --- the window ----------------------------------------------------------------------------
_N_SRC = len(SOURCES)
_CH_SRC = np.array([_SOURCE_POS[c.source] for c in CHANNELS], np.intp)  # (46,) source of a channel
_SRC_STARTS = np.array([SOURCE_SLICE[s].start for s in SOURCES], np.intp)


def _held(source: str, cols: Columns, lo: int, steps: np.ndarray) -> np.ndarray | None:
    """One source's channels sampled and held onto the grid, (100, C) float64 (NaN where no
    row is fresh enough); None when no row falls in the span."""
    rows = _rows_in(cols, lo, int(steps[-1]))
    if rows is None:
        return None
    t, v, increasing = rows
    ch = _transform(source, t, v, increasing)
    # Rows that do not move forward in time came after a clock step back: drop them.
    if not increasing:
        prev_max = np.maximum.accumulate(np.concatenate(([_INT64_MIN], t[:-1])))
        keep = t > prev_max
        t, ch = t[keep], ch[keep]
    # Sample and hold: each step takes the latest row at or before it, if fresh enough.
    idx = np.searchsorted(t, steps, side="right") - 1
    at = np.maximum(idx, 0)
    grid = ch[at]
    grid[(idx < 0) | (steps - t[at] > _PLANS[source].hold_ns)] = np.nan
    return grid


def extract_window(streams: Mapping[str, Columns], t0_ns: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Window ``w`` of an episode whose grid starts at ``t0_ns``, from whatever rows are given.

    Per source: its rows in ``[start - LOOKBACK_NS, last step]`` in arrival order, their
    channels (``_transform``), rows after a clock step back dropped, sample-and-hold onto the
    grid; then coverage, unusable sources and hole filling for all 46 channels at once."""
    start = t0_ns + w * STRIDE_STEPS * STEP_NS
    steps = start + _STEP_OFFSETS
    lo = start - LOOKBACK_NS
    grid = np.full((N_CHANNELS, WINDOW_STEPS), np.nan)
    for source in SOURCES:
        cols = streams.get(source)
        if cols is None or len(cols.t_wall_ns) == 0:
            continue
        held = _held(source, cols, lo, steps)
        if held is not None:
            grid[SOURCE_SLICE[source]] = held.T
    # coverage = share of steps where every channel of the source is finite
    ok = np.logical_and.reduceat(np.isfinite(grid), _SRC_STARTS, axis=0)  # (4, 100)
    n_ok = np.count_nonzero(ok, axis=1)
    cov = n_ok / WINDOW_STEPS  # float64, as the per-source Python float was
    usable = cov >= MIN_COVERAGE
    grid[~usable[_CH_SRC]] = np.nan  # a source below MIN_COVERAGE is unusable here
    # Holes of usable sources: hold the previous value, then the next. A full channel is its
    # own fill and an all-NaN one stays NaN, so filling every channel changes nothing else.
    if bool((usable & (n_ok < WINDOW_STEPS)).any()):
        grid = _fill_holes(grid.T).T
    return grid.astype(np.float32), cov.astype(np.float32)


def summarize(tensor: np.ndarray) -> np.ndarray:
    """Summary view: float32 [C * len(SUMMARY_STATS)], channel-major (feature c*k + s).

    Accepts one window (C, T) or a batch (N, C, T) -> (N, C*k); row i of a batch equals
    the summary of window i alone (the daemon summarises one window at a time). The mean
    and standard deviation are numpy's own reductions spelled out (sum / n, then the mean
    square deviation), so the sum is shared and every bit is as ``x.mean()``/``x.std()``."""
    x = np.asarray(tensor, dtype=np.float64)
    xs = np.sort(x, axis=-1)
    n = x.shape[-1]

    def pct(q: float) -> np.ndarray:  # linear interpolation, as numpy's default percentile
        pos = q * (n - 1)
        lo = int(pos)
        return xs[..., lo] + (pos - lo) * (xs[..., min(lo + 1, n - 1)] - xs[..., lo])

    mean = np.add.reduce(x, axis=-1, keepdims=True) / n
    dev = x - mean
    np.multiply(dev, dev, out=dev)
    std = np.sqrt(np.add.reduce(dev, axis=-1) / n)
    step = x[..., 1:] - x[..., :-1]
    np.abs(step, out=step)
    stats = (
        mean[..., 0],
        std,
        xs[..., 0],
        xs[..., -1],
        x[..., -1] - x[..., 0],
        pct(0.10),
        pct(0.90),
        np.add.reduce(step, axis=-1) / (n - 1),
    )
    assert len(stats) == len(SUMMARY_STATS)
    out = np.stack(stats, axis=-1).astype(np.float32)  # (..., C, k)
    return out.reshape(*out.shape[:-2], -1)
