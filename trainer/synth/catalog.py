"""Who the synthetic store is about: lab hosts that differ, and malware samples per profile.

Everything here is data plus deterministic constructors; nothing draws from a global RNG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from schema.vocab import PROFILES

GiB = 1 << 30
MiB = 1 << 20
DT = 0.1  # seconds per latent step of the simulator

# Benign workloads a lab VM runs on its own. Several look like attacks on purpose:
# a build pegs vCPUs and forks, a backup hammers the disk (and may upload),
# an update downloads in bursts after DNS lookups, discovery sweeps the subnet.
WORKLOADS = ("idle", "build", "backup", "update", "discovery")


@dataclass(frozen=True)
class Host:
    host_id: str
    cpu_speed: (
        float  # work per CPU-second against a reference core: ticks per unit of work scale with 1/speed
    )
    noise: float  # relative noise of every latent signal
    nic_Bps: float  # what one bulk transfer reaches on this host's uplink
    disk_Bps: float  # sequential throughput of the image store
    vcpus: int
    mem_mb: int
    os: str
    collector: str
    guest_offset_ns: int  # guest clock against the host's (NTP residual)
    netflow_offset_ns: int  # capture box clock against the host's
    host_mono_base_ns: int  # host uptime when its recording began
    netflow_mono_base_ns: int  # capture box uptime when the host's recording began: the clock trap
    epoch_ns: int  # wall time of the host's first episode slot
    cache_read_factor: float  # share of guest reads that reach the disk (host page cache, cache=writeback)
    balloon_auto: bool  # a balloon manager moves balloon_actual with guest demand
    net32: bool  # 32-bit guest: its net byte counters wrap at 2**32
    heartbeat_s: float | None  # a monitoring agent posts every heartbeat_s: periodic benign traffic
    pcap: bool  # whether this collector keeps network.pcap
    workload_mix: dict[str, float] = field(default_factory=dict)
    baseline_procs: int = 140
    idle_cpu: float = 0.02  # vCPU share an idle guest burns


# Six hand-made hosts that differ on every axis the spec asks for; more are drawn.
_BASE_HOSTS: tuple[dict, ...] = (
    dict(
        cpu_speed=1.00,
        noise=0.08,
        nic_Bps=110e6,
        disk_Bps=180e6,
        vcpus=2,
        mem_mb=2048,
        os="ubuntu-22.04",
        cache_read_factor=1.0,
        balloon_auto=False,
        net32=False,
        heartbeat_s=15.0,
        pcap=True,
        workload_mix={"idle": 0.45, "build": 0.15, "backup": 0.15, "update": 0.25},
        baseline_procs=135,
    ),
    dict(
        cpu_speed=1.35,
        noise=0.05,
        nic_Bps=1.1e9,
        disk_Bps=900e6,
        vcpus=4,
        mem_mb=4096,
        os="debian-12",
        cache_read_factor=0.35,
        balloon_auto=True,
        net32=False,
        heartbeat_s=None,
        pcap=False,
        workload_mix={"idle": 0.25, "build": 0.40, "backup": 0.10, "update": 0.20, "discovery": 0.05},
        baseline_procs=120,
    ),
    dict(
        cpu_speed=0.70,
        noise=0.14,
        nic_Bps=55e6,
        disk_Bps=120e6,
        vcpus=2,
        mem_mb=3072,
        os="windows-10",
        cache_read_factor=1.0,
        balloon_auto=False,
        net32=False,
        heartbeat_s=30.0,
        pcap=True,
        workload_mix={"idle": 0.35, "build": 0.05, "backup": 0.20, "update": 0.40},
        baseline_procs=95,
        idle_cpu=0.04,
    ),
    dict(
        cpu_speed=1.10,
        noise=0.10,
        nic_Bps=110e6,
        disk_Bps=450e6,
        vcpus=8,
        mem_mb=8192,
        os="ubuntu-20.04",
        cache_read_factor=0.6,
        balloon_auto=False,
        net32=False,
        heartbeat_s=10.0,
        pcap=False,
        workload_mix={"idle": 0.30, "build": 0.30, "backup": 0.25, "update": 0.10, "discovery": 0.05},
        baseline_procs=210,
    ),
    dict(
        cpu_speed=0.85,
        noise=0.11,
        nic_Bps=11e6,
        disk_Bps=90e6,
        vcpus=2,
        mem_mb=1536,
        os="debian-12-i386",
        cache_read_factor=1.0,
        balloon_auto=True,
        net32=True,
        heartbeat_s=None,
        pcap=True,
        workload_mix={"idle": 0.55, "build": 0.05, "backup": 0.20, "update": 0.20},
        baseline_procs=85,
        idle_cpu=0.03,
    ),
    dict(
        cpu_speed=1.20,
        noise=0.07,
        nic_Bps=550e6,
        disk_Bps=600e6,
        vcpus=4,
        mem_mb=6144,
        os="alpine-3.19",
        cache_read_factor=0.8,
        balloon_auto=False,
        net32=False,
        heartbeat_s=20.0,
        pcap=False,
        workload_mix={"idle": 0.30, "build": 0.20, "backup": 0.15, "update": 0.25, "discovery": 0.10},
        baseline_procs=60,
        idle_cpu=0.01,
    ),
)
_COLLECTORS = (
    "collector/1.4.2",
    "collector/1.4.2",
    "collector/1.3.9",
    "collector/1.4.2",
    "collector/1.2.7",
    "collector/1.4.0",
)


def make_hosts(n: int, seed: int) -> list[Host]:
    """n hosts: the six hand-made ones first, then drawn ones. Clocks and bases depend on seed."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    out: list[Host] = []
    for i in range(n):
        if i < len(_BASE_HOSTS):
            kw = dict(_BASE_HOSTS[i])
            collector = _COLLECTORS[i]
        else:
            w = rng.dirichlet([3, 1.5, 1.2, 1.5, 0.3])
            kw = dict(
                cpu_speed=float(rng.uniform(0.65, 1.45)),
                noise=float(rng.uniform(0.05, 0.15)),
                nic_Bps=float(rng.choice([11e6, 55e6, 110e6, 550e6, 1.1e9])),
                disk_Bps=float(rng.uniform(80e6, 1e9)),
                vcpus=int(rng.choice([1, 2, 2, 4, 4, 8])),
                mem_mb=int(rng.choice([1024, 2048, 4096, 6144, 8192])),
                os=str(
                    rng.choice(["ubuntu-22.04", "debian-12", "windows-10", "ubuntu-20.04", "alpine-3.19"])
                ),
                cache_read_factor=float(rng.uniform(0.3, 1.0)),
                balloon_auto=bool(rng.random() < 0.3),
                net32=bool(rng.random() < 0.1),
                heartbeat_s=[None, 10.0, 15.0, 20.0, 30.0, 60.0][int(rng.integers(6))],
                pcap=bool(rng.random() < 0.5),
                workload_mix=dict(zip(WORKLOADS, map(float, w))),
                baseline_procs=int(rng.integers(60, 220)),
                idle_cpu=float(rng.uniform(0.01, 0.06)),
            )
            collector = str(rng.choice(_COLLECTORS))
        out.append(
            Host(
                host_id=f"lab{i + 1:02d}",
                collector=collector,
                guest_offset_ns=int(rng.normal(0, 4e6)),
                netflow_offset_ns=int(rng.normal(0, 3e6)),
                host_mono_base_ns=int(rng.uniform(0.5, 60) * 86400e9),
                netflow_mono_base_ns=int(rng.uniform(3, 400) * 86400e9),
                # recording began in March 2026, each host on its own day
                epoch_ns=int((1_772_323_200 + i * 86400 + int(rng.integers(0, 3600))) * 1e9),
                **kw,
            )
        )
    return out


@dataclass(frozen=True)
class Sample:
    """One malware sample: a profile and the knobs that make it differ from its siblings."""

    name: str
    profile: str
    params: dict[str, float]

    @property
    def sample_id(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]


def _s(profile: str, name: str, **params: float) -> Sample:
    return Sample(f"{profile}/{name}", profile, dict(params))


SAMPLES: tuple[Sample, ...] = (
    # one vCPU pegged by a miner; siblings throttle or split threads; one backs off when the user is busy
    _s("cpu-saturate", "xmr-full", threads=1, duty=0.97, period_s=0.0, yield_to_load=0),
    _s("cpu-saturate", "xmr-throttled", threads=1, duty=0.55, period_s=2.0, yield_to_load=0),
    _s("cpu-saturate", "xmr-2t", threads=2, duty=0.42, period_s=0.0, yield_to_load=0),
    _s("cpu-saturate", "xmr-polite", threads=1, duty=0.85, period_s=0.0, yield_to_load=1),
    # periodic beacons: period, jitter, sizes, whether each beacon resolves its domain
    _s("bursty-c2", "beacon-3s", period_s=3.0, jitter=0.10, tx_kb=2.0, rx_kb=8.0, dns_each=1, task_p=0.10),
    _s("bursty-c2", "beacon-6s", period_s=6.0, jitter=0.30, tx_kb=8.0, rx_kb=60.0, dns_each=0, task_p=0.25),
    _s(
        "bursty-c2",
        "beacon-10s",
        period_s=10.0,
        jitter=0.20,
        tx_kb=30.0,
        rx_kb=250.0,
        dns_each=1,
        task_p=0.40,
    ),
    # scanners: syn rate, sweep on/off, how many probes meet a RST, dial period to the C2 list
    _s(
        "scan-and-dial", "mirai-like", syn_pps=450.0, on_s=10.0, off_s=8.0, rst_frac=0.6, ports=3, dial_s=20.0
    ),
    _s(
        "scan-and-dial",
        "slow-sweep",
        syn_pps=60.0,
        on_s=40.0,
        off_s=20.0,
        rst_frac=0.4,
        ports=40,
        dial_s=10.0,
    ),
    _s("scan-and-dial", "stealth", syn_pps=25.0, on_s=1e9, off_s=0.0, rst_frac=0.7, ports=12, dial_s=60.0),
    # exfiltration: steady upload rate, chunking, and the local read that feeds it
    _s("exfil-trickle", "drip-15k", rate_Bps=15e3, chunk_s=0.0, read_ratio=1.0),
    _s("exfil-trickle", "chunk-40k", rate_Bps=40e3, chunk_s=2.0, read_ratio=1.2),
    _s("exfil-trickle", "stream-180k", rate_Bps=180e3, chunk_s=0.5, read_ratio=0.8),
    # ransomware: throughput at reference speed, file size, pause between files
    _s("disk-encrypt", "fast", rate_Bps=70e6, file_mb=8.0, pause_s=0.0),
    _s("disk-encrypt", "small-files", rate_Bps=25e6, file_mb=0.6, pause_s=0.3),
    _s("disk-encrypt", "throttled", rate_Bps=40e6, file_mb=30.0, pause_s=4.0),
    # memory growth: rate, cap as a share of free memory, shape after the cap
    _s("mem-inflate", "leak-slow", rate_MBps=2.5, cap=0.85, sawtooth=0),
    _s("mem-inflate", "balloon-fast", rate_MBps=25.0, cap=0.7, sawtooth=1),
    _s("mem-inflate", "steps", rate_MBps=9.0, cap=0.9, sawtooth=1),
)
SAMPLES_BY_PROFILE: dict[str, tuple[Sample, ...]] = {
    p: tuple(s for s in SAMPLES if s.profile == p) for p in PROFILES
}
assert all(len(v) >= 3 for v in SAMPLES_BY_PROFILE.values())
SAMPLE_BY_NAME: dict[str, Sample] = {s.name: s for s in SAMPLES}
