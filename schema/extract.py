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
from .vocab import PHASE_INDEX, SOURCES, THREAT_SOURCES


class Columns(Protocol):
    """What the extractor needs of a stream (``schema.reader.StreamColumns`` has it)."""

    t_wall_ns: np.ndarray  # int64 (n,)
    values: np.ndarray  # float64 (n, len(rows.row_fields(source)))


_SOURCE_POS = {s: i for i, s in enumerate(SOURCES)}
_N_FIELDS = {s: SOURCE_SLICE[s].stop - SOURCE_SLICE[s].start for s in SOURCES}


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


def extract_window(streams: Mapping[str, Columns], t0_ns: int, w: int) -> Window:
    """Window ``w`` of an episode whose grid starts at ``t0_ns``, from whatever rows are given.

    Per source: its rows in ``[start - LOOKBACK_NS, last step]`` in arrival order, their
    channels (``_transform``), rows after a clock step back dropped, sample-and-hold onto the
    grid; then coverage, unusable sources and hole filling for all 46 channels at once."""
    start = window_start_ns(t0_ns, w)
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
    return Window(w=w, start_ns=start, tensor=grid.astype(np.float32), coverage=cov.astype(np.float32))


def window_complete(streams: Mapping[str, Columns], t0_ns: int, w: int) -> bool:
    """True when every stream present has a row at or after the window's last step."""
    last = window_last_step_ns(t0_ns, w)
    present = [c for c in streams.values() if len(c.t_wall_ns)]
    return bool(present) and all(int(c.t_wall_ns.max()) >= last for c in present)


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
