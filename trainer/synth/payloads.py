"""The malware's share of the latent rates: one method per attack profile (SPEC section 2).

A mixin of ``activity.Sim``: it adds to ``self.mal`` with the simulator's own tools
(``sl``, ``pulse``, ``transfer``, ``bulk``, ``wobble``...), drawing from the same rng in the
same order as before the split, so a seed gives the same store.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.signal import lfilter

from .catalog import DT, MiB

if TYPE_CHECKING:
    from .catalog import Sample


class Payloads:
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
