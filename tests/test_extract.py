"""The one extractor: alignment, transforms, coverage, and the golden features."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest

from schema import extract
from schema.channels import CHANNEL_NAMES, EXTRACTOR_VERSION, MIN_COVERAGE, SOURCE_SLICE, STEP_NS
from schema.hashing import schema_hash
from schema.rows import Label, row_fields
from schema.vocab import PHASE_INDEX, SOURCES

T0 = 1_750_000_000_000_000_000  # grid origin (meta.started_ns)
S = 1_000_000_000


@dataclass
class Cols:
    t_wall_ns: np.ndarray
    values: np.ndarray


def _stream(source: str, hz: float, seconds: float, *, t_offset_ns: int = 0, mono_base: int = 0) -> Cols:
    """Deterministic rows (no RNG): counters grow at a wobbling rate, gauges oscillate."""
    n = int(seconds * hz)
    i = np.arange(n, dtype=np.float64)
    t = (
        T0
        + t_offset_ns
        + (i * (S / hz)).astype(np.int64)
        + ((i * 7919) % 11 - 5).astype(np.int64) * 1_000_000
    )
    fields = row_fields(source)
    v = np.empty((n, len(fields)))
    for j, name in enumerate(fields):
        wave = 1.0 + 0.5 * np.sin(i / (5.0 + j) + j)
        if name == "interval_ms":
            v[:, j] = 100.0
        elif source != "netflow" and any(
            k in name for k in ("ticks", "bytes", "sysc", "ctxt", "majflt", "forks", "time_ns", "ops")
        ):
            v[:, j] = np.cumsum(wave * (j + 1) * 10.0)
        else:
            v[:, j] = wave * (j + 3)
    return Cols(t, v)


def fixed_episode(seconds: float = 60.0) -> dict[str, Cols]:
    return {
        "proc": _stream("proc", 10, seconds),
        "guest": _stream("guest", 10, seconds, t_offset_ns=3_000_000),
        "qmp": _stream("qmp", 1, seconds, t_offset_ns=-40_000_000),
        # the capture box: its own clock, and its t_mono_ns base is unrelated to the host's
        "netflow": _stream("netflow", 10, seconds, t_offset_ns=12_000_000),
    }


LABELS = [
    Label(t_wall_ns=T0, phase="clean"),
    Label(t_wall_ns=T0 + 22 * S, phase="armed"),
    Label(t_wall_ns=T0 + 40 * S, phase="infecting"),
]

# Pinned features of fixed_episode(), per schema hash. Changing extraction output without
# bumping EXTRACTOR_VERSION (and so the schema hash) fails here.
GOLDEN = {
    "4fc50619ad91a5b95a3fac65f2d8e5f8c3cfd50c41d7677e8e03c9fede6b9329": (
        "1bb0fd7f1b45ae75318f3689c41019925efa720cd046d9211cbd12bb7b7bf3ad"
    ),
}


def _digest(ew: extract.EpisodeWindows) -> str:
    # 6 significant digits: robust to last-bit differences between CPUs, not to real changes
    text = "\n".join(" ".join(f"{x:.6g}" for x in row) for row in ew.tensor.reshape(len(ew.tensor), -1))
    text += "\n" + " ".join(f"{x:.6g}" for x in ew.summary.ravel()) + "\n" + repr(ew.labels.tolist())
    return hashlib.sha256(text.encode()).hexdigest()


def test_golden_features_are_pinned_to_the_schema_hash() -> None:
    ew = extract.extract_streams(fixed_episode(), T0, LABELS)
    assert schema_hash() in GOLDEN, (
        f"new schema hash {schema_hash()} (extractor v{EXTRACTOR_VERSION}): add its golden digest"
    )
    assert _digest(ew) == GOLDEN[schema_hash()], (
        "extraction output changed but the schema hash did not: bump EXTRACTOR_VERSION in schema/channels.py"
    )


def test_windows_geometry_and_labels_at_centre() -> None:
    ew = extract.extract_streams(fixed_episode(60), T0, LABELS)
    # 60 s of data: windows start every 5 s and need 9.9 s -> starts 0..50 s = 11 windows
    assert ew.windows.tolist() == list(range(11))
    assert ew.tensor.shape == (11, 46, 100) and ew.tensor.dtype == np.float32
    centres = [(5 * w + 5) for w in ew.windows]
    expected = [PHASE_INDEX["clean" if c < 22 else "armed" if c < 40 else "infecting"] for c in centres]
    assert ew.labels.tolist() == expected
    assert not np.isnan(ew.tensor).any()


def test_netflow_survives_a_foreign_monotonic_clock() -> None:
    """Regression: the original system aligned on t_mono_ns and silently lost netflow."""
    streams = fixed_episode(30)
    host_uptime, capture_box_uptime = 3_600 * S, 41 * 86_400 * S  # the two machines' monotonic bases
    for name, c in streams.items():
        c.t_mono_ns = c.t_wall_ns - T0 + (capture_box_uptime if name == "netflow" else host_uptime)
    # The trap is real: on t_mono_ns, netflow lies 41 days away from every other stream ...
    on_mono = {n: Cols(c.t_mono_ns, c.values) for n, c in streams.items()}
    trapped = extract.extract_streams(on_mono, host_uptime, LABELS)
    assert (trapped.coverage[:, SOURCES.index("netflow")] == 0).all()
    # ... and the extractor, which aligns on t_wall_ns, keeps every netflow channel.
    ew = extract.extract_streams(streams, T0, LABELS)
    nf = ew.tensor[:, SOURCE_SLICE["netflow"], :]
    assert np.isfinite(nf).all() and (nf != 0).any()
    assert (ew.coverage[:, SOURCES.index("netflow")] >= 0.99).all()
    # per-interval counts became per-second rates: value / 0.1 s
    pkts_in = CHANNEL_NAMES.index("netflow.pkts_in") - SOURCE_SLICE["netflow"].start
    raw = streams["netflow"].values[:, pkts_in]
    assert nf[:, pkts_in, :].max() == pytest.approx(raw.max() / 0.1, rel=1e-5)


def test_counter_reset_is_not_a_negative_rate() -> None:
    streams = fixed_episode(30)
    proc = streams["proc"]
    j = row_fields("proc").index("read_bytes")
    cut = 150  # the counter restarts from zero at row 150 (t ~ 15 s)
    proc.values[cut:, j] -= proc.values[cut - 1, j] + 1.0
    proc.values[cut:, j] = np.maximum(proc.values[cut:, j], 0) + 5.0
    ew = extract.extract_streams(streams, T0, LABELS)
    ch = CHANNEL_NAMES.index("proc.read_bytes")
    assert (ew.tensor[:, ch, :] >= 0).all()


def test_clock_step_back_drops_rows_instead_of_inventing_resets() -> None:
    streams = fixed_episode(30)
    proc = streams["proc"]
    proc.t_wall_ns[120:] -= 2 * S  # NTP stepped the host clock back 2 s at 12 s
    ew = extract.extract_streams(streams, T0, LABELS)
    for name in ("proc.utime_ticks", "proc.read_bytes"):
        rates = ew.tensor[:, CHANNEL_NAMES.index(name), :]
        assert (rates >= 0).all() and rates.max() < 2000, name  # no spike from a fake reset


def test_sparse_qmp_is_held_between_rows() -> None:
    ew = extract.extract_streams(fixed_episode(30), T0, LABELS)
    qmp = ew.coverage[:, SOURCES.index("qmp")]
    # 1 Hz rows held over 10 Hz steps; only window 0 lacks a previous row for its first rate
    assert (qmp[1:] == 1.0).all() and qmp[0] >= 0.85


def test_window_without_enough_data_is_not_zero_filled() -> None:
    streams = fixed_episode(40)
    g = streams["guest"]
    keep = (g.t_wall_ns < T0 + 12 * S) | (g.t_wall_ns > T0 + 30 * S)  # the agent went silent for 18 s
    streams["guest"] = Cols(g.t_wall_ns[keep], g.values[keep])
    ew = extract.extract_streams(streams, T0, LABELS)
    gpos = SOURCES.index("guest")
    silent = ew.coverage[:, gpos] < MIN_COVERAGE
    assert silent.any() and not silent.all()
    assert np.isnan(ew.tensor[silent][:, SOURCE_SLICE["guest"], :]).all()
    assert not ew.usable_mask("oracle")[silent].any() and ew.usable_mask("realistic").all()


def test_missing_proc_skips_windows() -> None:
    streams = fixed_episode(40)
    p = streams["proc"]
    keep = (p.t_wall_ns < T0 + 10 * S) | (p.t_wall_ns > T0 + 28 * S)
    streams["proc"] = Cols(p.t_wall_ns[keep], p.values[keep])
    ew = extract.extract_streams(streams, T0, LABELS)
    assert ew.skipped["proc_coverage"] > 0
    assert len(ew.windows) + ew.skipped["proc_coverage"] == extract.n_windows(T0, int(p.t_wall_ns.max()))


def test_ring_buffer_of_recent_rows_gives_identical_bits() -> None:
    """The daemon keeps only recent rows; the trainer has the whole episode."""
    streams = fixed_episode(60)
    full = extract.extract_streams(streams, T0, LABELS)
    for w in (3, 7, 10):
        start = extract.window_start_ns(T0, w)
        recent = {
            s: Cols(c.t_wall_ns[c.t_wall_ns >= start - 6 * S], c.values[c.t_wall_ns >= start - 6 * S])
            for s, c in streams.items()
        }
        win = extract.extract_window(recent, T0, w)
        i = full.windows.tolist().index(w)
        assert np.array_equal(win.tensor, full.tensor[i], equal_nan=True)
        assert np.array_equal(extract.summarize(win.tensor), full.summary[i])


def test_window_complete_waits_for_every_stream() -> None:
    streams = fixed_episode(30)
    assert extract.window_complete(streams, T0, 2)  # last step at 19.9 s
    late = dict(streams)
    nf = streams["netflow"]
    late["netflow"] = Cols(nf.t_wall_ns[nf.t_wall_ns < T0 + 15 * S], nf.values[nf.t_wall_ns < T0 + 15 * S])
    assert not extract.window_complete(late, T0, 2)


def test_summary_layout() -> None:
    ew = extract.extract_streams(fixed_episode(20), T0, LABELS)
    summ = ew.summary.reshape(len(ew.tensor), 46, -1)
    x = ew.tensor.astype(np.float64)
    np.testing.assert_allclose(summ[..., 0], x.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(summ[..., 2], x.min(-1), rtol=1e-6)
    np.testing.assert_allclose(summ[..., 6], np.percentile(x, 90, axis=-1), rtol=1e-5)
    assert extract.view(ew.summary, "realistic", "summary").shape == (len(ew.tensor), 30 * summ.shape[-1])
    assert extract.view(ew.tensor, "realistic", "tensor").shape == (len(ew.tensor), 30, 100)
    assert STEP_NS == 100_000_000
