"""Every event a daemon emits, also on an MQTT broker (SPEC section 10), off the inference path.

    bridge = MqttPublisher(parse_broker_url("mqtt://edge:secret@broker:1883"), node="pi-bench-3",
                           metrics=daemon.metrics, describe=daemon.node_status)
    bridge.attach(daemon.broadcaster)        # every published event is offered to the outbox
    async with trio.open_nursery() as n:
        await n.start(bridge.run)            # paho's network thread, the pump thread, heartbeats

Topics: ``phasewatch/v1/<node>/<type>``, and ``.../<type>/<key>`` for the sticky types that hold
one value per model or profile (a retained message is one per topic). The payload is the
WebSocket's msgspec JSON with ``node`` set. ``DELIVERY`` says per type which QoS and whether
retained. ``.../status`` carries a ``NodeStatus``: online at every (re)connect and every
``status_interval_s``, offline as the last will and on a clean stop.

Threads: ``offer()`` runs on the trio thread and only appends to the ``Outbox`` (a deque behind
a lock; full -> the oldest QoS 0 message goes, then the oldest QoS 1 one, never a QoS 1 one for
a QoS 0 one; counted by type). The
pump thread takes from it while connected and hands messages to paho (``loop_start``'s thread
does the network and reconnects with back-off). QoS 1 messages paho holds survive a reconnect
(persistent session, ``clean_session=False``). Nothing here ever waits on the broker from trio.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, NamedTuple

import paho.mqtt.client as mqtt
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from schema.events import Event, NodeStatus, encode_event, event_type, with_node

from .broadcast import STATE_KEYS, Broadcaster
from .metrics import Metrics

log = logging.getLogger("edge.mqtt")

TOPIC_ROOT: Final = "phasewatch/v1"
STATUS: Final = "status"
_FORBIDDEN: Final = frozenset("+#/\0")
MAX_TOPIC_PART: Final = 128


class Delivery(NamedTuple):
    qos: int
    retain: bool


# Per event type: sticky types are retained (a late subscriber gets the latest state) and go at
# QoS 1 because they are rare and a lost one stays wrong until the next; prediction and
# episode at QoS 1 (SPEC); the high-rate, self-healing streams at QoS 0.
DELIVERY: Final[Mapping[str, Delivery]] = {
    "snapshot": Delivery(1, True),
    "attack_profile": Delivery(1, True),
    "model_metric": Delivery(1, True),
    "model_perf": Delivery(1, True),
    "prediction": Delivery(1, False),
    "episode": Delivery(1, False),
    "phase": Delivery(0, False),
    "embedding": Delivery(0, False),
    STATUS: Delivery(1, True),
}


class BrokerURL(NamedTuple):
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``; ValueError says what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host (mqtt://host[:port])")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: only mqtt://[user:pass@]host[:port], nothing after the port")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r}: bad port ({e})") from None
    tls = parts.scheme == "mqtts"
    return BrokerURL(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
    )


def check_topic_part(value: str, what: str = "node id") -> str:
    """A topic level we put our name on: non-empty, no ``+ # /`` (MQTT wildcards, separator)."""
    if not value:
        raise ValueError(f"{what} is empty")
    bad = sorted(set(value) & _FORBIDDEN)
    if bad:
        raise ValueError(f"{what} {value!r} contains {' '.join(map(repr, bad))}; topic parts may not")
    if len(value.encode()) > MAX_TOPIC_PART:
        raise ValueError(f"{what} {value!r} is over {MAX_TOPIC_PART} bytes")
    return value


def default_node_id() -> str:
    """The hostname, made into a valid topic part."""
    name = socket.gethostname() or "node"
    return "".join("_" if c in _FORBIDDEN else c for c in name)[:MAX_TOPIC_PART]


def _key_part(key: str) -> str:
    return "".join("_" if c in _FORBIDDEN else c for c in key)[:MAX_TOPIC_PART] or "_"


def topic_for(node: str, event: Event | NodeStatus) -> str:
    kind = event_type(event)
    base = f"{TOPIC_ROOT}/{node}/{kind}"
    keyer = STATE_KEYS.get(kind)
    key = keyer(event) if keyer is not None and not isinstance(event, NodeStatus) else ""
    key = "-".join(part for part in key.split("\0") if part)  # the broadcaster's (model, threat model)
    return f"{base}/{_key_part(key)}" if key else base


def nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's on_socket_open: small events go out at once, not after Nagle waits for an ACK that
    the broker delays (~40 ms a hop)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def version() -> str:
    try:
        return metadata.version("phasewatch")
    except metadata.PackageNotFoundError:
        return "0+checkout"


@dataclass(frozen=True)
class MqttConfig:
    outbox: int = 10_000  # messages waiting while the broker is away (~20 min of 30 live episodes)
    paho_window: int = 1_000  # QoS 1 messages handed to paho and not yet acknowledged
    max_inflight: int = 100  # unacknowledged QoS 1 publishes on the wire
    keepalive_s: int = 30  # the broker declares us dead (last will) after 1.5x this of silence
    reconnect_min_s: float = 0.5  # paho's back-off doubles from here...
    reconnect_max_s: float = 30.0  # ...up to here
    status_interval_s: float = 10.0  # heartbeat: live episodes, windows/s, drops
    stop_timeout_s: float = 3.0  # on a clean stop: flush, say offline, disconnect
    ca_file: Path | None = None  # mqtts: trust this CA instead of the system's


DEFAULT_CONFIG: Final = MqttConfig()


class Item(NamedTuple):
    type: str
    qos: int
    event: Event


class Outbox:
    """Bounded FIFO shared by the trio thread (put) and the pump thread (take)."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self._q: deque[Item] = deque()
        self._qos0 = 0

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Item) -> Item | None:
        """Queue without waiting; returns the item dropped to make room, if any."""
        with self.cond:
            if len(self._q) < self.maxlen:
                dropped = None
            elif item.qos == 0 and not self._qos0:
                return item  # never a QoS 1 message for a QoS 0 one
            else:
                dropped = self._evict()
            self._q.append(item)
            self._qos0 += item.qos == 0
            if len(self._q) == 1:  # the pump waits only on an empty box (or for a connection)
                self.cond.notify()
        return dropped

    def _evict(self) -> Item:
        if self._qos0:  # the self-healing streams go first
            for i, it in enumerate(self._q):
                if it.qos == 0:
                    del self._q[i]
                    self._qos0 -= 1
                    return it
        it = self._q.popleft()
        self._qos0 -= it.qos == 0
        return it

    def take(self) -> Item | None:
        """Under ``cond``: the oldest item or None."""
        if not self._q:
            return None
        it = self._q.popleft()
        self._qos0 -= it.qos == 0
        return it

    def untake(self, item: Item) -> None:
        """Under ``cond``: put back at the front what paho would not take yet."""
        self._q.appendleft(item)
        self._qos0 += item.qos == 0


@dataclass
class _Stats:
    connects: int = 0
    last_error: str | None = None
    connected_since: float | None = None
    predictions: int = 0
    dropped_by_type: dict[str, int] = field(default_factory=dict)


class MqttPublisher:
    def __init__(
        self,
        broker: BrokerURL,
        *,
        node: str,
        metrics: Metrics,
        describe: Callable[[], NodeStatus] = lambda: NodeStatus(state="online"),
        config: MqttConfig = DEFAULT_CONFIG,
    ) -> None:
        self.broker = broker
        self.node = check_topic_part(node)
        self.config = config
        self.describe = describe
        self.outbox = Outbox(config.outbox)
        self.stats = _Stats()
        self._connected = False
        self._stopping = False
        self._primary: str | None = None
        self._status = self._stamp(NodeStatus(state="online"))
        r = metrics.registry
        self.m_published = r.counter(
            "phasewatch_mqtt_published_total", "Events handed to the MQTT client, by type.", ("type",)
        )
        self.m_dropped = r.counter(
            "phasewatch_mqtt_dropped_total",
            "Events that never reached the broker (outbox full, or QoS 0 while disconnected), by type.",
            ("type",),
        )
        self.m_outbox = r.gauge("phasewatch_mqtt_outbox", "Events waiting in the MQTT outbox.")
        self.m_connected = r.gauge("phasewatch_mqtt_connected", "1 while connected to the broker.")
        self.m_connects = r.counter(
            "phasewatch_mqtt_connects_total", "Successful (re)connects to the broker."
        )
        self.client = self._client()

    # --- paho ---

    def _client(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"phasewatch-node-{self.node}",
            clean_session=False,  # the broker keeps our session; paho resends unacked QoS 1
            protocol=mqtt.MQTTv311,
        )
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            ca = str(self.config.ca_file) if self.config.ca_file else None
            c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
        c.max_inflight_messages_set(self.config.max_inflight)
        c.max_queued_messages_set(self.config.paho_window)
        c.reconnect_delay_set(min_delay=self.config.reconnect_min_s, max_delay=self.config.reconnect_max_s)  # type: ignore[arg-type]
        offline = self._stamp(NodeStatus(state="offline"))
        c.will_set(f"{TOPIC_ROOT}/{self.node}/{STATUS}", encode_event(offline), qos=1, retain=True)
        c.on_socket_open = nodelay
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        return c

    def _stamp(self, st: NodeStatus) -> NodeStatus:
        from schema.hashing import schema_hash

        return NodeStatus(
            state=st.state,
            node=self.node,
            version=st.version or version(),
            schema_hash=st.schema_hash or schema_hash(),
            models=st.models,
            primary_model=st.primary_model,
            live_episodes=st.live_episodes,
            windows_per_s=st.windows_per_s,
            dropped=st.dropped,
            t_ns=time.time_ns(),
        )

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.stats.last_error = f"broker refused the connection: {rc}"
            log.warning("MQTT %s refused us: %s", self.broker, rc)
            return
        # Birth first (retained): whoever subscribes learns we are back before our events.
        client.publish(f"{TOPIC_ROOT}/{self.node}/{STATUS}", encode_event(self._status), qos=1, retain=True)
        with self.outbox.cond:
            self._connected = True
            self.stats.connects += 1
            self.stats.connected_since = time.time()
            self.stats.last_error = None
            self.outbox.cond.notify_all()
        self.m_connects.inc()
        self.m_connected.set(1)
        log.info(
            "MQTT connected to %s as %s (session present: %s)", self.broker, self.node, flags.session_present
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.stats.last_error = f"cannot reach {self.broker} (refused, unreachable or TLS failed); retrying"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.outbox.cond:
            self._connected = False
            self.stats.connected_since = None
        self.m_connected.set(0)
        if not self._stopping:
            self.stats.last_error = f"disconnected: {rc}"
            log.warning("MQTT lost %s (%s); reconnecting with back-off", self.broker, rc)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.outbox.cond:  # paho has room again
            self.outbox.cond.notify_all()

    # --- the trio side ---

    def attach(self, broadcaster: Broadcaster) -> None:
        broadcaster.taps.append(self.offer)

    def offer(self, event: Event) -> None:
        """Called for every event the daemon publishes; never blocks on the broker."""
        kind = event_type(event)
        if kind == "prediction" and (
            self._primary is None or getattr(event, "model", None) in (None, self._primary)
        ):
            self.stats.predictions += 1
        dropped = self.outbox.put(Item(kind, DELIVERY[kind].qos, event))
        if dropped is not None:
            self._drop(dropped.type)
        self.m_outbox.set(len(self.outbox))

    def _drop(self, kind: str) -> None:
        self.m_dropped.inc(type=kind)
        self.stats.dropped_by_type[kind] = self.stats.dropped_by_type.get(kind, 0) + 1

    def _refresh_status(self, windows_per_s: float | None) -> NodeStatus:
        st = self.describe()
        self._primary = st.primary_model
        st.windows_per_s = None if windows_per_s is None else round(windows_per_s, 2)
        st.dropped = sum(self.stats.dropped_by_type.values())
        self._status = self._stamp(st)
        return self._status

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect in the background, pump, send a heartbeat; on cancel say offline and go."""
        self._refresh_status(None)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()  # paho's thread: connects, retries with back-off, does the I/O
        pump = threading.Thread(target=self._pump, name=f"mqtt-pump-{self.node}", daemon=True)
        pump.start()
        task_status.started()
        try:
            seen, t0 = self.stats.predictions, trio.current_time()
            while True:
                await trio.sleep(self.config.status_interval_s)
                now = trio.current_time()
                rate = (self.stats.predictions - seen) / max(1e-9, now - t0)
                seen, t0 = self.stats.predictions, now
                st = self._refresh_status(rate)
                self.outbox.put(Item(STATUS, 1, st))  # type: ignore[arg-type]
                self.m_outbox.set(len(self.outbox))
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop, pump)

    def _pump(self) -> None:
        ob = self.outbox
        while True:
            with ob.cond:
                while not self._stopping and not (self._connected and len(ob)):
                    ob.cond.wait(1.0)
                if self._stopping and not (self._connected and len(ob)):
                    return
                item = ob.take()
            if item is None:
                continue
            node_event = (
                item.event if isinstance(item.event, NodeStatus) else with_node(item.event, self.node)
            )
            d = DELIVERY[item.type]
            info = self.client.publish(
                topic_for(self.node, node_event), encode_event(node_event), qos=d.qos, retain=d.retain
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # paho's window is full: wait for acks
                with ob.cond:
                    ob.untake(item)
                    ob.cond.wait(0.2)
                continue
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or d.qos > 0:  # paho keeps QoS 1 for later
                self.m_published.inc(type=item.type)
            else:
                self._drop(item.type)
            self.m_outbox.set(len(ob))

    def _stop(self, pump: threading.Thread) -> None:
        """Worker thread: flush what we can, publish offline (no will for a clean stop), disconnect."""
        deadline = time.monotonic() + self.config.stop_timeout_s
        with self.outbox.cond:
            self._stopping = True
            self.outbox.cond.notify_all()
        pump.join(max(0.0, deadline - time.monotonic()))
        if self._connected:
            offline = self._stamp(NodeStatus(state="offline", models=self._status.models))
            info = self.client.publish(
                f"{TOPIC_ROOT}/{self.node}/{STATUS}", encode_event(offline), qos=1, retain=True
            )
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.m_connected.set(0)

    # --- health ---

    def health(self) -> dict[str, Any]:
        return {
            "broker": str(self.broker),
            "node_id": self.node,
            "connected": self._connected,
            "connected_since": self.stats.connected_since,
            "connects": self.stats.connects,
            "outbox": len(self.outbox),
            "outbox_max": self.outbox.maxlen,
            "dropped": dict(sorted(self.stats.dropped_by_type.items())),
            "last_error": self.stats.last_error,
        }


@dataclass(frozen=True)
class CliSettings:
    """What ``--mqtt/--node-id/--mqtt-ca/--fleet`` asked for, checked; ``install`` wires it in."""

    publish: BrokerURL | None = None
    node: str = ""
    fleet: BrokerURL | None = None
    config: MqttConfig = DEFAULT_CONFIG

    def install(self, daemon: Any) -> None:
        """Give an ``edge.daemon.Daemon`` its MQTT publisher or fleet reader (before it runs)."""
        if self.publish is not None:
            bridge = MqttPublisher(
                self.publish,
                node=self.node,
                metrics=daemon.metrics,
                describe=daemon.node_status,
                config=self.config,
            )
            bridge.attach(daemon.broadcaster)  # before run(): the startup events go out too
            daemon.mqtt = bridge
        if self.fleet is not None:
            from .fleet import FLEET_STICKY, FleetReader

            # a fleet deck remembers every node's state: a broadcaster with room for it
            daemon.broadcaster = Broadcaster(metrics=daemon.metrics, sticky=FLEET_STICKY)
            daemon.fleet = FleetReader(
                self.fleet,
                broadcaster=daemon.broadcaster,
                metrics=daemon.metrics,
                # stable across restarts (the broker keeps this session), distinct per fleet deck
                client_id=f"phasewatch-fleet-{default_node_id()}-{daemon.port}",
                config=self.config,
            )


def cli_settings(
    mqtt_url: str | None, node_id: str | None, ca_file: Path | str | None, fleet_url: str | None
) -> CliSettings:
    """ValueError with a one-line fix for whatever is wrong."""
    if mqtt_url and fleet_url:
        raise ValueError("--fleet reads the broker and --mqtt writes to it: give one (unset PHASEWATCH_MQTT)")
    ca = Path(ca_file) if ca_file else None
    if ca is not None and not ca.is_file():
        raise ValueError(f"--mqtt-ca {ca}: no such file")
    config = MqttConfig(ca_file=ca)
    url = mqtt_url or fleet_url
    broker = parse_broker_url(url) if url else None
    if ca is not None and (broker is None or not broker.tls):
        raise ValueError("--mqtt-ca is for an mqtts:// broker")
    node = ""
    if mqtt_url:
        node = node_id or default_node_id()
        try:
            check_topic_part(node)
        except ValueError as e:
            raise ValueError(f"{e} (pass --node-id NAME)") from None
    return CliSettings(
        publish=broker if mqtt_url else None,
        node=node,
        fleet=broker if fleet_url else None,
        config=config,
    )
