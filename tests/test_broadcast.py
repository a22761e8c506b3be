"""Broadcaster: sticky state, bounded queues, drop and stall policy (no sockets here)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol, Opcode

from edge.broadcast import Broadcaster, ClientClosed, QueuePolicy, StickyLimits
from edge.metrics import Metrics
from schema.events import (
    AttackProfile,
    Embedding,
    Episode,
    ModelMetric,
    ModelPerf,
    PhaseEvent,
    Prediction,
    Snapshot,
    StatusCounts,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def types(frames) -> list[str]:
    return [f.type for f in frames]


def test_latest_wins_state_is_replayed_once_per_key() -> None:
    b = Broadcaster()
    b.publish(Snapshot(total_bytes=1))
    b.publish(Snapshot(total_bytes=2))
    b.publish(ModelMetric(model="gru", accuracy=0.7))
    b.publish(ModelMetric(model="cnn", accuracy=0.8))
    b.publish(ModelMetric(model="gru", accuracy=0.9))
    b.publish(ModelPerf(model="gru", latency_us=120.0, accuracy=0.9))
    b.publish(AttackProfile(name="miner", curve=[0.0, 1.0]))
    b.publish(AttackProfile(name="miner", curve=[0.5, 1.0], shape="flat then up"))
    b.publish(Episode(episode_id="e1", host="h1"))  # live only

    events = b.sticky_events()
    assert [type(e).__name__ for e in events] == [
        "Snapshot",
        "AttackProfile",
        "ModelMetric",
        "ModelMetric",
        "ModelPerf",
    ]
    assert events[0] == Snapshot(total_bytes=2)
    assert {(e.model, e.accuracy) for e in events if isinstance(e, ModelMetric)} == {
        ("cnn", 0.8),
        ("gru", 0.9),
    }
    assert events[1] == AttackProfile(name="miner", curve=[0.5, 1.0], shape="flat then up")


def test_phase_mix_keeps_only_the_window() -> None:
    clock = FakeClock()
    b = Broadcaster(clock=clock, sticky=StickyLimits(phase_window_s=300.0, max_phase_events=5))
    b.publish(PhaseEvent(phase="clean"))
    clock.now += 200
    b.publish(PhaseEvent(phase="armed"))
    clock.now += 150  # the first is now 350 s old
    assert b.sticky_events() == [PhaseEvent(phase="armed")]
    for _ in range(8):
        b.publish(PhaseEvent(phase="dormant"))
    assert len(b.sticky_events()) == 5  # bounded even inside the window


def test_embeddings_and_predictions_are_bounded() -> None:
    lim = StickyLimits(max_embeddings=10, max_prediction_episodes=3, max_predictions_per_episode=4)
    b = Broadcaster(sticky=lim)
    for i in range(25):
        b.publish(Embedding(x=i / 25, y=0.5))
    for ep in range(5):
        for w in range(6):
            b.publish(Prediction(episode_id=f"e{ep}", window_idx=w, predicted="clean"))
    b.publish(Prediction(episode_id="e2", window_idx=5, predicted="armed"))  # e2 becomes most recent

    events = b.sticky_events()
    xs = [e.x for e in events if isinstance(e, Embedding)]
    assert xs == [i / 25 for i in range(15, 25)]
    preds = [e for e in events if isinstance(e, Prediction)]
    assert [p.episode_id for p in preds] == ["e3"] * 4 + ["e4"] * 4 + ["e2"] * 4
    assert [p.window_idx for p in preds[-4:]] == [3, 4, 5, 5]
    assert preds[-1].predicted == "armed"


def test_state_keys_are_bounded() -> None:
    b = Broadcaster(sticky=StickyLimits(max_state_keys=3))
    for i in range(10):
        b.publish(ModelMetric(model=f"m{i}", accuracy=0.5))
    assert b.sticky_events() == [ModelMetric(model=f"m{i}", accuracy=0.5) for i in (7, 8, 9)]


def test_publish_rejects_plain_dicts() -> None:
    with pytest.raises(TypeError, match="from_dict"):
        Broadcaster().publish({"type": "phase", "phase": "clean"})  # type: ignore[arg-type]


@trio.testing.trio_test
async def test_subscriber_gets_replay_then_live_in_order() -> None:
    metrics = Metrics()
    b = Broadcaster(metrics=metrics)
    b.publish(ModelMetric(model="gru", accuracy=0.9))
    async with b.subscribe() as client:
        assert metrics.clients.value() == 1 and b.client_count == 1
        assert types(client.replay) == ["model_metric"]
        assert b.publish(PhaseEvent(phase="armed")) == 1
        assert b.publish(Episode(episode_id="e1", host="h")) == 1
        got = [await client.receive(), await client.receive()]
        assert types(got) == ["phase", "episode"]
        assert json.loads(got[1].text) == {"type": "episode", "episode_id": "e1", "host": "h"}
        # the same encoded text object goes to every client, and the same framed bytes
        async with b.subscribe() as other:
            b.publish(Snapshot(total_bytes=3))
            mine, theirs = await client.receive(), await other.receive()
            assert mine.text is theirs.text and mine.wire is theirs.wire
            assert unframe(mine.wire) == mine.text
    assert b.client_count == 0 and metrics.clients.value() == 0
    assert b.publish(PhaseEvent(phase="armed")) == 0


def unframe(wire: bytes) -> str:
    """What a browser makes of the bytes: one whole text message (wsproto as the client)."""
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(wire)
    frames = list(proto.received_frames())
    assert len(frames) == 1 and frames[0].opcode is Opcode.TEXT and frames[0].message_finished
    assert isinstance(frames[0].payload, str)
    return frames[0].payload


@trio.testing.trio_test
async def test_receive_many_takes_the_backlog_up_to_a_byte_bound() -> None:
    b = Broadcaster(policy=QueuePolicy(maxlen=1000, stall_drops=4000))
    async with b.subscribe() as client:
        for i in range(300):
            b.publish(Episode(episode_id=f"e{i:03d}", host="h"))
        first = await client.receive_many(4096)
        size = sum(len(f.wire) for f in first)
        assert 1 < len(first) < 300 and size >= 4096 and size - len(first[-1].wire) < 4096
        rest = await client.receive_many(1 << 20)
        assert [json.loads(f.text)["episode_id"] for f in first + rest] == [f"e{i:03d}" for i in range(300)]
        assert client.queued == 0
        with trio.testing.assert_checkpoints():
            with trio.move_on_after(0.01):
                await client.receive_many(1 << 20)  # waits for at least one frame
        b.publish(PhaseEvent(phase="armed"))
        assert types(await client.receive_many(1)) == ["phase"]  # at least one, whatever the bound


@trio.testing.trio_test
async def test_receive_waits_until_something_is_published() -> None:
    b = Broadcaster()
    got: list[str] = []
    async with b.subscribe() as client:
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append((await client.receive()).type)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            b.publish(Embedding(x=0.1, y=0.2))
    assert got == ["embedding"]


@trio.testing.trio_test
async def test_overflow_drops_oldest_live_frame_and_keeps_state() -> None:
    metrics = Metrics()
    b = Broadcaster(policy=QueuePolicy(maxlen=4, stall_drops=100), metrics=metrics)
    async with b.subscribe() as client:
        b.publish(ModelMetric(model="gru", accuracy=0.9))
        for i in range(6):
            with trio.testing.assert_no_checkpoints():  # publishing never waits for a client
                assert b.publish(Embedding(x=i / 10, y=0.0)) == 1
        assert client.queued == 4
        assert client.dropped == 3
        assert metrics.events_dropped.value(reason="overflow") == 3
        frames = [await client.receive() for _ in range(4)]
        assert types(frames) == ["model_metric", "embedding", "embedding", "embedding"]
        assert [json.loads(f.text)["x"] for f in frames[1:]] == [0.3, 0.4, 0.5]


@trio.testing.trio_test
async def test_state_frames_go_only_when_nothing_else_is_queued() -> None:
    b = Broadcaster(policy=QueuePolicy(maxlen=2, stall_drops=100))
    async with b.subscribe() as client:
        for m in ("a", "b", "c"):
            b.publish(ModelMetric(model=m, accuracy=0.5))
        assert [json.loads((await client.receive()).text)["model"] for _ in range(2)] == ["b", "c"]


@trio.testing.trio_test
async def test_stalled_client_is_closed_and_others_unaffected() -> None:
    metrics = Metrics()
    b = Broadcaster(policy=QueuePolicy(maxlen=8, stall_drops=20), metrics=metrics)
    async with b.subscribe() as stalled, b.subscribe() as fast:
        received = 0
        for i in range(100):
            assert b.publish(Embedding(x=0.5, y=i / 100)) == (2 if i < 8 + 20 - 1 else 1)
            await fast.receive()  # the fast one keeps up
            received += 1
        assert received == 100
        assert stalled.closed_reason == "stalled"
        with pytest.raises(ClientClosed, match="stalled"):
            await stalled.receive()
        assert await stalled.wait_closed() == "stalled"
        assert metrics.events_dropped.value(reason="overflow") == 20
        assert metrics.events_dropped.value(reason="stalled") == 8  # what was still queued
        assert fast.dropped == 0


@trio.testing.trio_test
async def test_taking_resets_the_stall_count() -> None:
    b = Broadcaster(policy=QueuePolicy(maxlen=2, stall_drops=4))
    async with b.subscribe() as slow:
        for _ in range(50):  # 3 drops a round (2 the first), one take: slow but alive
            for _ in range(4):
                b.publish(PhaseEvent(phase="clean"))
            await slow.receive()
        assert slow.closed_reason is None
        assert slow.dropped == 2 + 49 * 3


@trio.testing.trio_test
async def test_undelivered_frames_count_as_dropped_on_disconnect() -> None:
    metrics = Metrics()
    b = Broadcaster(metrics=metrics)
    async with b.subscribe():
        b.publish(PhaseEvent(phase="clean"))
        b.publish(Snapshot(totals=StatusCounts(accepted=1)))
    assert metrics.events_dropped.value(reason="disconnected") == 2


def test_publish_many_reports_clients_not_copies() -> None:
    async def main() -> None:
        b = Broadcaster()
        async with b.subscribe(), b.subscribe():
            assert b.publish_many([PhaseEvent(phase="clean"), PhaseEvent(phase="armed")]) == 2
            assert b.publish_many([]) == 0

    trio.run(main)
