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


# Per source: which columns each transform applies to (netflow's interval_ms follows its channels).
_BY_TRANSFORM = {
    s: {k: _columns_of(s, k) for k in ("rate", "interval_rate", "kb_to_mb", "identity")} for s in SOURCES
}
_STEP_OFFSETS = np.arange(WINDOW_STEPS, dtype=np.int64) * STEP_NS


@dataclass(frozen=True, slots=True)
class Window:
    w: int
    start_ns: int
    tensor: np.ndarray  # float32 [46, 100]; NaN rows for sources that are unusable here
    coverage: np.ndarray  # float32 [4], share of steps with data, per source in SOURCES order

    def usable(self, threat_model: str) -> bool:
        return all(self.coverage[_SOURCE_POS[s]] >= MIN_COVERAGE for s in THREAT_SOURCES[threat_model])


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


def _transform(source: str, t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row fields (n, fields) -> channel values (n, channels) for one source, float64."""
    n_ch = _N_FIELDS[source]
    cols = _BY_TRANSFORM[source]
    out = np.empty((len(t), n_ch), dtype=np.float64)
    if cols["rate"].size:
        out[0, cols["rate"]] = np.nan  # no previous row in the span
        if len(t) > 1:
            dt_s = np.diff(t).astype(np.float64) / 1e9
            dt_s[dt_s <= 0] = np.nan
            cum = v[:, cols["rate"]]
            delta = np.diff(cum, axis=0)
            reset = delta < 0
            delta[reset] = cum[1:][reset]  # the counter restarted from zero
            out[1:, cols["rate"]] = delta / dt_s[:, None]
    if cols["interval_rate"].size:
        interval_s = v[:, n_ch] / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, cols["interval_rate"]] = np.where(
                (interval_s > 0)[:, None], v[:, cols["interval_rate"]] / interval_s[:, None], np.nan
            )
    out[:, cols["kb_to_mb"]] = v[:, cols["kb_to_mb"]] / 1024.0
    out[:, cols["identity"]] = v[:, cols["identity"]]
    return out


def _fill_holes(block: np.ndarray) -> np.ndarray:
    """Hold the previous finite value along time, then back-fill the leading gap. (C, T)."""
    t_idx = np.arange(block.shape[1])
    ok = np.isfinite(block)
    prev = np.where(ok, t_idx, -1)
    np.maximum.accumulate(prev, axis=1, out=prev)
    nxt = np.where(ok, t_idx, block.shape[1])
    nxt = np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1]
    src = np.where(prev >= 0, prev, nxt)
    src = np.minimum(src, block.shape[1] - 1)
    return np.take_along_axis(block, src, axis=1)


def _source_grid(source: str, cols: Columns, lo: int, steps: np.ndarray) -> tuple[np.ndarray, float]:
    """One source's channels on the window's grid, (C, 100) float64, and its coverage."""
    n_ch = _N_FIELDS[source]
    t_all = cols.t_wall_ns
    sel = np.flatnonzero((t_all >= lo) & (t_all <= steps[-1]))
    grid = np.full((n_ch, WINDOW_STEPS), np.nan)
    if sel.size == 0:
        return grid, 0.0
    t = t_all[sel]
    # Rates between rows adjacent in arrival order, so a row after a clock step still
    # pairs with its true predecessor; a pair that goes back in time has no rate.
    ch = _transform(source, t, cols.values[sel])
    # Rows that do not move forward in time came after a clock step back: drop them.
    prev_max = np.maximum.accumulate(np.concatenate(([np.iinfo(np.int64).min], t[:-1])))
    keep = t > prev_max
    t, ch = t[keep], ch[keep]
    idx = np.searchsorted(t, steps, side="right") - 1
    fresh = idx >= 0
    fresh[fresh] = (steps[fresh] - t[idx[fresh]]) <= HOLD_NS[source]
    grid[:, fresh] = ch[idx[fresh]].T
    step_ok = np.isfinite(grid).all(axis=0)
    n_ok = int(step_ok.sum())
    coverage = n_ok / WINDOW_STEPS
    if coverage < MIN_COVERAGE:
        grid[:] = np.nan
    elif n_ok < WINDOW_STEPS:  # a full window has nothing to fill
        grid = _fill_holes(grid)
    return grid, coverage


def extract_window(streams: Mapping[str, Columns], t0_ns: int, w: int) -> Window:
    """Window ``w`` of an episode whose grid starts at ``t0_ns``, from whatever rows are given."""
    start = window_start_ns(t0_ns, w)
    steps = start + _STEP_OFFSETS
    lo = start - LOOKBACK_NS
    tensor = np.full((N_CHANNELS, WINDOW_STEPS), np.nan, dtype=np.float32)
    coverage = np.zeros(len(SOURCES), dtype=np.float32)
    for source in SOURCES:
        cols = streams.get(source)
        if cols is None or len(cols.t_wall_ns) == 0:
            continue
        grid, cov = _source_grid(source, cols, lo, steps)
        tensor[SOURCE_SLICE[source]] = grid.astype(np.float32)
        coverage[_SOURCE_POS[source]] = cov
    return Window(w=w, start_ns=start, tensor=tensor, coverage=coverage)


def window_complete(streams: Mapping[str, Columns], t0_ns: int, w: int) -> bool:
    """True when every stream present has a row at or after the window's last step."""
    last = window_last_step_ns(t0_ns, w)
    present = [c for c in streams.values() if len(c.t_wall_ns)]
    return bool(present) and all(int(c.t_wall_ns.max()) >= last for c in present)


def summarize(tensor: np.ndarray) -> np.ndarray:
    """Summary view: float32 [C * len(SUMMARY_STATS)], channel-major (feature c*k + s).

    Accepts one window (C, T) or a batch (N, C, T) -> (N, C*k); row i of a batch equals
    the summary of window i alone (the daemon summarises one window at a time)."""
    x = np.asarray(tensor, dtype=np.float64)
    xs = np.sort(x, axis=-1)
    n = x.shape[-1]

    def pct(q: float) -> np.ndarray:  # linear interpolation, as numpy's default percentile
        pos = q * (n - 1)
        lo = int(pos)
        return xs[..., lo] + (pos - lo) * (xs[..., min(lo + 1, n - 1)] - xs[..., lo])

    stats = (
        x.mean(axis=-1),
        x.std(axis=-1),
        xs[..., 0],
        xs[..., -1],
        x[..., -1] - x[..., 0],
        pct(0.10),
        pct(0.90),
        np.abs(np.diff(x, axis=-1)).mean(axis=-1),
    )
    assert len(stats) == len(SUMMARY_STATS)
    out = np.stack(stats, axis=-1).astype(np.float32)  # (..., C, k)
    return out.reshape(*out.shape[:-2], -1)


def phase_at(label_t_ns: np.ndarray, label_phase: Sequence[int], t_ns: int) -> int:
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
        return (self.coverage[:, need] >= MIN_COVERAGE).all(axis=1)


def labels_arrays(labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Label records (``t_wall_ns``, ``phase``) -> sorted times and phase indices (unknown dropped)."""
    pairs = sorted((int(l.t_wall_ns), PHASE_INDEX[l.phase]) for l in labels if l.phase in PHASE_INDEX)
    t = np.array([p[0] for p in pairs], dtype=np.int64)
    ph = np.array([p[1] for p in pairs], dtype=np.int64)
    return t, ph


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
    for w in range(n_windows(t0_ns, end)):
        win = extract_window(streams, t0_ns, w)
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
