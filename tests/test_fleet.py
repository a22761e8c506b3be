"""The fleet end to end: `edge-daemon --demo --mqtt` processes, a real Mosquitto, `edge-daemon
--fleet`, and a WebSocket client on the fleet deck."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosquitto_kit import Mosquitto, free_port, have_mosquitto

from schema.vocab import MODELS, PROFILES

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed (make mosquitto)")

ROOT = Path(__file__).resolve().parent.parent


def _cmd() -> list[str]:
    exe = Path(sys.executable).with_name("edge-daemon")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from edge.daemon import main; sys.exit(main())"]


class Proc:
    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*_cmd(), *args, "--bind", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.health()
                return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-daemon exited: {self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError("edge-daemon did not come up")
            time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=2) as r:
            return r.read().decode()

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean stop: the node says offline itself
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@contextmanager
def daemon(*args: str) -> Iterator[Proc]:
    p = Proc(list(args))
    try:
        yield p
    finally:
        p.stop()


def until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ws_frames(
    url: str, enough: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []

    async def main() -> None:
        with trio.fail_after(timeout):
            async with open_websocket_url(url.replace("http://", "ws://") + "/ws") as ws:
                while not enough(frames):
                    frames.append(json.loads(await ws.get_message()))

    trio.run(main)
    return frames


class Probe:
    """A plain paho subscriber, as any other consumer of the fleet would be."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{free_port()}")
        self.c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(5)

    def _on_message(self, cl: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((m.topic, json.loads(m.payload) if m.payload else {}, bool(m.retain)))

    def topics(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {t: p for t, p, _ in self.messages}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_round_trip_node_broker_fleet_deck_with_retained_state(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as broker, daemon("--demo", "--mqtt", broker.url, "--node-id", "pi-a") as node:
        until(lambda: node.health()["mqtt"]["connected"], what="the node's connection")
        # the node's own deck is untouched: no node field on its WebSocket
        local = ws_frames(node.url, lambda fs: any(f["type"] == "prediction" for f in fs))
        assert local and all("node" not in f for f in local)
        # a late subscriber: the sticky state is retained, one topic per model / profile
        time.sleep(0.5)
        probe = Probe(broker.port, "phasewatch/v1/pi-a/#")
        try:
            topics = until(
                lambda: (t := probe.topics()) and sum("/model_metric/" in k for k in t) >= len(MODELS) and t,
                what="retained",
            )
            assert topics["phasewatch/v1/pi-a/status"]["state"] == "online"
            assert len({k for k in topics if "/attack_profile/" in k}) == len(PROFILES)
            assert len({k for k in topics if "/model_perf/" in k}) == len(MODELS)
            assert "phasewatch/v1/pi-a/snapshot" in topics
            retained = {t for t, _, r in probe.messages if r}
            assert (
                "phasewatch/v1/pi-a/model_metric/gru-realistic" in retained
                and "phasewatch/v1/pi-a/status" in retained
            )
            assert all(p.get("node") == "pi-a" for p in topics.values())
        finally:
            probe.close()
        # the fleet deck, started after the node: retained state plus the live stream, all with node
        with daemon("--fleet", broker.url) as fleet:
            frames = ws_frames(
                fleet.url,
                lambda fs: {"status", "model_metric", "prediction", "embedding"} <= {f["type"] for f in fs},
            )
            assert all(f.get("node") == "pi-a" for f in frames)
            assert frames[0]["type"] == "status"  # the replay starts with the fleet's nodes
            metrics = {f["model"] for f in frames if f["type"] == "model_metric"}
            assert len(metrics) == len(MODELS)
            h = fleet.health()
            assert h["ok"] and h["fleet"]["connected"] and h["fleet"]["nodes"]["pi-a"]["state"] == "online"
            assert 'phasewatch_fleet_received_total{type="prediction"}' in fleet.metrics()
        text = node.metrics()
        assert 'phasewatch_mqtt_published_total{type="prediction"}' in text
        assert "phasewatch_mqtt_connected 1" in text


def test_no_broker_at_start_serves_locally_connects_later_and_leaves_a_will(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, start=False)
    try:
        with daemon("--demo", "--mqtt", broker.url, "--node-id", "pi-b") as node:
            h = node.health()
            assert h["ok"] and h["mqtt"]["connected"] is False and h["mqtt"]["node_id"] == "pi-b"
            frames = ws_frames(node.url, lambda fs: any(f["type"] == "prediction" for f in fs))
            assert frames  # the deck is served with no broker anywhere
            until(lambda: node.health()["mqtt"]["outbox"] > 0, what="the outbox filling")
            broker.start()
            until(lambda: node.health()["mqtt"]["connected"], timeout=20, what="the late connection")
            probe = Probe(broker.port, "phasewatch/v1/pi-b/status")
            try:
                until(lambda: probe.topics().get("phasewatch/v1/pi-b/status", {}).get("state") == "online")
                node.proc.send_signal(signal.SIGKILL)  # no goodbye: the broker sends the will
                node.proc.wait(5)
                st = until(
                    lambda: (
                        (s := probe.topics().get("phasewatch/v1/pi-b/status", {})).get("state") == "offline"
                        and s
                    ),
                    timeout=10,
                    what="the last will",
                )
                assert st["node"] == "pi-b" and st["schema_hash"]
            finally:
                probe.close()
    finally:
        broker.stop()


@pytest.mark.parametrize(
    "args,says",
    [
        (["--demo", "--mqtt", "http://broker"], "mqtt:// or mqtts://"),
        (["--demo", "--mqtt", "mqtt://broker", "--node-id", "lab/pi"], "--node-id"),
        (["--fleet", "mqtt://b", "--mqtt", "mqtt://b"], "give one"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], says: str) -> None:
    r = subprocess.run([*_cmd(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert says in last and "Traceback" not in r.stderr
