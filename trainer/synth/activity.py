"""What happens inside a VM, as latent rates on a 10 Hz step grid of true episode time.

The simulator adds up independent causes (idle OS, boot, benign workloads, the malware's
phases); the stream writers (streams.py) then observe these rates the way /proc, the
guest agent, QMP and the capture box would. Benign and malicious activity are kept in
separate tallies because an infected guest's agent may hide the malicious one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from .catalog import WORKLOADS, Host, MiB, Sample

DT = 0.1  # seconds per latent step

# Latent keys. Rates are per second; mem/cache/procs/tcp_* are gauges (additive offsets).
KEYS = (
    "cpu_user",
    "cpu_sys",
    "iowait",  # vCPUs busy (1.0 = one vCPU), iowait in vCPUs waiting
    "rd",
    "wr",
    "rd_ops",
    "wr_ops",  # guest block I/O, B/s and ops/s
    "rx",
    "tx",
    "pkt_in",
    "pkt_out",  # guest NIC, B/s and packets/s (in = towards the VM)
    "flows",
    "syn",
    "rst",
    "dns",
    "ips",
    "ports",  # new flows, SYNs out, RSTs in, DNS queries, distinct peers/ports per s
    "forks",
    "majflt",  # forks/s in the guest, host major faults/s
    "mem",
    "procs",
    "tcp_est",
    "tcp_syn",  # gauges: MB used, processes, connections
)
MTU_PAYLOAD = 1350.0  # mean bytes of a bulk packet


@dataclass
class Schedule:
    duration_s: float
    phases: list[tuple[str, float, float]]  # (phase, start_s, end_s), contiguous from 0
    boot_s: float
    agent_start_s: float
    shutdown_s: float  # vm_shutdown event, a little before the end

    def starts(self, phase: str) -> list[float]:
        return [a for p, a, _ in self.phases if p == phase]


def make_schedule(rng: np.random.Generator, infected: bool, host: Host, too_short: bool = False) -> Schedule:
    boot_s = float(rng.uniform(8, 20) / host.cpu_speed)
    if too_short:  # the VM never finished booting; the orchestrator gave up
        dur = float(rng.uniform(3.0, 8.0))
        return Schedule(dur, [("clean", 0.0, dur)], boot_s, dur + 1, dur - 0.5)
    total = float(rng.uniform(180, 480))
    if not infected:
        phases = [("clean", 0.0, total)]
    else:
        t = float(rng.uniform(20, 60))
        phases = [("clean", 0.0, t)]
        # armed and infecting last long enough that several 10-s windows sit wholly inside them
        for p, lo, hi in (("armed", 20, 60), ("infecting", 20, 60)):
            d = float(rng.uniform(lo, hi))
            phases.append((p, t, t + d))
            t += d
        total = max(total, t + 40.0)  # always some payload after the install
        p = "infected_running"
        while t < total:
            d = float(rng.uniform(20, 90))
            if total - (t + d) < 20:  # no stub segment at the end
                d = max(total - t, 20.0)
            phases.append((p, t, t + d))
            t += d
            p = "dormant" if p == "infected_running" else "infected_running"
        total = phases[-1][2]
    return Schedule(total, phases, boot_s, float(rng.uniform(3, 7)), total - float(rng.uniform(1.0, 2.5)))


@dataclass
class Tally:
    n: int
    a: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.a = {k: np.zeros(self.n) for k in KEYS}

    def __getitem__(self, k: str) -> np.ndarray:
        return self.a[k]

    def __setitem__(self, k: str, v: np.ndarray) -> None:  # for `T[k] += x`
        self.a[k] = v

    def plus(self, other: Tally, weight: np.ndarray | float = 1.0) -> Tally:
        out = Tally(self.n)
        for k in KEYS:
            out.a[k] = self.a[k] + other.a[k] * weight
        return out


class Sim:
    def __init__(self, rng: np.random.Generator, host: Host, sched: Schedule) -> None:
        self.rng, self.host, self.s = rng, host, sched
        self.n = int(math.ceil(sched.duration_s / DT)) + 1
        self.t = np.arange(self.n) * DT
        self.benign = Tally(self.n)
        self.mal = Tally(self.n)

    # --- small tools -------------------------------------------------------------
    def sl(self, a_s: float, b_s: float) -> slice:
        return slice(min(self.n, max(0, int(round(a_s / DT)))), min(self.n, max(0, int(round(b_s / DT)))))

    def ar(self, tau_s: float, n: int | None = None) -> np.ndarray:
        """Unit-variance AR(1) noise with time constant tau_s."""
        n = self.n if n is None else n
        a = math.exp(-DT / max(tau_s, DT))
        z = self.rng.standard_normal(n)
        return lfilter([math.sqrt(1 - a * a)], [1, -a], z)

    def wobble(self, tau_s: float, sigma: float, n: int | None = None) -> np.ndarray:
        """Multiplicative noise around 1 (log-normal, mean 1)."""
        return np.exp(sigma * self.ar(tau_s, n) - sigma * sigma / 2)

    def pulse(self, T: Tally, key: str, t_s: float, amount: float, dur_s: float = DT) -> None:
        """Spread an amount (bytes, forks, queries...) evenly over [t_s, t_s + dur_s)."""
        s = self.sl(t_s, t_s + max(dur_s, DT))
        k = s.stop - s.start
        if k > 0:
            T[key][s] += amount / (k * DT)

    def transfer(
        self,
        T: Tally,
        t_s: float,
        rx: float = 0.0,
        tx: float = 0.0,
        dur_s: float = 0.3,
        new_flow: bool = True,
        dns: bool = False,
    ) -> None:
        """One network exchange: bytes both ways, their packets and ACKs, maybe a DNS lookup first."""
        d = max(dur_s, DT)
        rxp, txp = rx / MTU_PAYLOAD + 2, tx / MTU_PAYLOAD + 2
        self.pulse(T, "rx", t_s, rx + 66 * (txp / 2 + 2), d)
        self.pulse(T, "tx", t_s, tx + 66 * (rxp / 2 + 2), d)
        self.pulse(T, "pkt_in", t_s, rxp + txp / 2 + 2, d)
        self.pulse(T, "pkt_out", t_s, txp + rxp / 2 + 2, d)
        if new_flow:
            for k in ("flows", "syn", "ips", "ports"):
                self.pulse(T, k, t_s, 1.0, DT)
        if dns:
            self.pulse(T, "dns", t_s - 0.05, 1.0, DT)
            self.pulse(T, "pkt_out", t_s - 0.05, 1.0, DT)
            self.pulse(T, "pkt_in", t_s - 0.05, 1.0, DT)
            self.pulse(T, "tx", t_s - 0.05, 80.0, DT)
            self.pulse(T, "rx", t_s - 0.05, 160.0, DT)
            self.pulse(T, "flows", t_s - 0.05, 1.0, DT)

    def bulk(self, T: Tally, s: slice, rx: np.ndarray | float = 0.0, tx: np.ndarray | float = 0.0) -> None:
        """A sustained stream over a slice: B/s arrays or scalars, with their packets and ACKs."""
        rxp = np.asarray(rx) / MTU_PAYLOAD
        txp = np.asarray(tx) / MTU_PAYLOAD
        T["rx"][s] += rx + 66 * txp / 2
        T["tx"][s] += tx + 66 * rxp / 2
        T["pkt_in"][s] += rxp + txp / 2
        T["pkt_out"][s] += txp + rxp / 2

    def poisson_times(self, rate: float, a_s: float, b_s: float) -> np.ndarray:
        if b_s <= a_s:
            return np.zeros(0)
        k = self.rng.poisson(max(rate, 0.0) * (b_s - a_s))
        return np.sort(self.rng.uniform(a_s, b_s, k))

    def periodic(self, period: float, jitter: float, a_s: float, b_s: float) -> list[float]:
        out, t = [], a_s + float(self.rng.uniform(0, period))
        while t < b_s:
            out.append(t)
            t += period * max(0.2, 1 + jitter * float(self.rng.standard_normal()))
        return out

    # --- the idle OS and its boot ------------------------------------------------------
    def base(self) -> None:
        h, B, rng, n = self.host, self.benign, self.rng, self.n
        v = h.vcpus
        windows = h.os.startswith("windows")
        idle = h.idle_cpu * v * float(rng.lognormal(0, 0.25))  # some images idle hotter than others
        B["cpu_user"] += idle * self.wobble(5.0, 0.5)
        B["cpu_sys"] += 0.5 * idle * self.wobble(3.0, 0.5)
        for t in self.poisson_times(0.08 if not windows else 0.2, 0, self.s.duration_s):  # daemons waking up
            self.pulse(B, "cpu_user", t, float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.2, 1.5)))
        for t in np.arange(float(rng.uniform(0, 5)), self.s.duration_s, 5.0):  # journal / registry flush
            size = float(rng.lognormal(math.log(60e3), 0.7))
            self.pulse(B, "wr", t, size)
            self.pulse(B, "wr_ops", t, max(1.0, size / 16e3))
        for t in self.poisson_times(0.3, 0, self.s.duration_s):
            size = float(rng.lognormal(math.log(32e3), 1.0))
            self.pulse(B, "rd", t, size)
            self.pulse(B, "rd_ops", t, max(1.0, size / 32e3))
        for t in np.arange(float(rng.uniform(0, 60)), self.s.duration_s, 60.0):  # cron
            self.pulse(B, "forks", t, float(rng.integers(3, 15)), 1.0)
            self.pulse(B, "cpu_user", t, 0.3, 1.0)
        B["forks"] += 0.2 * self.wobble(20, 0.5)
        bcast = float(rng.uniform(1, 6))  # ARP, mDNS, broadcast chatter on the bridge
        B["pkt_in"] += bcast * self.wobble(2, 0.4)
        B["rx"] += 90 * bcast * self.wobble(2, 0.4)
        for t in self.poisson_times(0.05 if not windows else 0.15, self.s.boot_s, self.s.duration_s):
            self.transfer(B, t, rx=float(rng.lognormal(7.5, 1)), tx=float(rng.lognormal(6.5, 0.8)), dns=True)
        # memory: boot ramps to a baseline that drifts a little
        used0 = h.mem_mb * float(rng.uniform(0.25, 0.4) if windows else rng.uniform(0.12, 0.28))
        ramp = np.clip(self.t / max(self.s.boot_s, 1.0), 0.08, 1.0)
        B["mem"] += used0 * ramp * (1 + 0.02 * self.ar(30))
        procs0 = h.baseline_procs + int(rng.integers(-8, 9))
        B["procs"] += np.round(
            procs0 * ramp + np.cumsum(rng.choice([-1, 0, 0, 0, 1], n) * (rng.random(n) < 0.01))
        )
        B["tcp_est"] += np.where(self.t > self.s.boot_s, 1 + int(rng.integers(0, 3)), 0)

    def boot(self) -> None:
        h, B, rng = self.host, self.benign, self.rng
        s = self.sl(0, self.s.boot_s)
        k = s.stop - s.start
        if k <= 0:
            return
        decay = np.linspace(1.0, 0.2, k)
        B["cpu_user"][s] += 0.7 * h.vcpus * decay * self.wobble(0.8, 0.3, k)
        B["cpu_sys"][s] += 0.2 * h.vcpus * decay
        rd = min(h.disk_Bps * 0.5, 80e6) * decay * self.wobble(1.0, 0.4, k)
        B["rd"][s] += rd
        B["rd_ops"][s] += rd / 48e3
        B["iowait"][s] += 0.3 * decay
        B["forks"][s] += 60 * decay * self.wobble(1.0, 0.5, k)
        B["majflt"][s] += 40 * decay
        for _j in range(int(rng.integers(2, 6))):  # DHCP, NTP and the first lookups
            self.transfer(B, self.s.boot_s * float(rng.uniform(0.6, 1.0)), rx=600, tx=300, dns=True)

    # --- benign workloads --------------------------------------------------------------
    def workloads(self) -> list[tuple[str, float, float]]:
        h, rng = self.host, self.rng
        names = [w for w in WORKLOADS if h.workload_mix.get(w, 0) > 0]
        p = np.array([h.workload_mix[w] for w in names])
        p = p / p.sum()
        t = self.s.boot_s + float(rng.uniform(0, 20))
        out = []
        lengths = {
            "idle": (15, 100),
            "build": (30, 150),
            "backup": (40, 200),
            "update": (30, 120),
            "discovery": (5, 20),
        }
        while t < self.s.duration_s:
            w = str(rng.choice(names, p=p))
            lo, hi = lengths[w]
            d = float(rng.uniform(lo, hi)) / (h.cpu_speed if w == "build" else 1.0)
            b = min(t + d, self.s.duration_s)
            if w != "idle":
                getattr(self, "w_" + w)(t, b)
                out.append((w, t, b))
            t = b + float(rng.exponential(140))  # lab VMs idle most of the time between jobs
        if h.heartbeat_s:
            for t in self.periodic(h.heartbeat_s, 0.03, self.s.boot_s, self.s.duration_s):
                self.transfer(
                    self.benign,
                    t,
                    rx=float(rng.uniform(400, 1200)),
                    tx=float(rng.uniform(1000, 3000)),
                    dns=rng.random() < 0.25,
                )
                self.pulse(self.benign, "cpu_user", t, 0.03, 0.3)
                self.pulse(self.benign, "forks", t, 1.0)
        return out

    def w_build(self, a: float, b: float) -> None:
        h, B, rng = self.host, self.benign, self.rng
        s = self.sl(a, b)
        k = s.stop - s.start
        jobs = int(rng.integers(1, min(h.vcpus, 4) + 1))  # make -j caps at 4 in the lab images
        busy = np.zeros(k)
        for _ in range(jobs):  # each job alternates compile units and short gaps
            on = (self.ar(1.5, k) > -1.0).astype(float)
            busy += on * np.clip(0.8 + 0.15 * self.ar(0.5, k), 0.2, 1.0)
        link = slice(s.start + int(0.88 * k), s.stop)
        busy[int(0.88 * k) :] = np.clip(busy[int(0.88 * k) :], 0, 1.0)  # the link step runs alone
        B["cpu_user"][s] += busy
        B["cpu_sys"][s] += 0.15 * busy
        B["forks"][s] += busy * float(rng.uniform(6, 25)) * self.wobble(1, 0.5, k)
        B["procs"][s] += np.round(2 * busy)
        B["mem"][s] += busy * float(rng.uniform(60, 220)) * np.abs(self.ar(3, k))
        B["mem"][link] += float(rng.uniform(100, 500))
        rd = float(rng.uniform(0.3, 4)) * 1e6 * self.wobble(2, 0.6, k)
        B["rd"][s] += rd
        B["rd_ops"][s] += rd / 24e3
        wr = float(rng.uniform(1, 15)) * 1e6 * (self.ar(2, k) > 0.5) * self.wobble(1, 0.5, k)
        B["wr"][s] += wr
        B["wr_ops"][s] += wr / 96e3
        B["iowait"][s] += 0.02 * jobs

    def w_backup(self, a: float, b: float) -> None:
        h, B, rng = self.host, self.benign, self.rng
        s = self.sl(a, b)
        k = s.stop - s.start
        rate = min(h.disk_Bps * float(rng.uniform(0.15, 0.55)), 160e6) * self.wobble(4, 0.35, k)
        rate *= self.ar(3, k) > -1.3  # short stalls between big files
        B["rd"][s] += rate
        B["rd_ops"][s] += rate / float(rng.uniform(128e3, 1e6))
        B["cpu_user"][s] += np.clip(float(rng.uniform(0.3, 1.0)) / h.cpu_speed, 0, 1) * (rate > 0)
        B["cpu_sys"][s] += 0.1
        B["iowait"][s] += float(rng.uniform(0.2, 0.6)) * (rate > 0)
        B["procs"][s] += 2
        B["mem"][s] += float(rng.uniform(30, 120))
        out = 0.35 * rate
        if rng.random() < 0.5:  # local archive, written in chunks
            chunk = (self.ar(1, k) > 0.3).astype(float)
            B["wr"][s] += out * chunk / max(chunk.mean(), 0.1)
            B["wr_ops"][s] += out * chunk / max(chunk.mean(), 0.1) / 512e3
        else:  # remote target: one long upload
            up = np.minimum(out, 0.8 * h.nic_Bps)
            self.bulk(B, s, tx=up)
            self.transfer(B, a, rx=500, tx=500, dns=True)
            B["tcp_est"][s] += 1
        self.pulse(B, "forks", a, 3.0, 1.0)

    def w_update(self, a: float, b: float) -> None:
        h, B, rng = self.host, self.benign, self.rng
        install = float(rng.uniform(0.2, 0.4)) * (b - a)
        t = a + 0.5
        for _ in range(int(rng.integers(2, 8))):
            self.transfer(B, a + float(rng.uniform(0, 1.0)), rx=400, tx=200, new_flow=False, dns=True)
        while t < b - install:
            size = float(rng.lognormal(math.log(2.5e6), 1.2))
            rate = min(0.9 * h.nic_Bps, float(rng.uniform(2e6, 40e6)))
            d = size / rate
            s = self.sl(t, t + d)
            self.bulk(B, s, rx=rate * self.wobble(0.5, 0.3, s.stop - s.start))
            self.transfer(B, t, rx=2000, tx=800, new_flow=rng.random() < 0.6, dns=rng.random() < 0.3)
            self.pulse(B, "wr", t + d + float(rng.uniform(0.5, 5)), size, 1.0)
            self.pulse(B, "wr_ops", t + d + 1, size / 256e3, 1.0)
            B["cpu_user"][s] += 0.05
            B["tcp_est"][s] += 1
            t += d + float(rng.uniform(0.2, 6))
        s = self.sl(b - install, b)
        k = s.stop - s.start
        busy = np.clip(float(rng.uniform(0.5, 1.3)) * self.wobble(1, 0.6, k) / h.cpu_speed, 0, h.vcpus)
        B["cpu_user"][s] += busy
        B["cpu_sys"][s] += 0.3 * busy
        B["forks"][s] += float(rng.uniform(15, 70)) * self.wobble(1, 0.6, k)
        wr = float(rng.uniform(5, 40)) * 1e6 * self.wobble(1, 0.7, k)
        B["wr"][s] += wr
        B["wr_ops"][s] += wr / 20e3
        B["iowait"][s] += 0.2
        B["procs"][s] += 3

    def w_discovery(self, a: float, b: float) -> None:
        B, rng = self.benign, self.rng
        s = self.sl(a, b)
        k = s.stop - s.start
        syn = float(rng.uniform(60, 300)) * self.wobble(1, 0.3, k)
        B["syn"][s] += syn
        B["flows"][s] += syn
        B["ips"][s] += 0.9 * syn
        B["ports"][s] += np.minimum(syn, 20.0)
        B["rst"][s] += 0.3 * syn
        B["pkt_out"][s] += syn
        B["pkt_in"][s] += 0.5 * syn
        B["tx"][s] += 60 * syn
        B["rx"][s] += 50 * syn
        B["tcp_syn"][s] += 0.5 * syn
        B["cpu_user"][s] += 0.05

    # --- the malware ---------------------------------------------------------------------
    def malware(self, sample: Sample, intensity: float) -> np.ndarray:
        """Adds the sample's activity; returns the 'payload on' mask (infected_running)."""
        M, rng, h, s = self.mal, self.rng, self.host, self.s
        on = np.zeros(self.n, bool)
        for p, a, b in s.phases:
            if p == "infected_running":
                on[self.sl(a + float(rng.uniform(0.2, 2.0)), b + float(rng.uniform(0, 1.0)))] = True
        (drop,) = s.starts("armed")
        (exe,) = s.starts("infecting")
        run0 = s.starts("infected_running")[0]
        end = s.duration_s
        # armed: the file arrives and lands on disk; a stub process waits
        size = float(np.clip(rng.lognormal(math.log(400e3), 1.0), 20e3, 8e6))
        self.transfer(
            M, drop, rx=size, tx=size / 40, dur_s=float(rng.uniform(0.3, 1.5)), dns=rng.random() < 0.5
        )
        self.pulse(M, "wr", drop + float(rng.uniform(1, 5)), size)
        self.pulse(M, "wr_ops", drop + 1, max(1, size / 64e3))
        M["procs"][self.sl(drop, end)] += 1
        M["mem"][self.sl(drop, end)] += float(rng.uniform(1, 8))
        # the stub waits for its trigger: a watchdog forks a checker every few seconds (seen only
        # inside the guest) and asks a staging host by DNS whether to go (a faint periodic trickle)
        wake = float(rng.uniform(1.5, 4.0))
        stub = self.sl(drop + 2.0, exe)
        M["procs"][stub] += 2
        for t in self.periodic(wake, 0.1, drop + 2.0, exe):
            self.pulse(M, "forks", t, float(rng.integers(2, 5)), 0.3)
            self.pulse(M, "cpu_sys", t, 0.02, 0.2)
        for t in self.periodic(float(rng.uniform(4.0, 8.0)), 0.15, drop + 2.0, exe):
            self.transfer(
                M,
                t,
                rx=float(rng.uniform(90, 250)),
                tx=float(rng.uniform(60, 140)),
                dur_s=0.1,
                new_flow=rng.random() < 0.5,
                dns=True,
            )
        # infecting: unpack, persist, fetch the second stage
        si = self.sl(exe, run0)
        k = si.stop - si.start
        tt = self.t[si] - exe
        # unpacking, then persistence: chmod, crontab, service files -- forks all the way through
        tau = float(rng.uniform(0.4, 0.8)) * max(run0 - exe, 1.0)
        M["forks"][si] += float(rng.uniform(10, 30)) * intensity * np.exp(-tt / tau) + 1.5
        for t in self.periodic(float(rng.uniform(2.0, 5.0)), 0.3, exe + 2.0, run0):
            size = float(rng.uniform(50e3, 500e3)) * intensity
            self.pulse(M, "wr", t, size, 0.5)
            self.pulse(M, "wr_ops", t, max(1.0, size / 16e3), 0.5)
        busy = np.clip(float(rng.uniform(0.15, 0.8)) * intensity * self.wobble(1, 0.7, k), 0, 1)
        M["cpu_user"][si] += busy
        M["cpu_sys"][si] += 0.3 * busy
        unpack = float(rng.uniform(1e6, 30e6)) * intensity
        self.pulse(M, "wr", exe + 0.5, unpack, float(rng.uniform(2, 10)))
        self.pulse(M, "wr_ops", exe + 0.5, unpack / 32e3, 5.0)
        t2 = exe + float(rng.uniform(0.1, 0.6)) * (run0 - exe)
        stage2 = float(rng.uniform(0.3e6, 20e6))
        for _ in range(int(rng.integers(1, 5))):
            self.transfer(M, t2 + float(rng.uniform(-1, 1)), rx=500, tx=200, new_flow=False, dns=True)
        self.transfer(
            M, t2, rx=stage2, tx=stage2 / 50, dur_s=stage2 / min(h.nic_Bps, float(rng.uniform(1e6, 10e6)))
        )
        grow = np.clip(tt / max(run0 - exe, 1), 0, 1)
        M["procs"][si] += np.round(grow * int(rng.integers(1, 5)))
        M["procs"][self.sl(run0, end)] += int(rng.integers(1, 4))
        M["mem"][si] += grow * float(rng.uniform(15, 90))
        M["mem"][self.sl(run0, end)] += float(rng.uniform(10, 60))
        M["tcp_est"][self.sl(t2, end)] += 1 if rng.random() < 0.6 else 0
        pre = np.zeros(self.n, bool)  # many samples start their payload gently while installing
        if rng.random() < 0.3:
            pre[self.sl(exe + 0.7 * (run0 - exe), run0)] = True
        getattr(self, "p_" + sample.profile.replace("-", "_"))(sample.params, on, pre, intensity)
        # whatever the payload, its supervisor respawns short-lived helpers (sh -c, curl, chmod) every
        # second or two: a fork cadence only the guest's own counters see
        helper = float(rng.uniform(1.0, 3.5))
        for t in self.periodic(helper, 0.4, 0, self.s.duration_s):
            if on[min(int(t / DT), self.n - 1)]:
                self.pulse(M, "forks", t, float(rng.integers(1, 4)), 0.2)
        # dormant: the implant sleeps in short polls (a vCPU woken from HLT every poll) and
        # beacons now and then to stay alive
        poll = float(rng.uniform(1.0, 3.0))
        beacon = float(rng.uniform(10, 30))
        for p, a, b in s.phases:
            if p == "dormant":
                M["procs"][self.sl(a, b)] += 2  # the payload's workers park instead of exiting
                for t in np.arange(a + float(rng.uniform(0, poll)), b, poll):
                    self.pulse(M, "cpu_user", float(t), 0.004 * intensity)
                    self.pulse(M, "cpu_sys", float(t), 0.002)
                    # a tiny keepalive exchange per poll: the bridge sees a metronome of small packets
                    self.transfer(
                        M, float(t), rx=0.0, tx=float(rng.uniform(40, 90)), dur_s=DT, new_flow=False
                    )
                for t in self.periodic(beacon, 0.25, a, b):
                    self.transfer(
                        M,
                        t,
                        rx=float(rng.uniform(200, 2000)),
                        tx=float(rng.uniform(200, 800)),
                        dns=rng.random() < 0.7,
                    )
        return on

    def p_cpu_saturate(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng = self.mal, self.rng
        threads = min(int(q["threads"]), self.host.vcpus)
        duty = np.full(self.n, min(q["duty"] * g, 1.0))
        if q["period_s"] > 0:  # sleep/work cycles of a throttled miner
            ph = (self.t / q["period_s"] + float(rng.uniform(0, 1))) % 1.0
            duty = (ph < duty).astype(float)
        level = threads * duty * np.clip(1 + 0.03 * self.ar(2), 0.8, 1.05)
        if q["yield_to_load"]:
            other = lfilter([0.02], [1, -0.98], self.benign["cpu_user"])
            level *= other < 0.4
        act = on + 0.5 * pre
        M["cpu_user"] += level * act
        M["cpu_sys"] += 0.01 * level * act
        first = int(np.argmax(on)) if on.any() else self.n
        M["mem"][first:] += 256 if self.host.mem_mb >= 2048 else 80  # hash scratchpad, kept while asleep
        M["tcp_est"] += on
        edges = np.flatnonzero(np.diff(on.astype(int)) == 1)
        for e in edges:
            self.transfer(M, self.t[e], rx=900, tx=400, dns=True)
        for t in self.t[on][:: int(rng.integers(100, 400))]:  # mining shares
            self.transfer(M, float(t), rx=200, tx=350, new_flow=False)

    def p_bursty_c2(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng = self.mal, self.rng
        act = on | pre
        for t in self.periodic(q["period_s"], q["jitter"], 0, self.s.duration_s):
            i = min(int(t / DT), self.n - 1)
            if not act[i]:
                continue
            tx, rx = (
                q["tx_kb"] * 1024 * g * float(rng.uniform(0.6, 1.4)),
                q["rx_kb"] * 1024 * g * float(rng.uniform(0.5, 1.5)),
            )
            self.transfer(M, t, rx=rx, tx=tx, dur_s=float(rng.uniform(0.2, 1.5)), dns=bool(q["dns_each"]))
            M["tcp_est"][self.sl(t, t + float(rng.uniform(0.5, 2)))] += 1
            self.pulse(M, "cpu_user", t, 0.05, 0.5)
            if rng.random() < q["task_p"]:  # a tasking: run a few commands, grab some files
                d = float(rng.uniform(1, 4))
                self.pulse(M, "forks", t + 0.5, float(rng.integers(2, 10)), d)
                self.pulse(M, "cpu_user", t + 0.5, 0.4 * d, d)
                grab = float(rng.lognormal(math.log(2e6), 1))
                self.pulse(M, "rd", t + 0.5, grab, d)
                self.pulse(M, "rd_ops", t + 0.5, grab / 32e3, d)
                self.transfer(
                    M,
                    t + 0.5 + d,
                    tx=0.3 * grab,
                    rx=grab / 100,
                    dur_s=float(rng.uniform(0.5, 3)),
                    new_flow=False,
                )

    def p_scan_and_dial(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng = self.mal, self.rng
        period = q["on_s"] + q["off_s"]
        sweep = ((self.t + float(rng.uniform(0, period))) % period) < q["on_s"]
        act = (on | (pre & (rng.random() < 0.5))) & sweep
        syn = q["syn_pps"] * g * self.wobble(1.0, 0.35) * act
        M["syn"] += syn
        M["flows"] += syn
        M["ips"] += syn / max(q["ports"], 1) * 0.95
        M["ports"] += np.minimum(syn, q["ports"] / DT)
        M["rst"] += q["rst_frac"] * syn
        M["pkt_out"] += syn
        M["pkt_in"] += q["rst_frac"] * syn
        M["tx"] += 60 * syn
        M["rx"] += 54 * q["rst_frac"] * syn
        M["tcp_syn"] += np.round((1 - q["rst_frac"]) * lfilter([0.1], [1, -0.9], syn) * 1.0)
        M["cpu_user"] += (0.02 + syn / 4000) * act
        for t in self.periodic(q["dial_s"], 0.3, 0, self.s.duration_s):
            if on[min(int(t / DT), self.n - 1)]:
                self.transfer(
                    M,
                    t,
                    rx=float(rng.uniform(200, 2000)),
                    tx=float(rng.uniform(100, 600)),
                    dns=rng.random() < 0.8,
                )
                M["tcp_est"][self.sl(t, t + float(rng.uniform(1, 6)))] += 1

    def p_exfil_trickle(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng = self.mal, self.rng
        rate = q["rate_Bps"] * g * self.wobble(5, 0.15)
        if q["chunk_s"] > 0:
            ph = (self.t / q["chunk_s"] + float(rng.uniform(0, 1))) % 1.0
            rate = rate * (ph < 0.3) / 0.3
        s = slice(0, self.n)
        self.bulk(M, s, tx=rate * on)
        M["tcp_est"] += on
        edges = np.flatnonzero(np.diff(on.astype(int)) == 1)
        for e in edges:
            self.transfer(M, self.t[e], rx=1500, tx=600, dns=True)
        # the files it sends are read from disk in chunks a little ahead
        chunk = 1e6
        cum = np.cumsum(q["rate_Bps"] * g * q["read_ratio"] * on * DT)
        reads = np.flatnonzero(np.diff(np.floor(cum / chunk)) > 0)
        M["rd"][reads] += chunk / DT
        M["rd_ops"][reads] += chunk / 64e3 / DT
        M["cpu_user"] += 0.03 * on
        M["cpu_user"][pre] += 0.1

    def p_disk_encrypt(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng, h = self.mal, self.rng, self.host
        rate = min(q["rate_Bps"] * g * h.cpu_speed, 0.6 * h.disk_Bps)
        # enumerating the file tree while installing: many small reads
        M["rd_ops"] += pre * float(rng.uniform(100, 600))
        M["rd"] += pre * float(rng.uniform(0.3e6, 3e6))
        M["cpu_sys"] += pre * 0.15
        i = 0
        while i < self.n:
            if not on[i]:
                i += 1
                continue
            size = float(rng.exponential(q["file_mb"])) * 1e6 + 4096
            k_read = max(1, int(size / (2 * rate) / DT))
            k_write = max(1, int(size / rate / DT))
            r = slice(i, min(self.n, i + k_read))
            w = slice(r.stop, min(self.n, r.stop + k_write))
            M["rd"][r] += size / (k_read * DT)
            M["rd_ops"][r] += size / 256e3 / (k_read * DT)
            M["wr"][w] += size / (k_write * DT)
            M["wr_ops"][w] += (size / 256e3 + 3) / (k_write * DT)  # data, then rename and unlink
            M["cpu_user"][r.start : w.stop] += 0.85
            M["cpu_sys"][r.start : w.stop] += 0.15
            M["iowait"][r.start : w.stop] += 0.3
            M["mem"][r.start : w.stop] += min(size / MiB, 64)
            i = w.stop + int(q["pause_s"] * float(rng.uniform(0.5, 1.5)) / DT)

    def p_mem_inflate(self, q: dict, on: np.ndarray, pre: np.ndarray, g: float) -> None:
        M, rng, h = self.mal, self.rng, self.host
        free = h.mem_mb - float(self.benign["mem"].max())
        cap = max(q["cap"] * free, 50.0)
        step = q["rate_MBps"] * g * DT * (on + 0.3 * pre) * self.wobble(3, 0.3)
        level = np.zeros(self.n)
        cur, restart = 0.0, 0
        for i in range(self.n):  # sequential by nature: a cap, then an OOM kill and a restart
            if i < restart:
                level[i] = cur
                continue
            cur += step[i]
            if cur >= cap:
                if q["sawtooth"]:
                    cur = float(rng.uniform(0.05, 0.2)) * cap
                    restart = i + int(rng.uniform(2, 6) / DT)
                else:
                    cur = cap
            level[i] = cur
        M["mem"] += level
        growing = step > 0
        M["cpu_user"] += growing * float(rng.uniform(0.05, 0.25))
        M["cpu_sys"] += growing * 0.05
        pressure = (
            np.clip((level + self.benign["mem"]) / h.mem_mb - 0.8, 0, None) * 5
        )  # swapping near the top
        M["majflt"] += 80 * pressure
        M["iowait"] += 0.4 * pressure
        M["rd"] += 5e6 * pressure
        M["wr"] += 8e6 * pressure
        M["rd_ops"] += 300 * pressure
        M["wr_ops"] += 200 * pressure


def simulate(
    rng: np.random.Generator, host: Host, sched: Schedule, sample: Sample | None
) -> tuple[Sim, list]:
    sim = Sim(rng, host, sched)
    sim.base()
    sim.boot()
    loads = sim.workloads()
    if sample is not None and len(sched.phases) > 1:
        sim.malware(sample, intensity=float(rng.lognormal(0.1, 0.15)))
    for T in (sim.benign, sim.mal):  # host-specific measurement noise on every rate
        for k in ("cpu_user", "rd", "wr", "rx", "tx"):
            T[k] *= np.exp(host.noise * rng.standard_normal(sim.n) - host.noise**2 / 2)
    return sim, loads
