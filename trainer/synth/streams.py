"""Observing the latent activity the way each writer does: /proc of the qemu process, the
guest agent, QMP and the capture box, each with its own clock, rate, jitter and quirks.

Cumulative fields are integrals of latent rates sampled at the row times (so they are
consistent across streams and monotone); gauges are the latent state at the row time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from schema.channels import SOURCE_FIELDS

from .activity import DT, Sim, Tally

U32 = 1 << 32
# Member field order: clocks, then the id/extra fields, then the channel fields in SPEC order.
LEAD_FIELDS = {"proc": ("pid",), "guest": (), "qmp": (), "netflow": ("interval_ms",)}
TAIL_FIELDS = {"proc": (), "guest": (), "qmp": ("status",), "netflow": ()}
FORMATS = {
    "cpu_user_pct": "%.1f",
    "cpu_system_pct": "%.1f",
    "cpu_iowait_pct": "%.1f",
    "load1": "%.2f",
    "status": '"%s"',
}
# Guest counters are relative to the agent's start, so an agent restart resets them.
GUEST_COUNTERS = ("forks_total", "disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes")


def member_fields(source: str) -> tuple[str, ...]:
    return ("t_wall_ns", "t_mono_ns") + LEAD_FIELDS[source] + SOURCE_FIELDS[source] + TAIL_FIELDS[source]


def _template(source: str) -> str:
    return "{" + ",".join(f'"{f}":{FORMATS.get(f, "%d")}' for f in member_fields(source)) + "}\n"


TEMPLATES = {s: _template(s) for s in LEAD_FIELDS}


@dataclass
class Stream:
    source: str
    t: np.ndarray  # true seconds since vm_boot (for defects and truth; never written)
    cols: dict[str, np.ndarray] = field(default_factory=dict)  # every member field, wall/mono included

    def keep(self, mask: np.ndarray) -> None:
        self.t = self.t[mask]
        self.cols = {k: v[mask] for k, v in self.cols.items()}

    def encode(self) -> bytes:
        fields = member_fields(self.source)
        cols = [self.cols[f].tolist() for f in fields]
        tpl = TEMPLATES[self.source]
        return "".join([tpl % row for row in zip(*cols)]).encode()


def row_times(
    rng: np.random.Generator, a: float, b: float, period: float, jitter_sd: np.ndarray | float, drop_p: float
) -> np.ndarray:
    """Nominal ticks from a to b with scheduling jitter (clipped to +-3 sd) and isolated dropped rows."""
    k = np.arange(max(int((b - a) / period), 0))
    t = a + float(rng.uniform(0, period)) + k * period
    sd = (
        np.broadcast_to(np.asarray(jitter_sd, float), t.shape)
        if np.ndim(jitter_sd)
        else np.full(t.shape, float(jitter_sd))
    )
    t = t + np.clip(rng.standard_normal(t.size), -3, 3) * sd
    keep = rng.random(t.size) >= drop_p
    keep[1:] |= ~keep[:-1] & (rng.random(max(t.size - 1, 0)) < 0.9)  # rarely two in a row
    t = t[keep]
    return t[(t >= 0) & (t < b)]


class Observer:
    def __init__(self, rng: np.random.Generator, sim: Sim, started_ns: int) -> None:
        self.rng, self.sim, self.h = rng, sim, sim.host
        self.n = sim.n
        self.started_ns = started_ns
        self.total = sim.benign.plus(sim.mal)
        v = self.h.vcpus
        tot = self.total
        tot["cpu_user"][:] = np.clip(tot["cpu_user"], 0, v)
        tot["cpu_sys"][:] = np.clip(tot["cpu_sys"], 0, v - tot["cpu_user"])
        self.mem_cache = self._memory(tot)
        self.guest_boot_ns = int(rng.uniform(0.3, 1.5) * 1e9)  # guest CLOCK_MONOTONIC at vm_boot

    # --- tools ---------------------------------------------------------------------------
    def _step(self, t: np.ndarray) -> np.ndarray:
        return np.clip((t / DT).astype(np.int64), 0, self.n - 1)

    def integral(self, rate: np.ndarray, t: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(np.clip(rate, 0, None)) * DT])
        return np.interp(t / DT, np.arange(c.size), c)

    def counts(self, rate: np.ndarray, t: np.ndarray) -> np.ndarray:
        """A Poisson counter (forks, syscalls...) read at times t: whole, monotone."""
        c = np.concatenate([[0], np.cumsum(self.rng.poisson(np.clip(rate, 0, None) * DT))])
        return np.floor(np.interp(t / DT, np.arange(c.size), c)).astype(np.int64)

    def _memory(self, T: Tally) -> tuple[np.ndarray, np.ndarray]:
        mem_mb = self.h.mem_mb
        used = np.clip(T["mem"], 40, 0.97 * mem_mb)
        grown = 0.05 * mem_mb * np.clip(self.sim.t / max(self.sim.s.boot_s, 1), 0, 1)
        # the page cache fills with what was read and written, and the kernel reclaims cold pages
        # over minutes: a leaky integral, so the cache level does not simply grow with episode time
        e = math.exp(-DT / 90.0)
        cache = grown + lfilter([0.5 * DT], [1, -e], T["rd"] + 0.3 * T["wr"]) / (1 << 20)
        return used, np.clip(cache, 0, np.maximum(mem_mb - used - 48, 0))

    def clocks(self, t: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        h = self.h
        since_epoch = self.started_ns - h.epoch_ns
        t_ns = np.round(t * 1e9).astype(np.int64)
        if source == "guest":
            wall = self.started_ns + t_ns + h.guest_offset_ns
            mono = self.guest_boot_ns + t_ns
        elif source == "netflow":  # the capture box: its own wall offset and a far-off monotonic base
            wall = self.started_ns + t_ns + h.netflow_offset_ns
            mono = h.netflow_mono_base_ns + since_epoch + t_ns + h.netflow_offset_ns
        else:
            wall = self.started_ns + t_ns
            mono = h.host_mono_base_ns + since_epoch + t_ns
        return wall.astype(np.int64), mono.astype(np.int64)

    def _finish(self, source: str, t: np.ndarray, cols: dict[str, np.ndarray]) -> Stream:
        wall, mono = self.clocks(t, source)
        return Stream(source, t, {"t_wall_ns": wall, "t_mono_ns": mono, **cols})

    # --- the four writers ------------------------------------------------------------------
    def proc(self, end_s: float) -> Stream:
        rng, h, T = self.rng, self.h, self.total
        t = row_times(rng, 0.05, end_s, 0.1, 0.003, 0.002)
        st = self._step(t)
        busy = T["cpu_user"] + T["cpu_sys"]
        ops = T["rd_ops"] + T["wr_ops"]
        pkts = T["pkt_in"] + T["pkt_out"]
        utime = 100 * (busy * 1.01 + 0.004 * h.vcpus)
        stime = 100 * (
            0.006 * h.vcpus
            + ops * 25e-6 / h.cpu_speed
            + pkts * 6e-6 / h.cpu_speed
            + 0.08 * T["cpu_sys"]
            + T["majflt"] * 2e-4
        )
        used, cache = self.mem_cache
        overhead_mb = float(rng.uniform(120, 260))
        touched = np.maximum.accumulate(used + cache)
        if h.os.startswith(
            "windows"
        ):  # Windows zeroes free pages in the background: qemu touches them slowly
            touched = np.maximum(touched, np.minimum(used + cache + self.sim.t * 2.0, 0.9 * h.mem_mb))
            touched = np.maximum.accumulate(touched)
        pool = np.round(np.clip(lfilter([0.01], [1, -0.99], ops) / 150, 0, 32))
        threads = h.vcpus + 3 + pool
        cols = {
            "pid": np.full(t.size, int(rng.integers(1500, 400000)), np.int64),
            "utime_ticks": np.floor(self.integral(utime, t)).astype(np.int64) + int(rng.integers(40, 200)),
            "stime_ticks": np.floor(self.integral(stime, t)).astype(np.int64) + int(rng.integers(20, 90)),
            "rss_kb": np.round((overhead_mb + touched[st]) * 1024 + rng.normal(0, 64, t.size)).astype(
                np.int64
            ),
            "vsize_kb": ((h.mem_mb + 900 + 64 * h.vcpus) * 1024 + threads[st] * 8192).astype(np.int64),
            "num_threads": threads[st].astype(np.int64),
            "read_bytes": (np.floor(self.integral(T["rd"] * h.cache_read_factor, t) / 4096) * 4096).astype(
                np.int64
            ),
            "write_bytes": (np.floor(self.integral(T["wr"] + 300, t) / 4096) * 4096).astype(np.int64),
            "syscr": self.counts(50 * h.vcpus + 1.2 * T["rd_ops"] + 0.6 * T["pkt_in"] + 20, t),
            "syscw": self.counts(30 * h.vcpus + 1.2 * T["wr_ops"] + 0.6 * T["pkt_out"] + 10, t),
            "voluntary_ctxt_switches": self.counts(
                250 * np.clip(h.vcpus - busy, 0, None) + 0.8 * ops + 0.3 * pkts + 40, t
            ),
            "nonvoluntary_ctxt_switches": self.counts(busy * (10 + 300 * h.noise) + 2, t),
            "majflt": self.counts(T["majflt"] + 0.002, t),
        }
        return self._finish("proc", t, cols)

    def qmp(self, end_s: float, shutdown: bool) -> Stream:
        rng, h, T = self.rng, self.h, self.total
        t = row_times(rng, 0.3, end_s, 1.0, 0.005, 0.002)
        t = t + (rng.random(t.size) < 0.04) * rng.uniform(0.05, 0.2, t.size)  # slow QMP replies
        st = self._step(t)
        used, cache = self.mem_cache
        balloon = np.full(self.n, h.mem_mb * 1024.0)
        if h.balloon_auto:  # a manager resizes the balloon every 30 s to demand + headroom
            demand = np.ceil((used + 0.3 * cache + 512) / 256) * 256
            target = np.clip(demand, h.mem_mb / 2, h.mem_mb) * 1024
            tick = (np.arange(self.n) // 300) * 300
            balloon = target[tick]
        busy = T["cpu_user"] + T["cpu_sys"] + 0.003 * h.vcpus
        status = np.full(t.size, "running", dtype=object)
        if shutdown and t.size:
            status[-1] = "shutdown"
        cols = {
            "vcpu_time_ns": np.floor(self.integral(busy * 1e9, t)).astype(np.int64),
            "blk_rd_bytes": (np.floor(self.integral(T["rd"], t) / 512) * 512).astype(np.int64),
            "blk_wr_bytes": (np.floor(self.integral(T["wr"], t) / 512) * 512).astype(np.int64),
            "blk_rd_ops": self.counts(T["rd_ops"], t),
            "blk_wr_ops": self.counts(T["wr_ops"], t),
            "net_rx_bytes": np.floor(self.integral(T["rx"], t)).astype(np.int64),
            "net_tx_bytes": np.floor(self.integral(T["tx"], t)).astype(np.int64),
            "balloon_actual_kb": balloon[st].astype(np.int64),
            "status": status,
        }
        return self._finish("qmp", t, cols)

    def netflow(self, end_s: float) -> Stream:
        rng, T = self.rng, self.total
        ends = 0.1 + float(rng.uniform(0, 0.1)) + np.arange(max(int(end_s / 0.1) - 1, 0)) * 0.1
        ends = ends + rng.normal(0, 0.0008, ends.size)
        ends = ends[ends < end_s]
        starts = np.concatenate([[ends[0] - 0.1] if ends.size else [], ends[:-1]])
        keep = (
            rng.random(ends.size) >= 0.001
        )  # the box drops a rare interval; its neighbours still cover time
        ends, starts = ends[keep], starts[keep]

        def over(key: str) -> np.ndarray:
            return np.clip(self.integral(T[key], ends) - self.integral(T[key], starts), 0, None)

        pin, pout = rng.poisson(over("pkt_in")), rng.poisson(over("pkt_out"))
        est = np.minimum(np.round(T["tcp_est"][self._step(ends)]), 2).astype(np.int64)
        flows = rng.poisson(over("flows"))
        ips = np.minimum(pout, rng.poisson(over("ips")) + (pout > 0) * est + (flows > 0))
        ports = np.minimum(pout, rng.poisson(over("ports")) + (pout > 0) * est + (flows > 0))
        cols = {
            "interval_ms": np.round((ends - starts) * 1000).astype(np.int64),
            "pkts_in": pin,
            "pkts_out": pout,
            "bytes_in": np.where(
                pin > 0, np.maximum(np.round(over("rx") * rng.normal(1, 0.01, ends.size)), 60 * pin), 0
            ).astype(np.int64),
            "bytes_out": np.where(
                pout > 0, np.maximum(np.round(over("tx") * rng.normal(1, 0.01, ends.size)), 60 * pout), 0
            ).astype(np.int64),
            "flows_new": flows,
            "uniq_dst_ips": ips,
            "uniq_dst_ports": ports,
            "syn_out": rng.poisson(over("syn")),
            "rst_in": rng.poisson(over("rst")),
            "dns_queries": rng.poisson(over("dns")),
        }
        return self._finish("netflow", ends, {k: np.asarray(v, np.int64) for k, v in cols.items()})

    def guest(
        self,
        start_s: float,
        end_s: float,
        hide_from_s: float | None,
        restarts: list[float],
        net_offset: int | None,
    ) -> Stream:
        """The in-guest agent. ``hide_from_s``: a rootkit hides the sample from then on.
        ``restarts``: agent restarts (counters go back to zero). ``net_offset``: a 32-bit
        guest whose raw net counters start at that value and wrap at 2**32."""
        rng, h, sim = self.rng, self.h, self.sim
        v = h.vcpus
        if hide_from_s is None:
            G = self.total
        else:
            hidden = (sim.t < hide_from_s).astype(float)
            G = sim.benign.plus(sim.mal, hidden)
            G["cpu_user"][:] = np.clip(G["cpu_user"], 0, v)
            G["cpu_sys"][:] = np.clip(G["cpu_sys"], 0, v - G["cpu_user"])
        busy = G["cpu_user"] + G["cpu_sys"]
        load_share = np.clip(self.total["cpu_user"] / v, 0, 1)  # a busy guest schedules its agent late
        t = row_times(rng, start_s, end_s, 0.1, 0.003, 0.002)
        t = t + np.clip(rng.standard_normal(t.size), -3, 3) * 0.003 * 2 * load_share[self._step(t)]
        t = np.sort(t)
        for r in restarts:  # systemd restarts the agent: a short hole
            t = t[(t < r) | (t > r + float(rng.uniform(0.3, 0.8)))]
        st = self._step(t)
        prev = np.concatenate([[t[0] - 0.1] if t.size else [], t[:-1]])
        span = np.maximum(t - prev, 0.02)

        def pct(rate: np.ndarray) -> np.ndarray:
            p = (self.integral(rate, t) - self.integral(rate, prev)) / span / v * 100
            return np.clip(p + rng.normal(0, 0.3, t.size), 0, 100)

        used, cache = self._memory(G)
        active = busy + G["iowait"]
        e = math.exp(-5 / 60)  # the kernel folds load every 5 s
        k5 = np.arange(0, self.n, 50)
        load5 = lfilter([1 - e], [1, -e], active[k5])
        load = load5[np.minimum(np.arange(self.n) // 50, load5.size - 1)]
        cols: dict[str, np.ndarray] = {
            "cpu_user_pct": pct(G["cpu_user"]),
            "cpu_system_pct": pct(G["cpu_sys"]),
            "cpu_iowait_pct": pct(np.clip(G["iowait"], 0, v)),
            "mem_used_kb": np.round(used[st] * 1024 + rng.normal(0, 300, t.size)).astype(np.int64),
            "mem_cached_kb": np.round(cache[st] * 1024).astype(np.int64),
            "load1": load[st],
            "procs_running": 1 + rng.poisson(busy[st]),
            "procs_blocked": rng.poisson(np.clip(G["iowait"][st], 0, None)),
            "procs_total": np.maximum(np.round(G["procs"][st]) + rng.integers(-1, 2, t.size), 1).astype(
                np.int64
            ),
            "forks_total": self.counts(G["forks"], t),
            "disk_read_bytes": np.floor(self.integral(G["rd"], t)).astype(np.int64),
            "disk_write_bytes": np.floor(self.integral(G["wr"], t)).astype(np.int64),
            "net_rx_bytes": np.floor(self.integral(G["rx"], t)).astype(np.int64),
            "net_tx_bytes": np.floor(self.integral(G["tx"], t)).astype(np.int64),
            "tcp_established": np.maximum(np.round(G["tcp_est"][st]) + rng.poisson(0.2, t.size), 0).astype(
                np.int64
            ),
            "tcp_syn_sent": np.maximum(np.round(G["tcp_syn"][st]), 0).astype(np.int64),
        }
        # counters count from the agent's (re)start
        epoch = np.searchsorted(np.asarray(restarts), t) if restarts else np.zeros(t.size, int)
        for f in GUEST_COUNTERS:
            if net_offset is not None and f.startswith("net_"):
                cols[f] = (cols[f] + net_offset) % U32
                continue
            c = cols[f]
            for j in range(len(restarts) + 1):
                m = epoch == j
                if m.any():
                    c[m] -= c[m][0]
            cols[f] = c
        return self._finish("guest", t, cols)
