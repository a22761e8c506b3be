"""The 46 channels, the grid and the window geometry: the one place these facts live.

A channel is one numeric row field of one source, turned into a physical unit by a
named transform. Order is SPEC order (source order, then field order) and is the
channel axis of every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from .vocab import SOURCES, THREAT_SOURCES

Transform = Literal["rate", "interval_rate", "kb_to_mb", "identity"]
# rate:          cumulative counter -> per second over the t_wall_ns delta; a drop is a reset
# interval_rate: netflow per-interval count -> per second using interval_ms
# kb_to_mb:      gauge in kB -> MB (/1024)
# identity:      percentages and plain gauges


@dataclass(frozen=True, slots=True)
class Channel:
    source: str
    field: str
    transform: Transform
    unit: str

    @property
    def name(self) -> str:
        return f"{self.source}.{self.field}"


def _c(source: str, field: str, transform: Transform, unit: str) -> Channel:
    return Channel(source, field, transform, unit)


CHANNELS: Final[tuple[Channel, ...]] = (
    # proc: host /proc/<qemu_pid> (12)
    _c("proc", "utime_ticks", "rate", "ticks/s"),
    _c("proc", "stime_ticks", "rate", "ticks/s"),
    _c("proc", "rss_kb", "kb_to_mb", "MB"),
    _c("proc", "vsize_kb", "kb_to_mb", "MB"),
    _c("proc", "num_threads", "identity", "threads"),
    _c("proc", "read_bytes", "rate", "B/s"),
    _c("proc", "write_bytes", "rate", "B/s"),
    _c("proc", "syscr", "rate", "calls/s"),
    _c("proc", "syscw", "rate", "calls/s"),
    _c("proc", "voluntary_ctxt_switches", "rate", "switches/s"),
    _c("proc", "nonvoluntary_ctxt_switches", "rate", "switches/s"),
    _c("proc", "majflt", "rate", "faults/s"),
    # guest: in-guest agent (16)
    _c("guest", "cpu_user_pct", "identity", "%"),
    _c("guest", "cpu_system_pct", "identity", "%"),
    _c("guest", "cpu_iowait_pct", "identity", "%"),
    _c("guest", "mem_used_kb", "kb_to_mb", "MB"),
    _c("guest", "mem_cached_kb", "kb_to_mb", "MB"),
    _c("guest", "load1", "identity", "load"),
    _c("guest", "procs_running", "identity", "procs"),
    _c("guest", "procs_blocked", "identity", "procs"),
    _c("guest", "procs_total", "identity", "procs"),
    _c("guest", "forks_total", "rate", "forks/s"),
    _c("guest", "disk_read_bytes", "rate", "B/s"),
    _c("guest", "disk_write_bytes", "rate", "B/s"),
    _c("guest", "net_rx_bytes", "rate", "B/s"),
    _c("guest", "net_tx_bytes", "rate", "B/s"),
    _c("guest", "tcp_established", "identity", "conns"),
    _c("guest", "tcp_syn_sent", "identity", "conns"),
    # qmp: QEMU monitor, ~1 Hz (8)
    _c("qmp", "vcpu_time_ns", "rate", "ns/s"),
    _c("qmp", "blk_rd_bytes", "rate", "B/s"),
    _c("qmp", "blk_wr_bytes", "rate", "B/s"),
    _c("qmp", "blk_rd_ops", "rate", "ops/s"),
    _c("qmp", "blk_wr_ops", "rate", "ops/s"),
    _c("qmp", "net_rx_bytes", "rate", "B/s"),
    _c("qmp", "net_tx_bytes", "rate", "B/s"),
    _c("qmp", "balloon_actual_kb", "kb_to_mb", "MB"),
    # netflow: bridge capture, per interval (10)
    _c("netflow", "pkts_in", "interval_rate", "pkts/s"),
    _c("netflow", "pkts_out", "interval_rate", "pkts/s"),
    _c("netflow", "bytes_in", "interval_rate", "B/s"),
    _c("netflow", "bytes_out", "interval_rate", "B/s"),
    _c("netflow", "flows_new", "interval_rate", "flows/s"),
    _c("netflow", "uniq_dst_ips", "interval_rate", "ips/s"),
    _c("netflow", "uniq_dst_ports", "interval_rate", "ports/s"),
    _c("netflow", "syn_out", "interval_rate", "pkts/s"),
    _c("netflow", "rst_in", "interval_rate", "pkts/s"),
    _c("netflow", "dns_queries", "interval_rate", "queries/s"),
)
CHANNEL_NAMES: Final = tuple(c.name for c in CHANNELS)
N_CHANNELS: Final = len(CHANNELS)
assert N_CHANNELS == 46

# Row fields per source, in channel order (what the typed rows and the extractor read).
SOURCE_FIELDS: Final = {s: tuple(c.field for c in CHANNELS if c.source == s) for s in SOURCES}
# Index range of each source on the channel axis.
SOURCE_SLICE: Final = {
    s: slice(
        CHANNELS.index(next(c for c in CHANNELS if c.source == s)),
        CHANNELS.index(next(c for c in CHANNELS if c.source == s)) + len(SOURCE_FIELDS[s]),
    )
    for s in SOURCES
}


def view_channels(threat_model: str) -> tuple[int, ...]:
    """Indices on the 46-channel axis that a threat model may see."""
    allowed = THREAT_SOURCES[threat_model]
    return tuple(i for i, c in enumerate(CHANNELS) if c.source in allowed)


REALISTIC_CHANNELS: Final = view_channels("realistic")
ORACLE_CHANNELS: Final = view_channels("oracle")
assert len(REALISTIC_CHANNELS) == 30 and len(ORACLE_CHANNELS) == 46

# --- the grid and the windows ------------------------------------------------------
RATE_HZ: Final = 10
STEP_NS: Final = 1_000_000_000 // RATE_HZ
WINDOW_S: Final = 10
STRIDE_S: Final = 5
WINDOW_STEPS: Final = WINDOW_S * RATE_HZ  # 100
STRIDE_STEPS: Final = STRIDE_S * RATE_HZ  # 50

# A grid step takes the latest row at or before it, if that row is at most this old;
# otherwise the step has no data. qmp is ~1 Hz, so it may hold longer.
HOLD_NS: Final = {"proc": 500_000_000, "guest": 500_000_000, "qmp": 2_500_000_000, "netflow": 500_000_000}
# Rows before a window's start that the extractor reads (hold + the previous row for rates).
LOOKBACK_NS: Final = 5_000_000_000
# A source is usable in a window when at least this share of its 100 steps has data;
# the gaps of a usable source are filled by holding the previous value (then the next).
MIN_COVERAGE: Final = 0.6
# Windows whose required sources fall below MIN_COVERAGE are skipped, never zero-filled.

SUMMARY_STATS: Final = ("mean", "std", "min", "max", "last_minus_first", "p10", "p90", "mean_abs_diff")
N_SUMMARY: Final = N_CHANNELS * len(SUMMARY_STATS)

# Bump whenever extraction code changes its output; the golden test enforces it.
EXTRACTOR_VERSION: Final = 1
