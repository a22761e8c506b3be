"""Fan-out of deck events to WebSocket clients: bounded per-client queues and sticky state.

    broadcaster = Broadcaster(metrics=metrics)
    n = broadcaster.publish(Prediction(episode_id="e1", window_idx=3, predicted="infecting"))
    # n: how many clients it was queued for; never blocks, never raises for a slow client

    async with broadcaster.subscribe() as client:     # what the server does per browser
        for frame in client.replay:                   # sticky state first
            await stream.send_all(frame.wire)
        while True:
            frames = await client.receive_many(64 << 10)  # all queued; raises ClientClosed when dropped
            await stream.send_all(b"".join(f.wire for f in frames))

``publish`` is synchronous and must be called from the trio thread (from a worker thread use
``trio.from_thread.run_sync(broadcaster.publish, event)``). Each event is encoded once, as
JSON text and as the bytes of its WebSocket text frame (``edge.wsconn.text_frame``), and the
same bytes go to every client.

Queue policy (``QueuePolicy``): each client has a queue of ``maxlen`` frames. When it is full
the oldest queued *live* frame is dropped (``events_dropped{reason="overflow"}``) so a slow
browser skips stale events and stays current; latest-state frames (snapshot, model_metric,
model_perf, attack_profile) are dropped only when nothing else is queued. A client that has
taken nothing from its queue while ``stall_drops`` frames were dropped is stalled: it is
closed (``reason="stalled"``) and its browser, on reconnecting, gets the sticky replay, which
resynchronises it completely. Publishing never waits for any client.

Sticky state (``StickyLimits``), replayed to every (re)connecting client in this order:
the latest ``snapshot``; the latest ``attack_profile`` per name, ``model_metric`` per model and
``model_perf`` per model; ``phase`` events of the last ``phase_window_s`` seconds; the last
``max_embeddings`` embeddings; the last ``max_predictions_per_episode`` predictions of each of
the ``max_prediction_episodes`` most recently updated episodes. ``episode`` events are live only.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, NamedTuple, get_args

import trio

from schema.events import (
    AttackProfile,
    Event,
    ModelMetric,
    ModelPerf,
    NodeStatus,
    Prediction,
    decode_fleet_event,
    encode_event,
    event_type,
)

from .metrics import Metrics
from .wsframe import text_frame

_EVENT_CLASSES: Final = (*get_args(Event), NodeStatus)  # a node's status only reaches a fleet deck

# Latest-wins types and the key under which a newer event replaces an older one.
STATE_KEYS: Final[Mapping[str, Callable[[Event], str]]] = {
    "snapshot": lambda e: "",
    "attack_profile": lambda e: e.name if isinstance(e, AttackProfile) else "",
    # per (model, threat model): a reconnecting deck gets both twins, realistic last as published
    "model_metric": lambda e: f"{e.model}\0{e.threat_model or ''}" if isinstance(e, ModelMetric) else "",
    "model_perf": lambda e: e.model if isinstance(e, ModelPerf) else "",
    "status": lambda e: "",  # one per node (the node is part of every key below)
}
# Replay order of the latest-wins types: the fleet's nodes and the store first, then what the
# scenes draw from it.
_STATE_ORDER: Final = ("status", "snapshot", "attack_profile", "model_metric", "model_perf")


@dataclass(frozen=True)
class QueuePolicy:
    maxlen: int = 256  # frames queued per client
    stall_drops: int = 1024  # drops with nothing taken in between -> the client is stalled


@dataclass(frozen=True)
class StickyLimits:
    phase_window_s: float = 300.0
    max_phase_events: int = 4096
    max_embeddings: int = 2000
    max_prediction_episodes: int = 32
    max_predictions_per_episode: int = 24
    max_state_keys: int = 256  # per latest-wins type: a stray producer can't grow memory forever


class Frame(NamedTuple):
    """One encoded event: its ``type`` tag, its JSON text and the WebSocket frame sent to every client."""

    type: str
    text: str  # the JSON; browsers get it as a text message they can JSON.parse directly
    wire: bytes  # ``text`` framed as one WebSocket text message: the bytes on every client's socket

    @classmethod
    def of(cls, kind: str, text: str) -> Frame:
        return cls(kind, text, text_frame(text))


class ClientClosed(Exception):
    """The broadcaster dropped this client (``reason``: "stalled" or "disconnected")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Client:
    """One subscriber's view: the replay taken when it subscribed, then its bounded queue."""

    def __init__(self, id: int, replay: list[Frame], policy: QueuePolicy, metrics: Metrics) -> None:
        self.id = id
        self.replay = replay
        self.dropped = 0
        self.overflowed = 0  # overflow drops not yet added to events_dropped
        self.closed_reason: str | None = None
        self._policy = policy
        self._metrics = metrics
        self._queue: deque[Frame] = deque()
        self._drops_since_take = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return (
            f"<Client {self.id} queued={len(self._queue)} dropped={self.dropped} closed={self.closed_reason}>"
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def receive(self) -> Frame:
        """The next queued frame; waits for one. Raises ClientClosed once the client is closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed_reason is None and self._queue:
            frame = self._take()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frame
        while True:
            if self.closed_reason is not None:
                raise ClientClosed(self.closed_reason)
            if self._queue:
                return self._take()
            await self._lot.park()

    async def receive_many(self, max_bytes: int) -> list[Frame]:
        """Everything queued, at least one frame (waits for it), at most about ``max_bytes`` of
        wire bytes: a client that fell behind catches up in one write, not one per frame."""
        out = [await self.receive()]
        size = len(out[0].wire)
        q = self._queue
        while q and size < max_bytes:
            frame = self._take()
            out.append(frame)
            size += len(frame.wire)
        return out

    def receive_nowait(self) -> Frame | None:
        if self.closed_reason is not None:
            raise ClientClosed(self.closed_reason)
        return self._take() if self._queue else None

    async def wait_closed(self) -> str:
        await self._closed.wait()
        assert self.closed_reason is not None
        return self.closed_reason

    def close(self, reason: str = "disconnected") -> None:
        """Stop queueing; whatever is still queued counts as dropped for ``reason``."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        if self._queue:
            self._metrics.events_dropped.inc(len(self._queue), reason=reason)
            self.dropped += len(self._queue)
            self._queue.clear()
        self._lot.unpark_all()
        self._closed.set()

    def _take(self) -> Frame:
        self._drops_since_take = 0
        return self._queue.popleft()

    def _offer(self, frame: Frame) -> bool:
        """Queue without waiting; False if the client is (or just got) closed."""
        if self.closed_reason is not None:
            return False
        q = self._queue
        if len(q) >= self._policy.maxlen:
            self._drop_one()
            self.dropped += 1
            self._drops_since_take += 1
            self.overflowed += 1  # the broadcaster counts these once per publish, not per client
            if self._drops_since_take >= self._policy.stall_drops:
                q.append(frame)  # so that close() counts it with the rest
                self.close("stalled")
                return False
        q.append(frame)
        if self._lot:
            self._lot.unpark_all()
        return True

    def _drop_one(self) -> None:
        q = self._queue
        for i, queued in enumerate(q):
            if queued.type not in STATE_KEYS:
                del q[i]
                return
        q.popleft()  # nothing but state queued: the oldest state frame goes


class Broadcaster:
    def __init__(
        self,
        *,
        policy: QueuePolicy = QueuePolicy(),
        sticky: StickyLimits = StickyLimits(),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.limits = sticky
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._clients: set[Client] = set()
        self._ids = itertools.count(1)
        self.published: dict[str, int] = {}
        # latest-wins state: type -> key -> frame, least recently updated first
        self._state: dict[str, OrderedDict[str, Frame]] = {t: OrderedDict() for t in _STATE_ORDER}
        self._phases: deque[tuple[float, Frame]] = deque(maxlen=sticky.max_phase_events)
        self._embeddings: deque[Frame] = deque(maxlen=sticky.max_embeddings)
        self._predictions: OrderedDict[str, deque[Frame]] = OrderedDict()
        # Called with every published event, on the trio thread (the MQTT bridge); must not block.
        self.taps: list[Callable[[Event], None]] = []

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def publish(self, event: Event | NodeStatus) -> int:
        """Encode once, remember if sticky, queue for every client; returns how many got it."""
        if not isinstance(event, _EVENT_CLASSES):
            raise TypeError(
                f"publish takes a schema.events Struct, not {type(event).__name__}"
                " (use schema.events.from_dict for a dict)"
            )
        frame = Frame.of(event_type(event), encode_event(event).decode())
        self.published[frame.type] = self.published.get(frame.type, 0) + 1
        self._remember(event, frame)
        for tap in self.taps:
            tap(event)
        delivered = overflowed = 0
        for client in self._clients:
            delivered += client._offer(frame)
            if client.overflowed:
                overflowed += client.overflowed
                client.overflowed = 0
        if overflowed:  # one metrics update per event, however many clients overflowed
            self.metrics.events_dropped.inc(overflowed, reason="overflow")
        return delivered

    def publish_many(self, events: Iterable[Event]) -> int:
        """Publish in order; returns how many clients got them (the most any one event reached)."""
        return max((self.publish(e) for e in events), default=0)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Client]:
        # Replay and registration happen in one synchronous step, so no event falls between.
        client = Client(next(self._ids), self.sticky_frames(), self.policy, self.metrics)
        self._clients.add(client)
        self.metrics.clients.set(len(self._clients))
        try:
            yield client
        finally:
            self._clients.discard(client)
            self.metrics.clients.set(len(self._clients))
            client.close("disconnected")

    def sticky_frames(self) -> list[Frame]:
        self._expire_phases()
        out: list[Frame] = []
        for kind in _STATE_ORDER:
            out.extend(self._state[kind].values())
        out.extend(f for _, f in self._phases)
        out.extend(self._embeddings)
        for frames in self._predictions.values():
            out.extend(frames)
        return out

    def sticky_events(self) -> list[Event | NodeStatus]:
        """The replay a new subscriber gets, decoded (frames are the source of truth)."""
        return [decode_fleet_event(f.text) for f in self.sticky_frames()]

    def _remember(self, event: Event | NodeStatus, frame: Frame) -> None:
        kind = frame.type
        lim = self.limits
        node = event.node or ""  # a fleet keeps each node's state apart
        if kind in STATE_KEYS:
            table = self._state[kind]
            key = f"{node}\0{STATE_KEYS[kind](event)}"  # type: ignore[arg-type]
            table.pop(key, None)
            table[key] = frame
            if len(table) > lim.max_state_keys:
                table.popitem(last=False)
        elif kind == "phase":
            self._phases.append((self._clock(), frame))
            self._expire_phases()
        elif kind == "embedding":
            self._embeddings.append(frame)
        elif kind == "prediction":
            assert isinstance(event, Prediction)
            ep = f"{node}\0{event.episode_id}"
            frames = self._predictions.get(ep)
            if frames is None:
                frames = self._predictions[ep] = deque(maxlen=lim.max_predictions_per_episode)
                if len(self._predictions) > lim.max_prediction_episodes:
                    self._predictions.popitem(last=False)
            else:
                self._predictions.move_to_end(ep)
            frames.append(frame)

    def _expire_phases(self) -> None:
        horizon = self._clock() - self.limits.phase_window_s
        phases = self._phases
        while phases and phases[0][0] < horizon:
            phases.popleft()
