"""A tiny Prometheus registry for the edge daemon: counters, gauges and fixed-bucket histograms.

``prometheus_client`` would work, but it brings process collectors, multiprocess mode and
a global registry we do not want on a Pi; what the daemon needs fits in this page.

    metrics = Metrics()
    metrics.windows_inferred.inc(model="gru")
    metrics.inference_seconds.observe(0.0042, model="gru")
    metrics.live_episodes.set(10)
    body = metrics.render()          # text exposition format 0.0.4, for GET /metrics

A value that lives elsewhere (the tailer's counters) is read at scrape time by subclassing
``Family``, setting ``kind`` and overriding ``samples()``; ``registry.register(family)``.

Every method is thread-safe (inference may run in ``trio.to_thread``) and cheap: a lock and
a dict update. Labels are keyword arguments and must be exactly the family's label names.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Per-window inference on a Pi 4 runs from ~100 us (gbt) to tens of ms (transformer).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Prometheus number: integers without a fraction, +Inf/-Inf/NaN spelled its way."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Family:
    """One metric family: ``# HELP``, ``# TYPE`` and the lines ``samples()`` yields."""

    kind: str = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if labels.keys() != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples()


class _Scalar(Family):
    """A family holding one number per label set (counters and gauges)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0)

    def by_labels(self) -> dict[str, float]:
        """Every label set's value, keyed ``"a/b"`` by its label values (for ``/healthz``)."""
        with self._lock:
            return {"/".join(k): v for k, v in sorted(self._values.items())}

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0)]  # an unlabelled family exists from the start
        for key, v in items:
            yield f"{self.name}{_labels(self.labelnames, key)} {format_value(v)}"


class Counter(_Scalar):
    """Monotonic count; the name should end in ``_total``."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        self._add(amount, labels)


class Gauge(_Scalar):
    """A value that goes up and down (clients, live episodes)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1, **labels: str) -> None:
        self._add(-amount, labels)


class Histogram(Family):
    """Fixed upper bounds; renders cumulative ``_bucket{le=...}``, ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError(f"{name}: 'le' is reserved for buckets")
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds: tuple[float, ...] = tuple(bounds)
        # per label set: [count per bucket (not cumulative)..., sum]
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        key = self._key(labels)
        i = bisect.bisect_left(self.bounds, value)  # first bucket whose upper bound >= value
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * len(self.bounds), [0.0])
            series[0][i] += 1
            series[1][0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip(self.bounds, counts):
                running += n
                le = f'le="{format_value(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {running}"


_Family = Family  # the name edge/daemon.py imported first


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def register(self, family: Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} registered twice")
        self._families[family.name] = family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        c = Counter(name, help, labelnames)
        self.register(c)
        return c

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        g = Gauge(name, help, labelnames)
        self.register(g)
        return g

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> Histogram:
        h = Histogram(name, help, labelnames, buckets)
        self.register(h)
        return h

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"


class Metrics:
    """The daemon's metric families, one registry; hand the same object to everything."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.windows_inferred = r.counter(
            "phasewatch_windows_inferred_total", "Windows run through a model.", ("model",)
        )
        self.windows_unscored = r.counter(
            "phasewatch_windows_unscored_total",
            "Windows a threat model could not score, by why (no_<source>: absent; sparse_<source>: "
            "under the coverage a window needs, as for a source that starts late).",
            ("threat_model", "reason"),
        )
        self.inference_seconds = r.histogram(
            "phasewatch_inference_seconds", "Wall time of one model call on one window.", ("model",)
        )
        self.events_sent = r.counter(
            "phasewatch_events_sent_total",
            "Events written to a WebSocket client (one per client).",
            ("type",),
        )
        self.events_dropped = r.counter(
            "phasewatch_events_dropped_total", "Events a client never got, by reason.", ("reason",)
        )
        self.clients = r.gauge("phasewatch_clients", "Connected WebSocket clients.")
        self.parse_errors = r.counter(
            "phasewatch_parse_errors_total", "Malformed input lines or bodies, by stream.", ("stream",)
        )
        self.live_episodes = r.gauge("phasewatch_live_episodes", "Episodes being followed now.")
        self.ood_drift = r.gauge(
            "phasewatch_ood_drift",
            "Share of recent windows flagged out-of-distribution (moving average over ~100 windows).",
            ("threat_model",),
        )
        self.windows_flagged = r.counter(
            "phasewatch_windows_ood_total", "Windows flagged out-of-distribution.", ("threat_model",)
        )
        self.connection_errors = r.counter(
            "phasewatch_connection_errors_total",
            "HTTP/WebSocket connections ended by an error, by reason.",
            ("reason",),
        )

    def render(self) -> str:
        return self.registry.render()
