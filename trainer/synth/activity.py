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

from .catalog import DT, WORKLOADS, Host, Sample
from .payloads import Payloads

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


class Sim(Payloads):
    """Latent rates of one episode; the malware's share comes from ``Payloads``."""

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
