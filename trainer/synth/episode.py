"""One episode: schedule, activity, the four streams, labels and events, then the defect
its plan asks for, made the way it happens in life. Returns member bytes plus a truth record.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from schema.vocab import DONE_MEMBER, EVENTS_MEMBER, LABELS_MEMBER, META_MEMBER, PCAP_MEMBER, SOURCE_MEMBER

from .activity import Schedule, make_schedule, simulate
from .plan import EpisodeSpec
from .streams import GUEST_COUNTERS, U32, Observer, Stream

PHASE_EVENT = {
    "armed": "sample_drop",
    "infecting": "sample_exec",
    "infected_running": "payload_start",
    "dormant": "payload_sleep",
}
# Old orchestrator builds wrote these names; the vocabulary has never had them.
LEGACY_PHASE = {"infected_running": "infected", "dormant": "sleeping"}
PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # libpcap, Ethernet


def _jsonl(objs: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs).encode()


def _labels_events(
    spec: EpisodeSpec, sched: Schedule, rng: np.random.Generator, shutdown: bool
) -> tuple[list, list]:
    ns = spec.started_ns
    labels, events = [], []
    events.append({"t_wall_ns": ns, "kind": "vm_boot", "vcpus": spec.host.vcpus, "mem_mb": spec.host.mem_mb})
    sid = spec.sample.sample_id if spec.sample else None
    for phase, a, _ in sched.phases:
        t = ns + int(round(a * 1e9))
        labels.append({"t_wall_ns": t, "phase": phase})
        kind = PHASE_EVENT.get(phase)
        if kind:
            ev: dict[str, Any] = {
                "t_wall_ns": t + int(rng.integers(0, 3_000_000)),
                "kind": kind,
                "sample_id": sid,
            }
            if kind == "sample_drop":
                ev["path"] = f"/var/tmp/.cache/{sid}"
            events.append(ev)
    if shutdown:
        events.append(
            {
                "t_wall_ns": ns + int(round(sched.shutdown_s * 1e9)),
                "kind": "vm_shutdown",
                "reason": "schedule",
            }
        )
    return labels, events


def _sparse_mask(rng: np.random.Generator, n: int, keep: float) -> np.ndarray:
    """Losses come in runs (a stalled writer), not as independent coin flips."""
    runs = np.repeat(rng.random(n // 20 + 1) < keep, 20)[:n]
    return runs | (rng.random(n) < 0.05)


def _corrupt_lines(rng: np.random.Generator, data: bytes, source: str, how: str) -> bytes:
    lines = data.split(b"\n")
    if len(lines) < 10:
        return data
    i = int(rng.integers(1, len(lines) - 3))
    if how == "partial_flush":  # a writer restarted mid-line: half a row glued to the next one
        lines[i] = lines[i][: int(rng.integers(5, max(6, len(lines[i]) - 5)))] + lines[i + 1]
        del lines[i + 1]
    elif how == "nan":  # a buggy agent formats a float it never computed
        field = b'"load1":' if source == "guest" else b'"t_mono_ns":'
        j = lines[i].find(field)
        if j >= 0:
            k = lines[i].find(b",", j)
            lines[i] = lines[i][: j + len(field)] + b"NaN" + lines[i][k:]
    else:  # non-UTF-8 bytes from a corrupted buffer
        j = int(rng.integers(1, len(lines[i]) - 1))
        lines[i] = lines[i][:j] + b"\xff\xfe\x00\x9c" + lines[i][j + 4 :]
    return b"\n".join(lines)


def build_episode(spec: EpisodeSpec) -> tuple[dict[str, bytes], dict[str, Any]]:
    rng = np.random.default_rng([spec.seed, spec.index, 1])
    h, d = spec.host, spec.defect
    sched = make_schedule(rng, spec.sample is not None, h, too_short=d == "too_short")
    sim, loads = simulate(rng, h, sched, spec.sample)
    infected = spec.sample is not None and len(sched.phases) > 1
    obs = Observer(rng, sim, spec.started_ns)
    T = sched.duration_s
    truth: dict[str, Any] = {
        "episode_id": spec.episode_id,
        "host": h.host_id,
        "index": spec.index,
        "profile": spec.profile,
        "sample": spec.sample.name if spec.sample else None,
        "sample_id": spec.sample.sample_id if spec.sample else None,
        "outcome": spec.outcome,
        "defect": d,
        "clean_only": not infected and d != "too_short",
        "duration_s": round(T, 3),
        "phases": [[p, round(a, 3), round(b, 3)] for p, a, b in sched.phases],
        "workloads": [[w, round(a, 3), round(b, 3)] for w, a, b in loads],
        "guest_lies": False,
        "counter_resets": [],
    }

    # the guest agent: maybe a rootkit blinds it, maybe it restarts, maybe it is 32-bit
    hide = None
    if infected and rng.random() < 0.15:
        hide = sched.starts("infecting")[0] + float(rng.uniform(3, 20))
        truth["guest_lies"] = True
    restarts = []
    if T > 60 and rng.random() < 0.05:
        restarts = [float(rng.uniform(0.3, 0.8) * T)]
        truth["counter_resets"] += [
            f"guest.{f}" for f in GUEST_COUNTERS if not (h.net32 and f.startswith("net_"))
        ]
    net_offset = int(rng.integers(0, U32)) if h.net32 else None
    guest_end = sched.shutdown_s
    if d == "guest_agent_died":
        later = [a for p, a, _ in sched.phases if p in ("infecting", "infected_running")]
        guest_end = float(rng.uniform(0.3, 0.6) * T) if not later else min(later[-1] + 5, 0.6 * T)
        guest_end = max(guest_end, sched.agent_start_s + 20)

    streams: dict[str, Stream] = {
        "proc": obs.proc(T),
        "guest": obs.guest(sched.agent_start_s, guest_end, hide, restarts, net_offset),
        "qmp": obs.qmp(T, shutdown=d != "collector_crash"),
        "netflow": obs.netflow(T),
    }
    if net_offset is not None:
        for f in ("net_rx_bytes", "net_tx_bytes"):
            c = streams["guest"].cols[f]
            if c.size and np.any(np.diff(c) < 0):
                truth["counter_resets"].append(f"guest.{f}")

    shutdown = True
    ended_ns = spec.started_ns + int(round(T * 1e9))
    crash_t = None
    if d == "collector_crash":
        crash_t = float(rng.uniform(0.7, 0.95) * T)
        for s in streams.values():
            s.keep(s.t < crash_t)
        shutdown = False
        # meta.json is rewritten by a 30-s heartbeat; the last one survives the crash
        ended_ns = spec.started_ns + int(crash_t // 30 * 30 * 1e9)
    elif d == "long_gap":
        g0 = float(rng.uniform(0.25, 0.7) * T)
        g1 = g0 + float(rng.uniform(20, 45))
        for s in streams.values():
            s.keep((s.t < g0) | (s.t >= g1))
        truth["gap_s"] = [round(g0, 3), round(g1, 3)]
    elif d == "netflow_sparse":
        streams["netflow"].keep(_sparse_mask(rng, streams["netflow"].t.size, float(rng.uniform(0.15, 0.35))))
    elif d == "qmp_sparse":
        streams["qmp"].keep(_sparse_mask(rng, streams["qmp"].t.size, float(rng.uniform(0.15, 0.3))))
    elif d == "proc_sparse":  # the sampler fell back to one row every 1-2 s
        step = int(rng.integers(10, 21))
        streams["proc"].keep(np.arange(streams["proc"].t.size) % step == 0)
    gone = {"guest_missing": "guest", "netflow_missing": "netflow", "missing_proc": "proc"}.get(d)
    streams = {
        k: s for k, s in streams.items() if k != gone and s.t.size
    }  # a writer with no row never creates its file

    labels, events = _labels_events(spec, sched, rng, shutdown)
    if crash_t is not None:
        cut = spec.started_ns + int(crash_t * 1e9)
        labels = [x for x in labels if x["t_wall_ns"] < cut]
        events = [x for x in events if x["t_wall_ns"] < cut]
    if d == "clock_step":  # NTP steps the host clock back past the previous label
        (_p, a, b) = next(ph for ph in sched.phases if ph[0] == "infected_running")
        ts = float(rng.uniform(a + 3, b - 3))
        back = int((b - a + float(rng.uniform(5, 120))) * 1e9)  # past the label before
        step_at = spec.started_ns + int(ts * 1e9)
        for x in labels + events:
            if x["t_wall_ns"] > step_at:
                x["t_wall_ns"] -= back
        for src in ("proc", "qmp"):
            if src in streams:
                s = streams[src]
                s.cols["t_wall_ns"] = np.where(s.t > ts, s.cols["t_wall_ns"] - back, s.cols["t_wall_ns"])
        ended_ns -= back
        truth["clock_step_ns"] = -back
    if d == "unknown_phase":
        for x in labels:
            x["phase"] = LEGACY_PHASE.get(x["phase"], x["phase"])

    meta = {
        "episode_id": spec.episode_id,
        "host_id": h.host_id,
        "schema_version": 1,
        "sample_id": spec.sample.sample_id if spec.sample else None,
        "profile": spec.profile,
        "started_ns": spec.started_ns,
        "ended_ns": ended_ns,
        "vm": {"vcpus": h.vcpus, "mem_mb": h.mem_mb, "os": h.os},
        "collector": h.collector,
    }
    members: dict[str, bytes] = {
        META_MEMBER: json.dumps(meta, indent=2).encode() + b"\n",
        LABELS_MEMBER: _jsonl(labels),
        EVENTS_MEMBER: _jsonl(events),
    }
    for src in ("proc", "guest", "qmp", "netflow"):
        if src in streams:
            members[SOURCE_MEMBER[src]] = streams[src].encode()
    if d == "collector_crash":  # the last write of some streams was only half flushed
        for name in list(members)[3:]:
            if (name == "telemetry-proc.jsonl" or rng.random() < 0.5) and members[name]:
                body = members[name][:-1]
                cut_at = body.rfind(b"\n") + 1
                members[name] = body[: cut_at + int(rng.integers(3, max(4, len(body) - cut_at)))]
    elif d == "malformed_lines":
        kinds = []
        for _ in range(int(rng.integers(1, 6))):
            how = str(rng.choice(["partial_flush", "nan", "non_utf8"]))
            src = "guest" if how == "nan" else str(rng.choice(list(streams)))
            members[SOURCE_MEMBER[src]] = _corrupt_lines(rng, members[SOURCE_MEMBER[src]], src, how)
            kinds.append(f"{src}:{how}")
        truth["malformed"] = kinds
    elif d == "meta_garbage":  # the collector's disk lost the file's blocks
        members[META_MEMBER] = b"\x00" * len(members[META_MEMBER])
    if h.pcap:
        members[PCAP_MEMBER] = PCAP_HEADER
    if d != "collector_crash":
        members[DONE_MEMBER] = b""
    truth["rows"] = {src: int(s.t.size) for src, s in streams.items()}
    return members, truth


def generate_episode(spec: EpisodeSpec) -> dict[str, bytes]:
    """Member name -> file bytes of one episode, before packing."""
    return build_episode(spec)[0]
