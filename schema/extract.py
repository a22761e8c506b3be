"""The one extractor: telemetry rows -> 10 Hz grid -> 10-s windows (tensor and summary views).

The trainer and the edge daemon call these same functions, so a window's features are
bit-identical on both sides for the same rows. ``extract_window`` reads only the rows
inside ``[window start - LOOKBACK_NS, last step]``, in arrival order, so a daemon that
holds a ring buffer covering that span gets the same numbers as the trainer that holds
the whole episode.

Per source, per window:
1. select rows in the span, in arrival order;
2. transform each field into its channel (``schema.channels.Transform``): counters become
   per-second rates over the ``t_wall_ns`` delta to the previous row, where a counter that
   went down restarted from zero (the delta is its new value, as Prometheus' ``rate()``
   does); then drop rows whose ``t_wall_ns`` does not move forward (a clock stepped back);
3. sample-and-hold onto the grid: a step takes the latest row at or before it, when that row
   is at most ``HOLD_NS[source]`` old;
4. coverage = share of the 100 steps where every channel of the source is finite; a source
   below ``MIN_COVERAGE`` is unusable in this window (its channels stay NaN), a usable source
   has its gaps filled by holding the previous value, then the next.

Alignment is on ``t_wall_ns`` only: netflow rows come from another machine whose
``t_mono_ns`` has a different base.

A window costs numpy calls, not arithmetic (a few hundred rows), so the rules above are
computed for all four sources at once, on only the rows the grid reads: one binary search
over every source's times (each in its own band), one gather of the held and the previous
rows' values, one division for rates, interval rates and unit scales. The result is bit for
bit what the per-source version gave (kept as tests/extract_reference.py; the parity test
holds the two together), so ``EXTRACTOR_VERSION`` did not change (issue 13).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .channels import (
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
    view_channels,
)
from .rows import row_fields
from .vocab import PHASE_INDEX, SOURCES, THREAT_SOURCES


class Columns(Protocol):
    """What the extractor needs of a stream (``schema.reader.StreamColumns`` has it)."""

    t_wall_ns: np.ndarray  # int64 (n,)
    values: np.ndarray  # float64 (n, len(rows.row_fields(source)))


_SOURCE_POS = {s: i for i, s in enumerate(SOURCES)}
# --- the pool layout, made once ----------------------------------------------------------------
# A window is computed channel-major, (channel, step), for all sources at once. The rows in a
# window's span of every source go into one pool: their times side by side, each source
# shifted into its own band (_BAND_NS apart, so the pool is sorted when every source is and
# one binary search serves all four), their fields side by side in one flat array (a value is
# found at base + row * width + field). Each source's channels are its first fields, in
# channel order (rows.row_fields), so channel c of source k is field c - SOURCE_SLICE.start.
_N_SRC = len(SOURCES)
_CH_SRC = np.array([_SOURCE_POS[c.source] for c in CHANNELS], np.intp)  # (46,) source of a channel
_CH_FIELD = np.array([i - SOURCE_SLICE[c.source].start for i, c in enumerate(CHANNELS)], np.intp)[:, None]
_WIDTH = [len(row_fields(s)) for s in SOURCES]  # fields a row of each source carries
_WIDTH_COL = np.array(_WIDTH, np.intp)[:, None]
# netflow's per-interval counts are per interval_ms: the field that follows its channels.
_INTERVAL_SRC = tuple(
    k for k, s in enumerate(SOURCES) if any(c.transform == "interval_rate" for c in CHANNELS[SOURCE_SLICE[s]])
)
_INTERVAL_FIELD = {k: row_fields(SOURCES[k]).index("interval_ms") for k in _INTERVAL_SRC}
_BAND_NS = 1 << 36  # ~69 s: more than a span (15 s) plus the longest hold (2.5 s)
assert LOOKBACK_NS + WINDOW_STEPS * STEP_NS + max(HOLD_NS.values()) < _BAND_NS
# Per source and step, the step's time in the source's band (times are relative to the span's start).
_BAND_STEPS = (
    np.arange(_N_SRC, dtype=np.int64)[:, None] * _BAND_NS
    + LOOKBACK_NS
    + np.arange(WINDOW_STEPS, dtype=np.int64)[None, :] * STEP_NS
)
_HOLD = np.array([HOLD_NS[s] for s in SOURCES], np.uint64)[:, None]
# The one division's denominator, per channel, is a row of the (len(_DEN_KEYS), T) array `den`,
# one row per (source, transform): a rate divides by its source's t_wall_ns delta in seconds
# (rows 0..3, by source position); an interval rate by interval_ms / 1000; identity by 1 and
# kB -> MB by 1024. x / 1 == x * 1 and x / 1024 == x * 2**-10 exactly (the same real number,
# so the same rounded double): this is bit for bit the old scale multiply. A row is NaN where
# its source has no fresh row, or where its denominator is not > 0 (the first row of a span
# has no previous row: its delta is 0 here; an interval must be positive): no value there.
_DEN_KEYS = [(k, "rate") for k in range(_N_SRC)] + sorted(
    {(_SOURCE_POS[c.source], c.transform) for c in CHANNELS if c.transform != "rate"}
)
_DEN_ROW = np.array([_DEN_KEYS.index((_SOURCE_POS[c.source], c.transform)) for c in CHANNELS], np.intp)
_DEN_SRC = np.array([k for k, _ in _DEN_KEYS], np.intp)
_DEN_TEMPLATE = np.ones((len(_DEN_KEYS), WINDOW_STEPS))
_DEN_TEMPLATE[[i for i, (_, kind) in enumerate(_DEN_KEYS) if kind == "kb_to_mb"]] = 1024.0
_INTERVAL_DEN = {k: _DEN_KEYS.index((k, "interval_rate")) for k in _INTERVAL_SRC}
# Counters: only their channels need the previous row.
_RATE_CH = np.flatnonzero([c.transform == "rate" for c in CHANNELS])
_RATE_SRC = _CH_SRC[_RATE_CH]
_RATE_FIELD = _CH_FIELD[_RATE_CH]
# Coverage needs "every channel of the source finite" per step: channel rows regrouped as
# (source, _MAX_CH, step) reduce in one call (a source with fewer channels repeats its first
# one, which changes no "all"); np.logical_and.reduceat over the 46 rows is much slower.
_MAX_CH = max(sl.stop - sl.start for sl in SOURCE_SLICE.values())


def _by_source() -> np.ndarray:
    rows = []
    for s in SOURCES:
        sl = SOURCE_SLICE[s]
        rows += [*range(sl.start, sl.stop), *[sl.start] * (_MAX_CH - (sl.stop - sl.start))]
    return np.array(rows, np.intp)


_BY_SOURCE = _by_source()
_NAN_GRID = np.full((N_CHANNELS, WINDOW_STEPS), np.nan)
_INT64_MIN = np.iinfo(np.int64).min
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)


@dataclass(frozen=True, slots=True)
class Window:
    w: int
    start_ns: int
    tensor: np.ndarray  # float32 [46, 100]; NaN rows for sources that are unusable here
    coverage: np.ndarray  # float32 [4], share of steps with data, per source in SOURCES order

    def usable(self, threat_model: str) -> bool:
        return all(self.coverage[_SOURCE_POS[s]] >= MIN_COVERAGE for s in THREAT_SOURCES[threat_model])

    def unusable_reasons(self, threat_model: str) -> list[str]:
        """Why ``usable`` is False: ``no_<source>`` (no row in the window), ``sparse_<source>``
        (under ``MIN_COVERAGE``, as for a stream that starts late); empty when usable."""
        out = []
        for s in THREAT_SOURCES[threat_model]:
            cov = float(self.coverage[_SOURCE_POS[s]])
            if cov < MIN_COVERAGE:
                out.append(f"no_{s}" if cov == 0 else f"sparse_{s}")
        return out


def window_start_ns(t0_ns: int, w: int) -> int:
    return t0_ns + w * STRIDE_STEPS * STEP_NS


def window_last_step_ns(t0_ns: int, w: int) -> int:
    return window_start_ns(t0_ns, w) + (WINDOW_STEPS - 1) * STEP_NS


def window_centre_ns(t0_ns: int, w: int) -> int:
    return window_start_ns(t0_ns, w) + (WINDOW_STEPS // 2) * STEP_NS


def n_windows(t0_ns: int, end_ns: int) -> int:
    """How many whole windows fit between the grid origin and the last data."""
    span = end_ns - t0_ns - (WINDOW_STEPS - 1) * STEP_NS
    return 0 if span < 0 else int(span // (STRIDE_STEPS * STEP_NS)) + 1


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


def _rows_in(cols: Columns, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows with ``lo <= t_wall_ns <= hi``, in arrival order (views when contiguous)."""
    t_all = cols.t_wall_ns
    sel = np.flatnonzero((t_all >= lo) & (t_all <= hi))
    if sel.size == 0:
        return None
    a, b = int(sel[0]), int(sel[-1]) + 1
    return (t_all[a:b], cols.values[a:b]) if b - a == sel.size else (t_all[sel], cols.values[sel])


def _forward_rows(t_pool: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Pool rows that move forward in time within their source: a row that does not came
    after a clock step back and is dropped (a source's first row always stays)."""
    keep = []
    for a, b in spans:
        t = t_pool[a:b]
        prev_max = np.maximum.accumulate(np.concatenate(([_INT64_MIN], t[:-1])))
        keep.append(np.flatnonzero(t > prev_max) + a)
    return np.concatenate(keep)


def _conform(source: str, t: np.ndarray, v: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows as the extractor reads them: int64 clocks, float64 values, ``width`` fields a row."""
    if v.ndim != 2 or v.shape[1] < width:
        raise ValueError(f"{source}: values of shape {v.shape}, need {width} fields a row")
    return t.astype(np.int64, copy=False), np.ascontiguousarray(v[:, :width], dtype=np.float64)


_Pool = tuple[np.ndarray, np.ndarray, list[int], list[int], list[tuple[int, int]]]


def _pool(streams: Mapping[str, Columns], lo: int, hi: int, *, trust_ends: bool) -> _Pool | None:
    """Every source's rows in ``[lo, hi]`` in one pool: (times, each source in its band; flat
    values; per source its first pool row and where its values start; the sources' row spans).
    None when no source has a row there. With ``trust_ends``, a stream whose first and last
    rows are in the span is taken whole (what the daemon and the trainer hand over); a caller
    that finds the pool out of order asks again without it."""
    ts, vs, spans = [], [], []  # spans: each source's pool rows, for the strict pass only
    starts = [0] * _N_SRC  # first pool row of each source (0 for one with no rows: unused)
    v_base = [0] * _N_SRC  # where its values start in the flat value pool
    n_rows = n_vals = 0
    for k, source in enumerate(SOURCES):
        cols = streams.get(source)
        if cols is None or not len(t := cols.t_wall_ns):
            continue
        if trust_ends and t[0] >= lo and t[-1] <= hi:
            v = cols.values
        elif (rows := _rows_in(cols, lo, hi)) is not None:
            t, v = rows
        else:
            continue
        if v.shape[1:] != (_WIDTH[k],) or v.dtype is not _F64 or t.dtype is not _I64:
            t, v = _conform(source, t, v, _WIDTH[k])
        starts[k], v_base[k] = n_rows, n_vals
        n = len(t)
        if not trust_ends:
            spans.append((n_rows, n_rows + n))
        n_rows += n
        n_vals += n * _WIDTH[k]
        ts.append(t + (k * _BAND_NS - lo))
        vs.append(v.reshape(-1))
    if not ts:
        return None
    return np.concatenate(ts), np.concatenate(vs), starts, v_base, spans


def extract_window(streams: Mapping[str, Columns], t0_ns: int, w: int) -> Window:
    """Window ``w`` of an episode whose grid starts at ``t0_ns``, from whatever rows are given.

    Per source: its rows in ``[start - LOOKBACK_NS, last step]`` in arrival order; per step
    the row it holds (the latest at or before it, rows after a clock step back dropped, none
    when older than ``HOLD_NS``) and, for counters, the row before that one in arrival order.
    Only those rows' values are used. Then, for all 46 channels at once: counter deltas (a
    counter that went down restarted from zero: the delta is its new value), rates, interval
    rates and unit scales in one division, coverage, unusable sources and hole filling.

    Each value comes from the same floating-point operations on the same operands as in the
    straightforward version (tests/extract_reference.py), done on a few arrays for all
    sources instead of many per source: the output is bit-identical to it
    (tests/test_extract_parity.py)."""
    start = window_start_ns(t0_ns, w)
    lo, hi = start - LOOKBACK_NS, start + (WINDOW_STEPS - 1) * STEP_NS
    pool = _pool(streams, lo, hi, trust_ends=True)
    if pool is None:
        return Window(w, start, _NAN_GRID.astype(np.float32), np.zeros(_N_SRC, np.float32))
    t_pool, v_pool, starts, v_base, _ = pool
    # Sample and hold: each step takes the latest row at or before it. One search for all
    # sources; a step of a source without rows finds another source's row, in another band,
    # and the age test below rejects it.
    if bool((t_pool[1:] > t_pool[:-1]).all()):
        row = t_pool.searchsorted(_BAND_STEPS, side="right")
        row -= 1  # -1: no row at or before the step (clipped to row 0 below, too young)
        t_row = t_pool.take(row, mode="clip")
    else:
        # A clock stepped back in some stream. Rows between two in-span ends may then lie
        # outside the span: select each stream's rows strictly, then drop the rows that do
        # not move forward.
        pool = _pool(streams, lo, hi, trust_ends=False)
        assert pool is not None  # the in-span ends found above are still there
        t_pool, v_pool, starts, v_base, spans = pool
        kept = _forward_rows(t_pool, spans)
        t_kept = t_pool[kept]
        at = t_kept.searchsorted(_BAND_STEPS, side="right")
        at -= 1
        row = kept.take(at, mode="clip")
        t_row = t_kept.take(at, mode="clip")
    # Stale: the held row is after the step (age < 0) or older than HOLD_NS; one unsigned
    # comparison does both (a negative age is a huge unsigned one).
    age = _BAND_STEPS - t_row
    stale = age.view(np.uint64) > _HOLD
    # The previous row in arrival order, within the source; a source's first row is its own
    # previous (delta 0: no rate, as it has no previous row in the span). Per source: its
    # first pool row, and where its row 0's fields would start in the value pool.
    start_col, base_col = np.array(
        [starts, [b - a * n for a, b, n in zip(starts, v_base, _WIDTH)]], np.int64
    )[:, :, None]
    prev = np.maximum(row - 1, start_col)
    den = _DEN_TEMPLATE.copy()
    np.subtract(t_row, t_pool.take(prev, mode="clip"), out=age)
    np.divide(age, 1e9, out=den[:_N_SRC])  # int64 -> float64, / 1e9, as before
    at_cur = row * _WIDTH_COL  # (source, step): where the held row's fields start
    at_cur += base_col
    for k in _INTERVAL_SRC:
        np.divide(v_pool.take(at_cur[k] + _INTERVAL_FIELD[k], mode="clip"), 1000.0, out=den[_INTERVAL_DEN[k]])
    bad = den <= 0  # a NaN denominator needs no mark: it gives NaN anyway
    bad |= stale.take(_DEN_SRC, axis=0)
    den[bad] = np.nan
    # In-place steps from here on: every (46, T) temporary not made saves an allocation.
    at = at_cur.take(_CH_SRC, axis=0)
    at += _CH_FIELD
    num = v_pool.take(at, mode="clip")  # (46, T) the held rows' values
    prev *= _WIDTH_COL
    prev += base_col
    at = prev.take(_RATE_SRC, axis=0)
    at += _RATE_FIELD
    held = num.take(_RATE_CH, axis=0)
    delta = v_pool.take(at, mode="clip")
    np.subtract(held, delta, out=delta)
    np.copyto(delta, held, where=delta < 0)  # a counter that went down restarted from zero
    num[_RATE_CH] = delta
    grid = den.take(_DEN_ROW, axis=0)
    np.divide(num, grid, out=grid)
    # coverage = share of steps where every channel of the source is finite
    finite = np.isfinite(grid)
    if finite.all():  # most windows: every source covers every step, nothing to fill
        return Window(w, start, grid.astype(np.float32), np.ones(_N_SRC, np.float32))
    by_source = finite.take(_BY_SOURCE, axis=0).reshape(_N_SRC, _MAX_CH, WINDOW_STEPS)
    n_ok = np.logical_and.reduce(by_source, axis=1).sum(axis=1)
    # Four numbers: plain Python is cheaper than numpy calls on them.
    cov = [n / WINDOW_STEPS for n in n_ok.tolist()]  # the same float64 quotients as n_ok / T
    usable = [c >= MIN_COVERAGE for c in cov]
    if not all(usable):
        grid[~np.array(usable)[_CH_SRC]] = np.nan  # a source below MIN_COVERAGE is unusable here
    # Holes of usable sources: hold the previous value, then the next. A full channel is its
    # own fill and an all-NaN one stays NaN, so filling every channel changes nothing else.
    if any(u and c < 1.0 for u, c in zip(usable, cov)):
        grid = _fill_holes(grid.T).T
    return Window(w, start, np.ascontiguousarray(grid, dtype=np.float32), np.array(cov, np.float32))


def window_complete(streams: Mapping[str, Columns], t0_ns: int, w: int) -> bool:
    """True when every stream present has a row at or after the window's last step."""
    last = window_last_step_ns(t0_ns, w)
    present = [c for c in streams.values() if len(c.t_wall_ns)]
    return bool(present) and all(int(c.t_wall_ns.max()) >= last for c in present)


def _order_plan(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which order statistics the summary reads, for a series of ``n`` steps: min, max, then
    the lower and the upper neighbours of p10 and p90, and the fractions between those
    (linear interpolation, as numpy's default percentile)."""
    lo, hi, frac = [], [], []
    for q in (0.10, 0.90):
        pos = q * (n - 1)
        i = int(pos)
        lo.append(i)
        hi.append(min(i + 1, n - 1))
        frac.append(pos - i)
    return np.array([0, n - 1, *lo, *hi], np.intp), np.array(frac)


_ORDER = {WINDOW_STEPS: _order_plan(WINDOW_STEPS)}
_N_STATS = len(SUMMARY_STATS)
assert SUMMARY_STATS == ("mean", "std", "min", "max", "last_minus_first", "p10", "p90", "mean_abs_diff")


def summarize(tensor: np.ndarray) -> np.ndarray:
    """Summary view: float32 [C * len(SUMMARY_STATS)], channel-major (feature c*k + s).

    Accepts one window (C, T) or a batch (N, C, T) -> (N, C*k); row i of a batch equals
    the summary of window i alone (the daemon summarises one window at a time). The mean
    and standard deviation are numpy's own reductions spelled out (sum / n, then the mean
    square deviation), so the sum is shared and every bit is as ``x.mean()``/``x.std()``.
    Each statistic is written straight into its column of one (..., C, k) array; min, max
    and the percentiles are read from one sort."""
    x = np.asarray(tensor, dtype=np.float64)
    n = x.shape[-1]
    out = np.empty((*x.shape[:-1], _N_STATS))
    mean = out[..., 0:1]
    np.divide(np.add.reduce(x, axis=-1, keepdims=True), n, out=mean)
    dev = x - mean
    np.multiply(dev, dev, out=dev)
    std = np.add.reduce(dev, axis=-1)
    std /= n
    np.sqrt(std, out=out[..., 1])
    np.subtract(x[..., -1], x[..., 0], out=out[..., 4])
    step = np.subtract(x[..., 1:], x[..., :-1], out=dev[..., 1:])  # dev is spent: reuse it
    np.abs(step, out=step)
    np.divide(np.add.reduce(step, axis=-1), n - 1, out=out[..., 7])
    # The sort last: it may then sort x in place when x is this function's own float64 copy.
    if x is tensor or not x.flags.owndata:
        x = np.sort(x, axis=-1)
    else:
        x.sort(axis=-1)
    at, frac = _ORDER[n] if n in _ORDER else _order_plan(n)
    order = x.take(at, axis=-1)  # (..., C, 6): min, max, p10 and p90 below, p10 and p90 above
    out[..., 2:4] = order[..., 0:2]
    between = order[..., 4:6] - order[..., 2:4]
    between *= frac
    np.add(order[..., 2:4], between, out=out[..., 5:7])
    out32 = out.astype(np.float32)
    return out32.reshape(*out32.shape[:-2], -1)


def phase_at(label_t_ns: np.ndarray, label_phase: Sequence[int] | np.ndarray, t_ns: int) -> int:
    """Phase index in force at ``t_ns`` (labels sorted by time); -1 before the first label."""
    i = int(np.searchsorted(label_t_ns, t_ns, side="right")) - 1
    return -1 if i < 0 else int(label_phase[i])


@dataclass
class EpisodeWindows:
    """Every window of one episode that has proc data (the required source)."""

    windows: np.ndarray  # int32 (N,) window numbers
    tensor: np.ndarray  # float32 (N, 46, 100)
    coverage: np.ndarray  # float32 (N, 4)
    labels: np.ndarray  # int64 (N,), phase index at the window centre, -1 when unlabelled
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def summary(self) -> np.ndarray:
        return (
            summarize(self.tensor)
            if len(self.tensor)
            else np.zeros((0, N_CHANNELS * len(SUMMARY_STATS)), np.float32)
        )

    def usable_mask(self, threat_model: str) -> np.ndarray:
        need = [_SOURCE_POS[s] for s in THREAT_SOURCES[threat_model]]
        return np.asarray((self.coverage[:, need] >= MIN_COVERAGE).all(axis=1))


def labels_arrays(labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Label records (``t_wall_ns``, ``phase``) -> sorted times and phase indices (unknown dropped)."""
    pairs = sorted((int(l.t_wall_ns), PHASE_INDEX[l.phase]) for l in labels if l.phase in PHASE_INDEX)
    t = np.array([p[0] for p in pairs], dtype=np.int64)
    ph = np.array([p[1] for p in pairs], dtype=np.int64)
    return t, ph


@dataclass(slots=True)
class _Span:
    t_wall_ns: np.ndarray
    values: np.ndarray


def _increasing(t: np.ndarray) -> bool:
    return len(t) < 2 or bool((t[1:] > t[:-1]).all())


def _cut(cols: Columns, lo: int, hi: int) -> Columns:
    t = cols.t_wall_ns
    a, b = int(np.searchsorted(t, lo, side="left")), int(np.searchsorted(t, hi, side="right"))
    return _Span(t[a:b], cols.values[a:b])


def extract_streams(streams: Mapping[str, Columns], t0_ns: int, labels: Sequence = ()) -> EpisodeWindows:
    """All windows of an episode's rows, via ``extract_window`` (the daemon's function)."""
    proc = streams.get("proc")
    empty = EpisodeWindows(
        np.zeros(0, np.int32),
        np.zeros((0, N_CHANNELS, WINDOW_STEPS), np.float32),
        np.zeros((0, len(SOURCES)), np.float32),
        np.zeros(0, np.int64),
        {"no_proc_rows": 1},
    )
    if proc is None or len(proc.t_wall_ns) == 0:
        return empty
    end = int(proc.t_wall_ns.max())
    lt, lp = labels_arrays(labels)
    keep_w, tensors, covs, ys = [], [], [], []
    skipped = {"proc_coverage": 0}
    # A stream whose clock only moves forward (nearly all) is cut per window by two binary
    # searches, so each window reads its own rows, as the daemon's do, not the whole episode.
    sorted_ = {s: _increasing(c.t_wall_ns) for s, c in streams.items()}
    for w in range(n_windows(t0_ns, end)):
        start = window_start_ns(t0_ns, w)
        lo, hi = start - LOOKBACK_NS, window_last_step_ns(t0_ns, w)
        win = extract_window({s: _cut(c, lo, hi) if sorted_[s] else c for s, c in streams.items()}, t0_ns, w)
        if win.coverage[_SOURCE_POS["proc"]] < MIN_COVERAGE:
            skipped["proc_coverage"] += 1
            continue
        keep_w.append(w)
        tensors.append(win.tensor)
        covs.append(win.coverage)
        ys.append(phase_at(lt, lp, window_centre_ns(t0_ns, w)))
    if not keep_w:
        empty.skipped = skipped
        return empty
    return EpisodeWindows(
        np.array(keep_w, np.int32), np.stack(tensors), np.stack(covs), np.array(ys, np.int64), skipped
    )


def extract_episode(ep) -> EpisodeWindows:  # ep: schema.reader.EpisodeData
    """The trainer's path: an archive read by ``schema.reader.read_episode`` -> its windows."""
    if ep.meta is None:
        raise ValueError(f"{ep.path}: no readable meta.json, cannot place the grid")
    return extract_streams(ep.streams, ep.meta.started_ns, ep.labels)


def view(x: np.ndarray, threat_model: str, kind: str) -> np.ndarray:
    """A threat model's channels of a tensor batch (N, 46, T) or a summary batch (N, 46*k)."""
    return select(x, view_channels(threat_model), kind)


# --- channel subsets of full-width windows: the one gather -----------------------------------


def input_shape(kind: str) -> tuple[int, ...]:
    """One full-width window of a view, without the batch axis: what every graph reads."""
    if kind == "tensor":
        return (N_CHANNELS, WINDOW_STEPS)
    if kind == "summary":
        return (N_CHANNELS * len(SUMMARY_STATS),)
    raise ValueError(f"unknown input kind {kind!r}: 'tensor' or 'summary'")


def gather_indices(channels: Sequence[int], kind: str) -> np.ndarray:
    """Indices on axis 1 of a full-width batch that hold ``channels`` (indices on the 46 axis).

    A tensor's axis 1 is the channel; a summary is channel-major (feature c*k + s), so a
    channel is a block of k columns. Exported graphs start with a Gather of exactly these."""
    chans = np.asarray(channels, dtype=np.int64)
    if kind == "tensor":
        return chans
    if kind == "summary":
        k = len(SUMMARY_STATS)
        return (chans[:, None] * k + np.arange(k, dtype=np.int64)).reshape(-1)
    raise ValueError(f"unknown input kind {kind!r}: 'tensor' or 'summary'")


def select(x: np.ndarray, channels: Sequence[int], kind: str) -> np.ndarray:
    """``channels`` of a full-width tensor batch (N, 46, T) or summary batch (N, 46*k), in that order."""
    x = np.asarray(x)
    if x.shape[1:2] != input_shape(kind)[:1]:
        raise ValueError(f"select: expected a full-width {kind} batch {input_shape(kind)}, got {x.shape[1:]}")
    return np.take(x, gather_indices(channels, kind), axis=1)
