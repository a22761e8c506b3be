"""edge/mqtt.py and edge/fleet.py: topics, the outbox policy, and in-process round trips on a real
Mosquitto (a broker per test, tests/mosquitto_kit.py)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosquitto_kit import Mosquitto, have_mosquitto

from edge.broadcast import Broadcaster
from edge.fleet import FleetReader, parse_message
from edge.metrics import Metrics
from edge.mqtt import (
    DELIVERY,
    Item,
    MqttConfig,
    MqttPublisher,
    Outbox,
    check_topic_part,
    cli_settings,
    parse_broker_url,
    topic_for,
)
from schema import events as ev

needs_broker = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed (make mosquitto)")
FAST = MqttConfig(reconnect_min_s=0.1, reconnect_max_s=0.5, status_interval_s=60.0, stop_timeout_s=2.0)


# ---------------------------------------------------------------- no broker


def test_broker_urls() -> None:
    u = parse_broker_url("mqtt://edge:s%40cret@broker.lab:1884")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("broker.lab", 1884, False, "edge", "s@cret")
    assert str(u) == "mqtt://edge@broker.lab:1884"  # the password never shows
    assert parse_broker_url("mqtts://broker").port == 8883
    assert parse_broker_url("mqtt://broker").port == 1883
    for bad, why in (
        ("http://broker", "scheme"),
        ("mqtt://", "no host"),
        ("mqtt://broker/topic", "nothing after"),
        ("mqtt://broker:99999", "bad port"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_broker_url(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "pi+1", "lab#2", "x\0y", "n" * 200])
def test_node_ids_are_validated(bad: str) -> None:
    with pytest.raises(ValueError):
        check_topic_part(bad)
    with pytest.raises(ValueError, match="--node-id"):
        cli_settings("mqtt://127.0.0.1", bad or "/", None, None)


def test_cli_settings_refuse_mixtures(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give one"):
        cli_settings("mqtt://a", "n", None, "mqtt://a")
    with pytest.raises(ValueError, match="no such file"):
        cli_settings("mqtts://a", "n", tmp_path / "ca.pem", None)
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ValueError, match="mqtts"):
        cli_settings("mqtt://a", "n", tmp_path / "ca.pem", None)
    s = cli_settings("mqtts://a", "pi-1", tmp_path / "ca.pem", None)
    assert s.publish is not None and s.publish.tls and s.node == "pi-1" and s.fleet is None


def test_topics_one_retained_value_per_key() -> None:
    assert topic_for("pi-1", ev.Prediction(episode_id="e", window_idx=0)) == "phasewatch/v1/pi-1/prediction"
    assert (
        topic_for("pi-1", ev.ModelMetric(model="gru", accuracy=0.9)) == "phasewatch/v1/pi-1/model_metric/gru"
    )
    twin = ev.ModelMetric(model="gru", accuracy=0.9, threat_model="oracle")
    assert topic_for("pi-1", twin) == "phasewatch/v1/pi-1/model_metric/gru-oracle"
    assert (
        topic_for("pi-1", ev.AttackProfile(name="a/b+", curve=[])) == "phasewatch/v1/pi-1/attack_profile/a_b_"
    )
    assert topic_for("pi-1", ev.Snapshot()) == "phasewatch/v1/pi-1/snapshot"
    assert topic_for("pi-1", ev.NodeStatus(state="online")) == "phasewatch/v1/pi-1/status"
    assert {t for t, d in DELIVERY.items() if d.retain} == {
        "snapshot",
        "attack_profile",
        "model_metric",
        "model_perf",
        "status",
    }
    assert DELIVERY["prediction"].qos == DELIVERY["episode"].qos == 1


def test_node_field_is_left_off_unless_set() -> None:
    p = ev.Prediction(episode_id="e1", window_idx=2, predicted="armed")
    assert ev.encode_event(p) == b'{"type":"prediction","episode_id":"e1","window_idx":2,"predicted":"armed"}'
    stamped = ev.with_node(p, "pi-1")
    assert json.loads(ev.encode_event(stamped))["node"] == "pi-1" and p.node is None
    assert ev.decode_event(ev.encode_event(stamped)) == stamped
    # a status is for the fleet only: the deck's /publish contract refuses it
    st = ev.NodeStatus(state="offline", node="pi-1", models=["gru"])
    assert ev.decode_fleet_event(ev.encode_event(st)) == st
    with pytest.raises(msgspec.ValidationError):
        ev.decode_event(ev.encode_event(st))
    with pytest.raises(msgspec.ValidationError, match=r"\$.state"):
        ev.decode_fleet_event(b'{"type":"status","state":"asleep"}')


def test_outbox_drops_qos0_first_then_oldest() -> None:
    box = Outbox(4)
    pred = lambda i: Item("prediction", 1, ev.Prediction(episode_id="e", window_idx=0, window_no=i))
    emb = Item("embedding", 0, ev.Embedding(x=0.1, y=0.2))
    assert box.put(pred(0)) is None and box.put(emb) is None and box.put(pred(1)) is None
    assert box.put(pred(2)) is None
    assert box.put(pred(3)) is emb  # full: the QoS 0 one goes though it is not the oldest
    dropped = box.put(pred(4))
    assert dropped is not None and dropped.event.window_no == 0  # then the oldest
    assert box.put(emb) is emb  # a QoS 0 one never pushes out a QoS 1 one
    with box.cond:
        assert [box.take().event.window_no for _ in range(4)] == [1, 2, 3, 4]  # type: ignore[union-attr]
        assert box.take() is None


def test_fleet_trusts_the_topic_not_the_payload() -> None:
    body = b'{"type":"prediction","episode_id":"e","window_idx":1,"node":"pi-b"}'
    got = parse_message("phasewatch/v1/pi-a/prediction", body)
    assert not isinstance(got, str)
    event, relabelled = got
    assert event.node == "pi-a" and relabelled
    assert parse_message("phasewatch/v1/pi-a/prediction", body.replace(b',"node":"pi-b"', b""))[1] is False  # type: ignore[index]
    assert parse_message(
        "phasewatch/v1/pi-a/model_metric/gru", b'{"type":"model_metric","model":"gru","accuracy":0.9}'
    )
    for topic, payload, why in (
        ("phasewatch/v1/pi-a", b"{}", "bad_topic"),
        ("other/v1/pi-a/prediction", b"{}", "bad_topic"),
        ("phasewatch/v1/pi-a/weather", b"{}", "unknown_type"),
        ("phasewatch/v1/pi-a/prediction", b"not json", "bad_payload"),
        ("phasewatch/v1/pi-a/phase", b'{"type":"phase","phase":"sleepy"}', "bad_payload"),
        ("phasewatch/v1/pi-a/phase", b'{"type":"embedding","x":0.1,"y":0.1}', "type_mismatch"),
        ("phasewatch/v1/pi-a/status", b"", ""),  # a retained message being cleared
    ):
        assert parse_message(topic, payload) == why, topic


# ---------------------------------------------------------------- a real broker, in process


class Sink:
    """What the fleet reader's broadcaster hands to one deck client, decoded."""

    def __init__(self) -> None:
        self.events: list[ev.Event | ev.NodeStatus] = []

    def window_nos(self, node: str | None = None) -> set[int]:
        return {
            e.window_no
            for e in self.events
            if isinstance(e, ev.Prediction) and e.window_no is not None and (node is None or e.node == node)
        }

    def nodes(self) -> set[str | None]:
        return {e.node for e in self.events}

    async def collect(self, broadcaster: Broadcaster, task_status: trio.TaskStatus[None]) -> None:
        async with broadcaster.subscribe() as client:
            task_status.started()
            for frame in client.replay:
                self.events.append(ev.decode_fleet_event(frame.text))
            while True:
                frame = await client.receive()
                self.events.append(ev.decode_fleet_event(frame.text))


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


def _publisher(url: str, node: str, config: MqttConfig = FAST) -> tuple[MqttPublisher, Broadcaster, Metrics]:
    metrics = Metrics()
    bc = Broadcaster(metrics=metrics)
    pub = MqttPublisher(parse_broker_url(url), node=node, metrics=metrics, config=config)
    pub.attach(bc)
    return pub, bc, metrics


def _reader(url: str, client_id: str = "test-fleet") -> tuple[FleetReader, Broadcaster, Metrics]:
    metrics = Metrics()
    bc = Broadcaster(metrics=metrics)
    return (
        FleetReader(parse_broker_url(url), broadcaster=bc, metrics=metrics, client_id=client_id, config=FAST),
        bc,
        metrics,
    )


def _pred(i: int) -> ev.Prediction:
    return ev.Prediction(episode_id=f"ep-{i // 40}", window_idx=i % 6, window_no=i, predicted="clean")


@needs_broker
def test_broker_restart_mid_stream_loses_no_qos1_prediction(tmp_path: Path) -> None:
    N = 300
    with Mosquitto(tmp_path) as broker:

        async def main() -> None:
            pub, node_bc, metrics = _publisher(broker.url, "pi-a")
            reader, fleet_bc, _ = _reader(broker.url)
            sink = Sink()
            async with trio.open_nursery() as n:
                await n.start(sink.collect, fleet_bc)
                await n.start(reader.run)
                await n.start(pub.run)
                await wait_for(lambda: "pi-a" in reader.stats.nodes, what="the birth message")
                restarted = trio.Event()

                async def restart() -> None:
                    await trio.to_thread.run_sync(broker.restart)
                    restarted.set()

                for i in range(N):
                    node_bc.publish(_pred(i))
                    node_bc.publish(ev.Embedding(x=0.5, y=0.5))  # QoS 0: may be lost, must not block
                    if i == N // 3:
                        n.start_soon(restart)
                    await trio.sleep(0.004)
                await restarted.wait()
                try:
                    await wait_for(lambda: sink.window_nos() >= set(range(N)), timeout=20)
                except trio.TooSlowError:
                    missing = sorted(set(range(N)) - sink.window_nos())
                    raise AssertionError(
                        f"lost {len(missing)}: {missing[:20]}... {pub.health()} {reader.health()}"
                    ) from None
                assert pub.stats.connects >= 2 and reader.stats.connects >= 2  # both really reconnected
                assert pub.health()["dropped"] == {}
                assert metrics.registry.render().count("phasewatch_mqtt_dropped_total{") == 0
                assert sink.nodes() == {"pi-a"}
                n.cancel_scope.cancel()

        trio.run(main)


@needs_broker
def test_broker_absent_at_start_outbox_bound_then_connects(tmp_path: Path) -> None:
    """Broker down: the outbox keeps the newest QoS 1 up to its bound, drops by type (QoS 0 first),
    and /metrics shows it; the broker appears: the kept ones arrive through the reader's session."""
    broker = Mosquitto(tmp_path)
    try:

        async def establish_session() -> None:  # the fleet's persistent subscription, then the broker goes
            reader, _, _ = _reader(broker.url)
            async with trio.open_nursery() as n:
                await n.start(reader.run)
                await wait_for(lambda: reader.stats.connected)
                await trio.sleep(0.3)  # SUBACK
                n.cancel_scope.cancel()

        trio.run(establish_session)
        broker.stop()

        async def main() -> None:
            pub, node_bc, metrics = _publisher(
                broker.url, "pi-a", MqttConfig(**{**FAST.__dict__, "outbox": 50})
            )
            async with trio.open_nursery() as n:
                await n.start(pub.run)
                with trio.fail_after(1.0):  # publishing never waits for the absent broker
                    for i in range(120):
                        node_bc.publish(_pred(i))
                    for _ in range(30):
                        node_bc.publish(ev.Embedding(x=0.1, y=0.1))
                h = pub.health()
                assert not h["connected"] and h["outbox"] == 50
                assert h["dropped"] == {"embedding": 30, "prediction": 70}
                text = metrics.registry.render()
                assert 'phasewatch_mqtt_dropped_total{type="prediction"} 70' in text
                assert 'phasewatch_mqtt_dropped_total{type="embedding"} 30' in text
                await trio.to_thread.run_sync(broker.start)
                reader, fleet_bc, _ = _reader(broker.url)
                sink = Sink()
                await n.start(sink.collect, fleet_bc)
                await n.start(reader.run)
                await wait_for(lambda: sink.window_nos() >= set(range(70, 120)), timeout=15)
                assert sink.window_nos() == set(range(70, 120))
                assert pub.health()["connected"] and pub.health()["outbox"] == 0
                n.cancel_scope.cancel()

        trio.run(main)
    finally:
        broker.stop()


@needs_broker
def test_acl_a_node_cannot_publish_as_another(tmp_path: Path) -> None:
    users = {"pi-a": "pw-a", "pi-b": "pw-b", "fleet": "pw-fleet"}
    acl = (Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "acl.example").read_text()
    with Mosquitto(tmp_path, users=users, acl=acl) as broker:

        async def main() -> None:
            honest, honest_bc, _ = _publisher(broker.url_for("pi-a"), "pi-a")
            forger, forger_bc, _ = _publisher(broker.url_for("pi-a"), "pi-b")  # pi-a's password, pi-b's name
            reader, fleet_bc, _ = _reader(broker.url_for("fleet"))
            sink = Sink()
            async with trio.open_nursery() as n:
                await n.start(sink.collect, fleet_bc)
                await n.start(reader.run)
                await n.start(honest.run)
                await n.start(forger.run)
                await wait_for(lambda: honest.health()["connected"] and forger.health()["connected"])
                for i in range(20):
                    honest_bc.publish(_pred(i))
                    forger_bc.publish(_pred(1000 + i))
                await wait_for(lambda: sink.window_nos("pi-a") >= set(range(20)))
                await trio.sleep(0.5)  # what the forger sent would have arrived by now
                assert sink.nodes() == {"pi-a"}
                assert "pi-b" not in reader.stats.nodes  # not even its birth message got through
                n.cancel_scope.cancel()

        trio.run(main)
        # the fleet reader may only read: what it publishes never reaches anyone
        fleet = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-writes")
        fleet.username_pw_set("fleet", "pw-fleet")
        fleet.connect("127.0.0.1", broker.port)
        fleet.loop_start()
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
        watcher.username_pw_set("fleet", "pw-fleet")
        seen: list[str] = []
        ready = threading.Event()
        watcher.on_connect = lambda cl, u, f, rc, p: cl.subscribe("phasewatch/v1/pi-a/#", qos=1)
        watcher.on_subscribe = lambda *a: ready.set()
        watcher.on_message = lambda cl, u, m: seen.append(m.topic)
        watcher.connect("127.0.0.1", broker.port)
        watcher.loop_start()
        assert ready.wait(5)
        fleet.publish(
            "phasewatch/v1/pi-a/prediction", b'{"type":"prediction","episode_id":"x","window_idx":0}', qos=1
        ).wait_for_publish(5)
        threading.Event().wait(0.5)
        assert "phasewatch/v1/pi-a/prediction" not in seen  # (the retained status may show up)
        for c in (fleet, watcher):
            c.disconnect()
            c.loop_stop()


@needs_broker
def test_mqtts_with_the_ca_and_refused_without(tmp_path: Path) -> None:
    with Mosquitto(tmp_path, tls=True) as broker:
        assert broker.ca is not None
        trusted = MqttConfig(**{**FAST.__dict__, "ca_file": broker.ca})

        async def main() -> None:
            pub, node_bc, _ = _publisher(broker.url, "pi-tls", trusted)
            stranger, stranger_bc, _ = _publisher(broker.url, "pi-noca", FAST)  # the system CAs only
            metrics = Metrics()
            fleet_bc = Broadcaster(metrics=metrics)
            reader = FleetReader(
                parse_broker_url(broker.url),
                broadcaster=fleet_bc,
                metrics=metrics,
                client_id="tls-fleet",
                config=trusted,
            )
            sink = Sink()
            async with trio.open_nursery() as n:
                await n.start(sink.collect, fleet_bc)
                await n.start(reader.run)
                await n.start(pub.run)
                await n.start(stranger.run)
                await wait_for(lambda: pub.health()["connected"])
                for i in range(10):
                    node_bc.publish(_pred(i))
                    stranger_bc.publish(_pred(i))
                await wait_for(lambda: sink.window_nos("pi-tls") >= set(range(10)))
                h = stranger.health()
                assert not h["connected"] and h["outbox"] == 10 and "retrying" in h["last_error"]
                assert sink.nodes() == {"pi-tls"}
                n.cancel_scope.cancel()

        trio.run(main)
