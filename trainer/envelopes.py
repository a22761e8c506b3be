"""Attack-profile envelopes for the deck's attacks scene (``attack_profile`` events).

One ~80-point curve per profile, computed from the corpus: for every infected episode of
the profile, the profile's characteristic channel over the episode's infected
span (first infecting / infected_running / dormant window to the last), averaged into 80
equal bins. The curve shipped is that of the *medoid* episode, the one closest to the
pointwise median of all of them: a plain median of bursty signals whose bursts fall at
different times is a flat line, while the medoid keeps a real episode's shape and is
still the most typical one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schema.artifacts import Envelope
from schema.channels import CHANNEL_NAMES, CHANNELS, STRIDE_STEPS, WINDOW_STEPS
from schema.vocab import PHASE_INDEX, PROFILES

POINTS = 80
INFECTED = (PHASE_INDEX["infecting"], PHASE_INDEX["infected_running"], PHASE_INDEX["dormant"])


@dataclass(frozen=True)
class Signature:
    candidates: tuple[tuple[str, ...], ...]  # channel groups (a group is summed: same unit)
    shape: str  # the SPEC's one-line description


# Which channels could carry each profile's signature. The one used is the group that
# rises most above the same episodes' clean windows in this corpus (ties: the first,
# host-side groups come first so the realistic view sees the envelope too).
SIGNATURES: dict[str, Signature] = {
    "cpu-saturate": Signature(
        (("proc.utime_ticks",), ("qmp.vcpu_time_ns",), ("guest.cpu_user_pct",)), "sustained one-vCPU peg"
    ),
    "bursty-c2": Signature(
        (("netflow.bytes_out",), ("netflow.pkts_out",), ("netflow.flows_new",)),
        "periodic command-and-control bursts",
    ),
    "scan-and-dial": Signature(
        (
            ("netflow.syn_out",),
            ("netflow.uniq_dst_ports",),
            ("netflow.uniq_dst_ips",),
            ("netflow.flows_new",),
        ),
        "port scans and outbound connection attempts",
    ),
    "exfil-trickle": Signature(
        (("netflow.bytes_out",), ("qmp.net_tx_bytes",), ("guest.net_tx_bytes",)), "slow steady upload"
    ),
    "disk-encrypt": Signature(
        (
            ("qmp.blk_rd_bytes", "qmp.blk_wr_bytes"),
            ("proc.read_bytes", "proc.write_bytes"),
            ("guest.disk_read_bytes", "guest.disk_write_bytes"),
        ),
        "heavy read-then-write disk I/O",
    ),
    "mem-inflate": Signature(
        (("proc.rss_kb",), ("guest.mem_used_kb",), ("qmp.balloon_actual_kb",)), "steady memory growth"
    ),
}
assert set(SIGNATURES) == set(PROFILES)


def _pick_channels(
    sig: Signature, names: list[str], means: np.ndarray, y: np.ndarray, in_profile: np.ndarray
) -> tuple[tuple[str, ...], float] | None:
    """The candidate group whose level while the payload runs rises most over clean windows.

    Means, not medians: a bursty payload is idle in most windows, and it is its bursts
    that make the profile what it is.
    """
    running = in_profile & (y == PHASE_INDEX["infected_running"])
    if not running.any():
        running = in_profile & np.isin(y, INFECTED)
    clean = in_profile & (y == PHASE_INDEX["clean"])
    if not clean.any():
        clean = y == PHASE_INDEX["clean"]
    best: tuple[tuple[str, ...], float] | None = None
    for group in sig.candidates:
        if any(c not in names for c in group):
            continue
        v = means[:, [names.index(c) for c in group]].sum(axis=1)
        hi = float(v[running].mean()) if running.any() else 0.0
        lo = float(v[clean].mean()) if clean.any() else 0.0
        ratio = (hi + 1e-9) / (lo + 1e-9) if hi > 0 else 0.0
        if best is None or ratio > best[1] * 1.05:  # a clear win to leave the earlier (host-side) group
            best = (group, ratio)
    return best


def _bins(series: np.ndarray, points: int) -> np.ndarray | None:
    """NaN-aware mean over `points` equal bins; empty bins are interpolated."""
    if len(series) < points or np.isnan(series).all():
        return None
    parts = np.array_split(series, points)
    with np.errstate(all="ignore"):
        vals = np.array([np.nanmean(p) if not np.isnan(p).all() else np.nan for p in parts])
    ok = ~np.isnan(vals)
    if ok.sum() < 2:
        return None
    x = np.arange(points)
    return np.interp(x, x[ok], vals[ok])


def _episode_curve(
    tensor: np.ndarray, y: np.ndarray, window: np.ndarray, cols: list[int], points: int
) -> np.ndarray | None:
    """One episode's windows -> its characteristic channel over the infected span, binned."""
    inf = np.isin(y, INFECTED)
    if not inf.any():
        return None
    w_inf = window[inf]
    first, last = int(w_inf.min()), int(w_inf.max())
    # Windows overlap by half; laying each on the step grid rebuilds the continuous series
    # (overlapping steps hold the same extracted values) and leaves skipped windows as NaN.
    n_steps = (last - first) * STRIDE_STEPS + WINDOW_STEPS
    series = np.full(n_steps, np.nan)
    sig = tensor[:, cols, :].sum(axis=1)
    for w, row in zip(window, sig):
        if first <= w <= last:
            at = (int(w) - first) * STRIDE_STEPS
            series[at : at + WINDOW_STEPS] = row
    return _bins(series, points)


def compute_envelopes(
    tensor: np.ndarray,
    y: np.ndarray,
    episode: np.ndarray,
    profile: np.ndarray,
    window: np.ndarray | None = None,
    channel_names: Sequence[str] = CHANNEL_NAMES,
    points: int = POINTS,
) -> list[Envelope]:
    """Windows of a corpus (tensor (N, C, 100) with C named by channel_names) -> envelopes.

    `window` is each window's number in its episode; without it, windows are taken to
    be consecutive in the order given. Profiles without an infected episode are left out.
    """
    tensor = np.asarray(tensor)
    n = len(tensor)
    if not (len(y) == len(episode) == len(profile) == n):
        raise ValueError(
            f"envelopes: arrays disagree in length: tensor {n}, y {len(y)}, "
            f"episode {len(episode)}, profile {len(profile)}"
        )
    names = list(channel_names)
    if tensor.ndim != 3 or tensor.shape[1] != len(names):
        raise ValueError(f"envelopes: tensor {tensor.shape} does not match {len(names)} channel names")
    episode = np.asarray(episode).astype(str)
    profile = np.asarray(profile).astype(str)
    y = np.asarray(y)
    if window is None:
        window = np.zeros(n, np.int64)
        for e in np.unique(episode):
            idx = np.flatnonzero(episode == e)
            window[idx] = np.arange(len(idx))
    window = np.asarray(window)

    means = tensor.mean(axis=2, dtype=np.float64)  # (N, C): one level per window and channel
    out: list[Envelope] = []
    for prof in PROFILES:
        sig = SIGNATURES[prof]
        picked = _pick_channels(sig, names, means, y, profile == prof)
        if picked is None:
            continue
        channels, ratio = picked
        cols = [names.index(c) for c in channels]
        curves: list[np.ndarray] = []
        for e in np.unique(episode[profile == prof]):
            idx = np.flatnonzero(episode == e)
            idx = idx[np.argsort(window[idx], kind="stable")]
            c = _episode_curve(tensor[idx], y[idx], window[idx], cols, points)
            if c is not None:
                curves.append(c)
        if not curves:
            continue
        stack = np.stack(curves)
        median = np.median(stack, axis=0)
        medoid = stack[np.abs(stack - median).sum(axis=1).argmin()]
        out.append(
            Envelope(
                name=prof,
                curve=[float(f"{v:.4g}") for v in medoid],
                shape=_shape_line(sig, channels, medoid, ratio),
                channel="+".join(channels),
                unit=CHANNELS[CHANNEL_NAMES.index(channels[0])].unit,
                episodes=len(curves),
            )
        )
    return out


def _shape_line(sig: Signature, channels: tuple[str, ...], curve: np.ndarray, ratio: float) -> str:
    """The SPEC's description plus what the corpus says: the channel, its peak, the rise over clean."""
    unit = CHANNELS[CHANNEL_NAMES.index(channels[0])].unit
    text = f"{sig.shape} ({'+'.join(channels)} peak {float(np.max(curve)):.3g} {unit}"
    if np.isfinite(ratio) and 0 < ratio < 1e6:
        text += f", {ratio:.1f}x clean while running"
    return text + ")"


def envelopes_from_windowset(ws, points: int = POINTS) -> list[Envelope]:
    """Convenience for a :class:`trainer.dataset.WindowSet` (full 46-channel tensors)."""
    return compute_envelopes(ws.tensor, ws.y, ws.episode, ws.profile, ws.window, CHANNEL_NAMES, points)
