"""``edge-daemon --fleet mqtt://...``: one deck for every node that publishes to the broker.

    reader = FleetReader(parse_broker_url(url), broadcaster=daemon.broadcaster, metrics=daemon.metrics)
    async with trio.open_nursery() as n:
        await n.start(reader.run)

Subscribes to ``phasewatch/v1/+/#`` at QoS 1 with a persistent session (a broker restart or a
short outage of this reader loses no QoS 1 message the broker queued for it). paho's network
thread decodes each message (``decode_fleet_event``) and hands it to the trio loop with
``TrioToken.run_sync_soon``: it never waits for trio, and trio never waits for the broker.

The topic is the truth about who sent a message: the broker's ACLs let a node write only under
its own id, so ``node`` is set from the topic, and a payload that claims another node is counted
(``phasewatch_fleet_rejected_total{reason="node_mismatch"}``) and relabelled. What cannot be
decoded is counted by reason and dropped; one bad message never stops the reader.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import paho.mqtt.client as mqtt
import trio
from paho.mqtt.enums import CallbackAPIVersion

from schema.events import EVENT_TYPES, Event, NodeStatus, decode_fleet_event, event_type

from .broadcast import Broadcaster, StickyLimits
from .metrics import Metrics
from .mqtt import DEFAULT_CONFIG, STATUS, TOPIC_ROOT, BrokerURL, MqttConfig, check_topic_part, nodelay

log = logging.getLogger("edge.fleet")

SUBSCRIPTION: Final = f"{TOPIC_ROOT}/+/#"
_ROOT_LEVELS: Final = len(TOPIC_ROOT.split("/"))
_KNOWN: Final = frozenset((*EVENT_TYPES, STATUS))

# Why a message off the broker was not relayed (phasewatch_fleet_rejected_total{reason}).
REJECT_REASONS: Final[Mapping[str, str]] = {
    "bad_topic": "not phasewatch/v1/<node>/<type>[/<key>]",
    "unknown_type": "a type this version does not know",
    "bad_payload": "not a valid event of its type",
    "type_mismatch": "the payload's type is not the topic's",
    "node_mismatch": "the payload names another node than its topic (relabelled, still relayed)",
    "internal": "relaying it failed (a bug; logged with its traceback)",
}

# A fleet's deck remembers more than one daemon's: latest-wins state per node and key (50 nodes x
# 12 models is 600 model_metric keys), and the prediction timelines of more episodes.
FLEET_STICKY: Final = StickyLimits(max_state_keys=8192, max_prediction_episodes=512, max_embeddings=5000)


@dataclass
class NodeView:
    """What the fleet knows about one node (for /healthz; the deck builds its own)."""

    state: str = "unknown"
    last_seen: float = 0.0
    events: int = 0
    status: NodeStatus | None = None


@dataclass
class FleetStats:
    connected: bool = False
    connects: int = 0
    last_error: str | None = None
    nodes: dict[str, NodeView] = field(default_factory=dict)


class FleetReader:
    def __init__(
        self,
        broker: BrokerURL,
        *,
        broadcaster: Broadcaster,
        metrics: Metrics,
        client_id: str | None = None,
        config: MqttConfig = DEFAULT_CONFIG,
    ) -> None:
        self.broker = broker
        self.broadcaster = broadcaster
        self.config = config
        self.client_id = check_topic_part(
            client_id or f"phasewatch-fleet-{socket.gethostname()}", "client id"
        )
        self.stats = FleetStats()
        self._token: trio.lowlevel.TrioToken | None = None
        r = metrics.registry
        self.m_received = r.counter(
            "phasewatch_fleet_received_total",
            "Messages relayed from the broker to the deck, by type.",
            ("type",),
        )
        self.m_rejected = r.counter(
            "phasewatch_fleet_rejected_total", "Broker messages not relayed as sent, by reason.", ("reason",)
        )
        self.m_nodes = r.gauge("phasewatch_fleet_nodes", "Nodes seen, by state.", ("state",))
        self.m_connected = r.gauge("phasewatch_fleet_connected", "1 while subscribed to the broker.")
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,  # the broker queues QoS 1 for us while we are away
            protocol=mqtt.MQTTv311,
        )
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            ca = str(self.config.ca_file) if self.config.ca_file else None
            c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(min_delay=self.config.reconnect_min_s, max_delay=self.config.reconnect_max_s)  # type: ignore[arg-type]
        c.on_socket_open = nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    # --- paho's thread ---

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.stats.last_error = f"broker refused the connection: {rc}"
            log.warning("fleet: %s refused us: %s", self.broker, rc)
            return
        client.subscribe(SUBSCRIPTION, qos=1)
        self.stats.connected = True
        self.stats.connects += 1
        self.stats.last_error = None
        self.m_connected.set(1)
        log.info("fleet: subscribed to %s on %s", SUBSCRIPTION, self.broker)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.stats.connected = False
        self.m_connected.set(0)
        if self._token is not None:  # not our own stop
            self.stats.last_error = f"disconnected: {rc}"
            log.warning("fleet: lost %s (%s); reconnecting", self.broker, rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got = parse_message(msg.topic, bytes(msg.payload))
        if isinstance(got, str):
            if got:
                self.m_rejected.inc(reason=got)
            return
        event, relabelled = got
        if relabelled:
            self.m_rejected.inc(reason="node_mismatch")
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._deliver, event)
            except trio.RunFinishedError:
                pass

    # --- the trio thread ---

    def _deliver(self, event: Event | NodeStatus) -> None:
        try:
            self._relay(event)
        except Exception:  # a callback that raised would end the trio run: one message must not
            log.exception("fleet: relaying a %s from %s failed", event_type(event), event.node)
            self.m_rejected.inc(reason="internal")

    def _relay(self, event: Event | NodeStatus) -> None:
        node = event.node or ""
        view = self.stats.nodes.get(node)
        if view is None:
            view = self.stats.nodes[node] = NodeView()
        view.last_seen = time.time()
        view.events += 1
        if isinstance(event, NodeStatus):
            view.state = event.state
            view.status = event
            self._count_nodes()
        elif view.state != "online":
            view.state = "online"  # it is talking, whatever its last status said
            self._count_nodes()
        self.m_received.inc(type=event_type(event))
        self.broadcaster.publish(event)

    def _count_nodes(self) -> None:
        states: dict[str, int] = {"online": 0, "offline": 0}
        for v in self.stats.nodes.values():
            states[v.state] = states.get(v.state, 0) + 1
        for s, n in states.items():
            self.m_nodes.set(n, state=s)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._token = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop)

    def _stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def health(self) -> dict[str, Any]:
        now = time.time()
        return {
            "broker": str(self.broker),
            "subscription": SUBSCRIPTION,
            "connected": self.stats.connected,
            "connects": self.stats.connects,
            "last_error": self.stats.last_error,
            "nodes": {
                node: {
                    "state": v.state,
                    "last_seen_s_ago": round(now - v.last_seen, 1),
                    "events": v.events,
                    "schema_hash": v.status.schema_hash if v.status else None,
                    "primary_model": v.status.primary_model if v.status else None,
                }
                for node, v in sorted(self.stats.nodes.items())
            },
        }


def parse_message(topic: str, payload: bytes) -> tuple[Event | NodeStatus, bool] | str:
    """(the event with its node set from the topic, whether that changed it), or why not.

    "" (no reason) for an empty payload: that is a retained message being cleared.
    """
    levels = topic.split("/")
    if (
        len(levels) not in (_ROOT_LEVELS + 2, _ROOT_LEVELS + 3)
        or "/".join(levels[:_ROOT_LEVELS]) != TOPIC_ROOT
    ):
        return "bad_topic"
    node, kind = levels[_ROOT_LEVELS], levels[_ROOT_LEVELS + 1]
    if not node:
        return "bad_topic"
    if kind not in _KNOWN:
        return "unknown_type"
    if not payload:
        return ""
    try:
        event = decode_fleet_event(payload)
    except msgspec.DecodeError:
        return "bad_payload"
    if event_type(event) != kind:
        return "type_mismatch"
    relabelled = event.node is not None and event.node != node
    if event.node != node:
        event = msgspec.structs.replace(event, node=node)
    return event, relabelled
