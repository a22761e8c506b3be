"""Demo events for ``edge-daemon --demo``: a plausible live show when no models directory exists.

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(run_demo, broadcaster, seed=0))

Every scene gets data: a store snapshot of six hosts (the real corpus's status mix), shipped
episodes, labelled phases, the six attack-profile envelopes, rolling six-window prediction
timelines with a few wrong predictions, held-out accuracy and latency per model, and knn
embeddings drawn as 3-D Gaussian clusters per phase with about 7 % of ``predicted`` labels
wrong, so the deck's "predicted" colouring visibly differs from "phase".

Pi-safe: numpy, msgspec (through schema.events) and trio only. Deterministic for a seed,
except the wall-clock timestamps.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import trio

from schema.events import (
    AttackProfile,
    Embedding,
    Episode,
    Event,
    HostSummary,
    ModelMetric,
    ModelPerf,
    PhaseEvent,
    Prediction,
    Snapshot,
    StatusCounts,
)
from schema.vocab import MODELS, PHASES, PROFILES, STATUSES, Phase

DEFAULT_RATE_HZ: Final = 4.0
MISLABEL_RATE: Final = 0.07
TIMELINE_WINDOWS: Final = 6
CURVE_POINTS: Final = 80

# The real corpus's sweep (SPEC section 1), spread over the demo hosts.
_CORPUS: Final = {"accepted": 64_798, "degraded": 8_154, "rejected": 3_701, "errored": 7}
_CORPUS_BYTES: Final = 65 * 10**9
_HOSTS: Final = ("lab-a01", "lab-a02", "lab-b01", "lab-b02", "lab-c01", "lab-c02")

# knn clusters: (phase, centre in the unit cube, spread). Two phases get two clusters each,
# so colouring by cluster differs from colouring by phase.
_CLUSTERS: Final = (
    ("clean", (0.22, 0.25, 0.30), 0.070),
    ("clean", (0.30, 0.62, 0.20), 0.060),
    ("armed", (0.55, 0.22, 0.70), 0.055),
    ("infecting", (0.78, 0.45, 0.78), 0.060),
    ("infected_running", (0.75, 0.78, 0.35), 0.065),
    ("infected_running", (0.52, 0.82, 0.62), 0.055),
    ("dormant", (0.25, 0.78, 0.75), 0.060),
)
_CLUSTER_WEIGHTS: Final = np.array([0.20, 0.12, 0.10, 0.13, 0.18, 0.11, 0.16])

# Held-out accuracy (with a CI half-width) and ONNX Runtime latency per window on a Pi 4.
_MODEL_FIGURES: Final = {
    "gbt": (0.874, 0.018, 95.0),
    "mlp": (0.842, 0.021, 42.0),
    "cnn": (0.893, 0.016, 430.0),
    "gru": (0.912, 0.014, 910.0),
    "lstm": (0.905, 0.015, 1_150.0),
    "transformer": (0.921, 0.013, 1_700.0),
    "rocket": (0.915, 0.014, 1_200.0),
}

_SHAPES: Final = {
    "cpu-saturate": "ramps up, then one vCPU pegged flat at 100 %",
    "bursty-c2": "quiet, then short outbound bursts every ~10 s",
    "scan-and-dial": "SYN storms to many ports, repeated sweeps",
    "exfil-trickle": "low, steady upload that never stops",
    "disk-encrypt": "read everything, then write it all back",
    "mem-inflate": "resident memory climbs in a straight line",
}


class SupportsPublish(Protocol):
    def publish(self, event: Event) -> object: ...


def attack_curve(profile: str, rng: np.random.Generator, n: int = CURVE_POINTS) -> list[float]:
    """A typical envelope for one profile, ``n`` points, non-negative, with a little noise."""
    t = np.linspace(0.0, 1.0, n)
    y: np.ndarray
    if profile == "cpu-saturate":
        y = np.clip((t - 0.15) / 0.12, 0, 1) * 0.95 + 0.05
    elif profile == "bursty-c2":
        y = 0.08 + 0.9 * (np.mod(t * 8, 1.0) < 0.12)
    elif profile == "scan-and-dial":
        y = 0.1 + 0.85 * np.mod(t * 4, 1.0) ** 3
    elif profile == "exfil-trickle":
        y = 0.05 + 0.3 * np.clip(t / 0.1, 0, 1)
    elif profile == "disk-encrypt":
        y = np.where(t < 0.45, 0.55 + 0.3 * np.sin(t * 40) ** 2, 0.95) * (t > 0.08)
    elif profile == "mem-inflate":
        y = 0.1 + 0.9 * t
    else:
        raise ValueError(f"unknown attack profile {profile!r}; known: {', '.join(PROFILES)}")
    y = y + rng.normal(0.0, 0.02, n)
    return [round(float(v), 4) for v in np.clip(y, 0.0, None)]


def embedding_points(rng: np.random.Generator, n: int) -> list[Embedding]:
    """``n`` knn points: Gaussian clusters per phase, ~7 % wrong ``predicted``, cluster ids."""
    comp = rng.choice(len(_CLUSTERS), size=n, p=_CLUSTER_WEIGHTS / _CLUSTER_WEIGHTS.sum())
    centres = np.array([c for _, c, _ in _CLUSTERS])
    spreads = np.array([s for _, _, s in _CLUSTERS])
    xyz = np.clip(centres[comp] + rng.normal(size=(n, 3)) * spreads[comp, None], 0.0, 1.0)
    wrong = rng.random(n) < MISLABEL_RATE
    shift = rng.integers(1, len(PHASES), size=n)  # a wrong label is any *other* phase
    out = []
    for i in range(n):
        phase = _CLUSTERS[comp[i]][0]
        k = PHASES.index(phase)
        predicted = PHASES[(k + shift[i]) % len(PHASES)] if wrong[i] else phase
        x, y, z = (round(float(v), 4) for v in xyz[i])
        out.append(Embedding(x=x, y=y, z=z, phase=phase, predicted=predicted, cluster=int(comp[i])))
    return out


# (phase, fewest windows, most windows) of SPEC section 2's typical course.
_ONSET: Final[tuple[tuple[Phase, int, int], ...]] = (("clean", 1, 3), ("armed", 1, 2), ("infecting", 1, 3))
_CYCLE: Final[tuple[tuple[Phase, int, int], ...]] = (("infected_running", 3, 7), ("dormant", 2, 5))


def _phase_sequence(rng: np.random.Generator, infected: bool) -> Iterator[Phase]:
    """Phases of one live episode, window by window (SPEC section 2's typical course)."""
    if not infected:
        while True:
            yield "clean"
    for phase, lo, hi in _ONSET:
        for _ in range(int(rng.integers(lo, hi + 1))):
            yield phase
    while True:
        for phase, lo, hi in _CYCLE:
            for _ in range(int(rng.integers(lo, hi + 1))):
                yield phase


@dataclass
class _LiveEpisode:
    episode_id: str
    phases: Iterator[Phase]
    window_no: int = 0


@dataclass
class _World:
    rng: np.random.Generator
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    last_seen: dict[str, int] = field(default_factory=dict)
    live: list[_LiveEpisode] = field(default_factory=list)
    serial: int = 0
    ticks: int = 0

    def __post_init__(self) -> None:
        share = self.rng.dirichlet(np.full(len(_HOSTS), 8.0))
        now = time.time_ns()
        for host, s in zip(_HOSTS, share):
            self.counts[host] = {st: int(round(_CORPUS[st] * s)) for st in STATUSES}
            self.bytes[host] = int(_CORPUS_BYTES * s)
            self.last_seen[host] = now - int(self.rng.integers(5, 600)) * 10**9
        self.live = [self._new_live() for _ in range(3)]

    def _new_live(self) -> _LiveEpisode:
        self.serial += 1
        host = _HOSTS[self.serial % len(_HOSTS)]
        infected = self.rng.random() > 0.2
        return _LiveEpisode(f"{host}-live{self.serial:04d}", _phase_sequence(self.rng, infected))

    def snapshot(self) -> Snapshot:
        hosts = [
            HostSummary(host=h, bytes=self.bytes[h], last_seen_ns=self.last_seen[h], **self.counts[h])
            for h in _HOSTS
        ]
        totals = StatusCounts(**{st: sum(c[st] for c in self.counts.values()) for st in STATUSES})
        return Snapshot(hosts=hosts, totals=totals, total_bytes=sum(self.bytes.values()), t_ns=time.time_ns())

    def opening(self, points: int) -> list[Event]:
        events: list[Event] = [self.snapshot()]
        events += [AttackProfile(name=p, curve=attack_curve(p, self.rng), shape=_SHAPES[p]) for p in PROFILES]
        for m in MODELS:
            acc, half, _ = _MODEL_FIGURES[m]
            events.append(
                ModelMetric(
                    model=m, accuracy=acc, ci_low=acc - half, ci_high=acc + half, threat_model="realistic"
                )
            )
        events += self._perf()
        events += embedding_points(self.rng, points)
        return events

    def _perf(self) -> list[Event]:
        out: list[Event] = []
        for m in MODELS:
            acc, _, lat = _MODEL_FIGURES[m]
            jitter = float(self.rng.normal(1.0, 0.03))
            out.append(
                ModelPerf(
                    model=m,
                    latency_us=round(lat * jitter, 1),
                    accuracy=acc,
                    p99_us=round(lat * jitter * 1.6, 1),
                    threat_model="realistic",
                )
            )
        return out

    def _episode(self) -> Episode:
        rng = self.rng
        host = _HOSTS[int(rng.integers(len(_HOSTS)))]
        status = STATUSES[
            int(rng.choice(len(STATUSES), p=np.array(list(_CORPUS.values())) / sum(_CORPUS.values())))
        ]
        size = int(rng.lognormal(math.log(850e3), 0.35))
        self.serial += 1
        self.counts[host][status] += 1
        self.bytes[host] += size
        self.last_seen[host] = time.time_ns()
        profile = None if rng.random() < 0.2 else PROFILES[int(rng.integers(len(PROFILES)))]
        return Episode(
            episode_id=f"{host}-{self.serial:06d}",
            host=host,
            profile=profile,
            status=status,
            duration_s=round(float(rng.uniform(300, 900)), 1),
            bytes=size,
        )

    def tick(self) -> list[Event]:
        """One step of the show: a window for one live episode, now and then the rest."""
        rng = self.rng
        self.ticks += 1
        events: list[Event] = []
        ep = self.live[self.ticks % len(self.live)]
        actual = next(ep.phases)
        k = PHASES.index(actual)
        wrong = rng.random() < 0.1
        predicted = PHASES[(k + (1 if rng.random() < 0.5 else -1)) % len(PHASES)] if wrong else actual
        events.append(PhaseEvent(phase=actual, episode_id=ep.episode_id, t_ns=time.time_ns()))
        events.append(
            Prediction(
                episode_id=ep.episode_id,
                window_idx=ep.window_no % TIMELINE_WINDOWS,
                window_no=ep.window_no,
                predicted=predicted,
                actual=actual,
                model="gru",
                confidence=round(float(rng.uniform(0.55, 0.75) if wrong else rng.uniform(0.8, 0.99)), 3),
            )
        )
        ep.window_no += 1
        if ep.window_no >= 2 * TIMELINE_WINDOWS and rng.random() < 0.15:
            self.live[self.live.index(ep)] = self._new_live()
        events += embedding_points(rng, 2)
        if rng.random() < 0.2:
            events.append(self._episode())
        if self.ticks % 40 == 0:
            events.append(self.snapshot())
        if self.ticks % 120 == 0:
            events += self._perf()
        return events


async def _publish(broadcaster: SupportsPublish, event: Event) -> None:
    result = broadcaster.publish(event)
    if inspect.isawaitable(result):  # an async broadcaster works too
        await result


async def run_demo(
    broadcaster: SupportsPublish,
    *,
    seed: int = 0,
    rate_hz: float = DEFAULT_RATE_HZ,
    initial_points: int = 1500,
    ticks: int | None = None,
) -> None:
    """Publish the opening state, then ``rate_hz`` ticks a second until cancelled (or ``ticks``)."""
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
    world = _World(np.random.default_rng(seed))
    for i, event in enumerate(world.opening(initial_points)):
        await _publish(broadcaster, event)
        if i % 256 == 255:
            await trio.lowlevel.checkpoint()  # a long opening must not starve the server
    done = 0
    while ticks is None or done < ticks:
        await trio.sleep(1.0 / rate_hz)
        for event in world.tick():
            await _publish(broadcaster, event)
        done += 1
