"""Typed records for every JSONL member (SPEC section 3), decoded through msgspec.

Numeric row fields are typed ``float`` so a collector that writes ``12`` or ``12.0``
decodes the same; ids and clocks are ints. Unknown extra fields are ignored.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from .channels import SOURCE_FIELDS
from .vocab import SOURCES


class VM(msgspec.Struct, kw_only=True):
    vcpus: int
    mem_mb: int
    os: str


class EpisodeMeta(msgspec.Struct, kw_only=True):
    episode_id: str
    host_id: str
    schema_version: int
    sample_id: str | None
    profile: str | None
    started_ns: int
    ended_ns: int
    vm: VM
    collector: str


class Label(msgspec.Struct, kw_only=True):
    t_wall_ns: int
    phase: str  # checked against PHASES by the validator, so an unknown phase is a reason, not a decode error


class OrchestratorEvent(msgspec.Struct, kw_only=True):
    t_wall_ns: int
    kind: str


class Stamped(msgspec.Struct):
    """What every JSONL record of an episode has (the rest is ignored): replay's clock."""

    t_wall_ns: int


class _Row(msgspec.Struct, kw_only=True):
    t_wall_ns: int
    t_mono_ns: int


class ProcRow(_Row, kw_only=True):
    pid: int
    utime_ticks: float
    stime_ticks: float
    rss_kb: float
    vsize_kb: float
    num_threads: float
    read_bytes: float
    write_bytes: float
    syscr: float
    syscw: float
    voluntary_ctxt_switches: float
    nonvoluntary_ctxt_switches: float
    majflt: float


class GuestRow(_Row, kw_only=True):
    cpu_user_pct: float
    cpu_system_pct: float
    cpu_iowait_pct: float
    mem_used_kb: float
    mem_cached_kb: float
    load1: float
    procs_running: float
    procs_blocked: float
    procs_total: float
    forks_total: float
    disk_read_bytes: float
    disk_write_bytes: float
    net_rx_bytes: float
    net_tx_bytes: float
    tcp_established: float
    tcp_syn_sent: float


class QmpRow(_Row, kw_only=True):
    vcpu_time_ns: float
    blk_rd_bytes: float
    blk_wr_bytes: float
    blk_rd_ops: float
    blk_wr_ops: float
    net_rx_bytes: float
    net_tx_bytes: float
    balloon_actual_kb: float
    status: str = "running"


class NetflowRow(_Row, kw_only=True):
    interval_ms: float
    pkts_in: float
    pkts_out: float
    bytes_in: float
    bytes_out: float
    flows_new: float
    uniq_dst_ips: float
    uniq_dst_ports: float
    syn_out: float
    rst_in: float
    dns_queries: float


ROW_TYPES: Final = {"proc": ProcRow, "guest": GuestRow, "qmp": QmpRow, "netflow": NetflowRow}
# Fields the extractor needs beyond the channel fields (netflow's interval for its rates).
EXTRA_FIELDS: Final = {"proc": (), "guest": (), "qmp": (), "netflow": ("interval_ms",)}


def row_fields(source: str) -> tuple[str, ...]:
    """Numeric columns kept for a source, in the order the extractor reads them."""
    return SOURCE_FIELDS[source] + EXTRA_FIELDS[source]


for _s in SOURCES:  # the typed rows and the channel table must agree
    assert set(row_fields(_s)) <= set(ROW_TYPES[_s].__struct_fields__), _s


# --- where msgspec says a decode went wrong ------------------------------------------------
# msgspec names the place at the end of its message: "Expected `int`, got `str` - at `$[2].phase`",
# and a missing field in the text: "Object missing required field `vcpus` - at `$.vm`".
MSGSPEC_AT: Final = re.compile(r" - at `(\$[^`]*)`$")
MSGSPEC_MISSING: Final = re.compile(r"missing required field `([^`]+)`")
_FIRST_FIELD: Final = re.compile(r"\$(?:\[\d+\])?\.([A-Za-z_]\w*)")


def error_path(message: str) -> str | None:
    """The JSON path msgspec blames (``$.accuracy``, ``$[2].phase``, ``$.vm.vcpus``), if any."""
    at = MSGSPEC_AT.search(message)
    missing = MSGSPEC_MISSING.search(message)
    if missing:
        return f"{at.group(1) if at else '$'}.{missing.group(1)}"
    return at.group(1) if at else None


def error_field(message: str) -> str | None:
    """The top-level field of a record msgspec blames (``phase`` for ``$[2].phase``), if any."""
    at = MSGSPEC_AT.search(message)
    if at:
        m = _FIRST_FIELD.match(at.group(1))
        if m:
            return m.group(1)
    missing = MSGSPEC_MISSING.search(message)
    return missing.group(1) if missing else None
