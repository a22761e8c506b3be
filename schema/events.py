"""The deck's wire contract (SPEC section 7): one tagged Struct per event type.

Producers already post plain dicts of these shapes, so every field added later must be
optional, unknown fields are ignored, and unset fields are left off the wire.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from .vocab import Phase

Unit = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]


class _Event(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    # The fleet (SPEC section 10): which daemon emitted the event. Unset on a single daemon's
    # WebSocket, so that traffic stays byte-identical; set on MQTT and on a fleet daemon's deck.
    node: str | None = None


class StatusCounts(msgspec.Struct, omit_defaults=True, kw_only=True):
    accepted: NonNegInt = 0
    degraded: NonNegInt = 0
    rejected: NonNegInt = 0
    errored: NonNegInt = 0


class HostSummary(StatusCounts, kw_only=True):
    host: str
    bytes: NonNegInt = 0
    last_seen_ns: int | None = None


class Snapshot(_Event, tag="snapshot"):
    """Store summary: per host episode counts by status, bytes, last seen; totals."""

    hosts: list[HostSummary] = []
    totals: StatusCounts | None = None
    total_bytes: NonNegInt | None = None
    t_ns: int | None = None


class Episode(_Event, tag="episode"):
    """One newly shipped or finished episode."""

    episode_id: str
    host: str
    profile: str | None = None
    status: str | None = None
    duration_s: NonNegFloat | None = None
    bytes: NonNegInt | None = None
    reasons: list[str] | None = None


class PhaseEvent(_Event, tag="phase"):
    phase: Phase
    episode_id: str | None = None
    host: str | None = None
    t_ns: int | None = None


class AttackProfile(_Event, tag="attack_profile"):
    name: str
    curve: list[float]
    shape: str | None = None


class Prediction(_Event, tag="prediction"):
    episode_id: str
    window_idx: int  # the deck draws 0-5 and ignores the rest
    predicted: str | None = None
    actual: str | None = None
    model: str | None = None
    confidence: Unit | None = None
    window_no: NonNegInt | None = None  # absolute window number in the episode
    # How unlike the training hosts this window looks (schema/ood.py); >= 0.5: flagged.
    ood: Unit | None = None
    unscored: str | None = None  # why there is no prediction ("no qmp"); predicted is then None


class ModelMetric(_Event, tag="model_metric"):
    model: str
    accuracy: Unit
    ci_low: Unit | None = None
    ci_high: Unit | None = None
    threat_model: str | None = None


class Embedding(_Event, tag="embedding"):
    x: Unit
    y: Unit
    z: Unit | None = None
    phase: str | None = None
    predicted: str | None = None
    cluster: NonNegInt | None = None
    episode_id: str | None = None

    @property
    def z_drawn(self) -> float:
        """2-D producers still work: a missing z is drawn at the cube's middle."""
        return 0.5 if self.z is None else self.z


class ModelPerf(_Event, tag="model_perf"):
    model: str
    latency_us: NonNegFloat
    accuracy: Unit
    p99_us: NonNegFloat | None = None
    threat_model: str | None = None


Event = Snapshot | Episode | PhaseEvent | AttackProfile | Prediction | ModelMetric | Embedding | ModelPerf
EVENT_TYPES: Final = tuple(
    t.__struct_config__.tag
    for t in (Snapshot, Episode, PhaseEvent, AttackProfile, Prediction, ModelMetric, Embedding, ModelPerf)
)

NodeState = Literal["online", "offline"]


class NodeStatus(_Event, tag="status"):
    """A daemon's birth, heartbeat and death on ``phasewatch/v1/<node>/status`` (retained).

    The offline one is the MQTT last will, so a daemon killed with -9 reads offline too. Not an
    ``Event``: /publish refuses it; only a fleet daemon relays it to its deck.
    """

    state: NodeState
    version: str | None = None
    schema_hash: str | None = None
    models: list[str] | None = None
    primary_model: str | None = None
    live_episodes: NonNegInt | None = None
    windows_per_s: NonNegFloat | None = None
    dropped: NonNegInt | None = None  # events the MQTT outbox had to drop since start
    t_ns: int | None = None  # when the node sent it (its wall clock)


# What a fleet daemon reads off the broker and relays to its deck.
FleetEvent = Event | NodeStatus

# Bound once: decoding is the hot path of /publish.
_one = msgspec.json.Decoder(Event)
_one_or_many = msgspec.json.Decoder(Event | list[Event])
_fleet = msgspec.json.Decoder(FleetEvent)
_encoder = msgspec.json.Encoder()


def decode_event(data: bytes | str) -> Event:
    """Decode one event; raises msgspec.ValidationError naming the bad field (``$.accuracy``)."""
    return _one.decode(data)


def decode_events(data: bytes | str) -> list[Event]:
    """Decode one event or a JSON list of them (the body of POST /publish)."""
    out = _one_or_many.decode(data)
    return out if isinstance(out, list) else [out]


def decode_fleet_event(data: bytes | str) -> Event | NodeStatus:
    """Decode one event or node status as the fleet reads it off the broker."""
    return _fleet.decode(data)


def from_dict(obj: dict) -> Event:
    """Validate a plain dict (an in-process producer) into its typed event."""
    return msgspec.convert(obj, Event)


def encode_event(event: Event | NodeStatus) -> bytes:
    return _encoder.encode(event)


def with_node(event: Event, node: str) -> Event:
    """The same event stamped with its node (a copy; the original stays unset)."""
    return msgspec.structs.replace(event, node=node)


def event_type(event: Event | NodeStatus) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]
