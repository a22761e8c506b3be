"""The server side of one WebSocket on any ``trio.abc.Stream``: wsproto speaks the protocol
(sans-I/O), this module moves its bytes.

    ws = await accept(stream, conn, request)         # the 101 on the request h11 parsed
    async with trio.open_nursery() as n:              # what edge.server runs per browser
        n.start_soon(ws.pump, client, limits)         # queued frames out, many per write
        n.start_soon(ws.incoming, limits)             # pings, pongs, closes; hostile input ends it
        n.start_soon(ws.keepalive, limits)

Why not trio-websocket on the server: it encodes every message for every client through its
own wsproto connection and writes each with its own ``send_all``, so 100 clients cost 100
encodings and 100 system calls per event, and a client that falls behind gets its backlog one
message per write. Here ``edge.broadcast`` frames each event once (``edge.wsframe``,
``Frame.wire``) and a client's pump sends everything queued for it in one write of at most
``ws_send_batch`` bytes. The deck's protocol is unchanged: one JSON event per text message.

Each coroutine returns why the connection should end (``Ending``); the caller closes it
(``close``) and counts the reason.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from typing import Final, Literal, Protocol

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from .broadcast import Client, ClientClosed, Frame
from .httpio import RECV, header
from .metrics import Metrics

# closed: the peer went (or closed politely); the rest are the server's decision
Ending = Literal[
    "closed", "stalled", "send_timeout", "pong_timeout", "ws_binary", "ws_too_big", "ws_flood", "ws_protocol"
]
# Endings the server announces with a close frame (code, and the reason text is the ending);
# after the others (a peer that does not read or answer) there is no polite close.
CLOSE_CODES: Final = {"ws_binary": 1003, "ws_flood": 1008, "ws_too_big": 1009, "ws_protocol": 1002}


def batches(frames: Sequence[Frame], max_bytes: int) -> Iterator[Sequence[Frame]]:
    """Consecutive runs of ``frames`` of about ``max_bytes`` of wire bytes (each at least one frame)."""
    start = size = 0
    for i, frame in enumerate(frames):
        if size and size + len(frame.wire) > max_bytes:
            yield frames[start:i]
            start, size = i, 0
        size += len(frame.wire)
    if start < len(frames):
        yield frames[start:]


class WsLimits(Protocol):
    """The ``edge.server.Limits`` fields this module reads."""

    @property
    def ws_send_timeout(self) -> float: ...
    @property
    def ws_send_batch(self) -> int: ...
    @property
    def ws_ping_interval(self) -> float: ...
    @property
    def ws_pong_timeout(self) -> float: ...
    @property
    def ws_max_incoming(self) -> int: ...
    @property
    def ws_incoming_burst(self) -> int: ...
    @property
    def ws_incoming_window(self) -> float: ...
    @property
    def ws_close_timeout(self) -> float: ...


def handshake_problem(request: h11.Request) -> str | None:
    """Why ``request`` is not a WebSocket opening handshake this server accepts, or None."""
    if "websocket" not in (header(request, b"upgrade") or "").lower():
        return "Upgrade: websocket missing"
    if "upgrade" not in (header(request, b"connection") or "").lower():
        return "Connection: Upgrade missing"
    if not header(request, b"sec-websocket-key"):
        return "Sec-WebSocket-Key missing"
    if header(request, b"sec-websocket-version") != "13":
        return "Sec-WebSocket-Version is not 13"
    return None


async def accept(stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request) -> WebSocket:
    """Send the 101 for a request ``handshake_problem`` passed; bytes the client sent after its
    head (h11's trailing data) are handed to the WebSocket, not lost."""
    key = (header(request, b"sec-websocket-key") or "").encode("latin-1")
    data = conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(key)),
            ],
            reason=b"Switching Protocols",
        )
    )
    await stream.send_all(data or b"")
    ws = WebSocket(stream)
    ws.proto.receive_data(conn.trailing_data[0])
    return ws


class WebSocket:
    """One accepted WebSocket: one writer at a time (``send``), one reader (``incoming``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.proto = Connection(ConnectionType.SERVER)
        self.broken = False  # a write failed or was cancelled part way: the framing is lost
        self._lock = trio.StrictFIFOLock()
        self._pong: bytes | None = None  # the payload of the ping awaiting its pong
        self._peer_close: CloseConnection | None = None
        self._ponged = trio.Event()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except BaseException:
                self.broken = True
                raise

    async def pump(self, client: Client, limits: WsLimits, metrics: Metrics | None = None) -> Ending:
        """The sticky replay, then live frames: everything queued goes in one write of at most
        ``ws_send_batch`` bytes, each write under ``ws_send_timeout``."""
        replay, client.replay = client.replay, []  # the replay can be large: don't keep it
        try:
            for batch in batches(replay, limits.ws_send_batch):
                await self._send_frames(batch, limits, metrics)
            replay = []
            while True:
                await self._send_frames(await client.receive_many(limits.ws_send_batch), limits, metrics)
        except ClientClosed as exc:
            return "stalled" if exc.reason == "stalled" else "closed"
        except trio.TooSlowError:
            return "send_timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "closed"

    async def _send_frames(self, frames: Sequence[Frame], limits: WsLimits, metrics: Metrics | None) -> None:
        if not frames:
            return
        with trio.fail_after(limits.ws_send_timeout):
            await self.send(b"".join(f.wire for f in frames))
        if metrics is not None:
            for kind, n in collections.Counter(f.type for f in frames).items():
                metrics.events_sent.inc(n, type=kind)

    async def keepalive(self, limits: WsLimits) -> Ending:
        """A ping every ``ws_ping_interval`` s; no matching pong within ``ws_pong_timeout``: ends."""
        while True:
            await trio.sleep(limits.ws_ping_interval)
            self._pong, self._ponged = os.urandom(4), trio.Event()
            with trio.move_on_after(limits.ws_pong_timeout) as waited:
                try:
                    await self.send(self.proto.send(Ping(payload=self._pong)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return "closed"
                await self._ponged.wait()
            if waited.cancelled_caught:
                return "pong_timeout"

    async def incoming(self, limits: WsLimits) -> Ending:
        """Read what the client sends (pongs and closes must get through) and drop its messages;
        a binary message, a message over ``ws_max_incoming`` or more than ``ws_incoming_burst``
        messages in ``ws_incoming_window`` s ends it."""
        burst, window = limits.ws_incoming_burst, limits.ws_incoming_window
        seen: collections.deque[float] = collections.deque(maxlen=burst + 1)
        size = 0  # of the text message being received
        while True:
            for event in self.proto.events():
                if isinstance(event, TextMessage):
                    size += len(event.data)
                    if size > limits.ws_max_incoming:
                        return "ws_too_big"
                    if event.message_finished:
                        size = 0
                        seen.append(trio.current_time())
                        if len(seen) > burst and seen[-1] - seen[0] < window:
                            return "ws_flood"
                elif isinstance(event, BytesMessage):
                    return "ws_binary"
                elif isinstance(event, Ping):
                    try:
                        await self.send(self.proto.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return "closed"
                elif isinstance(event, Pong):
                    if event.payload == self._pong:
                        self._ponged.set()
                elif isinstance(event, CloseConnection):
                    if self.proto.state is ConnectionState.REMOTE_CLOSING:
                        self._peer_close = event  # the peer's close; ``close`` answers it
                        return "closed"
                    return "ws_protocol"  # wsproto could not parse a frame (its CloseConnection)
            try:
                data = await self.stream.receive_some(RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "closed"
            if not data:
                return "closed"
            self.proto.receive_data(bytes(data))

    async def close(self, ending: Ending, limits: WsLimits) -> None:
        """Answer a peer's close, or announce the server's (``CLOSE_CODES``) and read until the
        peer's answer so unread input does not reset the connection under the close frame.
        A peer that does not read (stalled, send_timeout, pong_timeout) gets no close frame."""
        code = CLOSE_CODES.get(ending)
        if self.broken or (ending != "closed" and code is None):
            return
        with trio.move_on_after(limits.ws_close_timeout):
            try:
                if self._peer_close is not None and self.proto.state is ConnectionState.REMOTE_CLOSING:
                    await self.send(self.proto.send(self._peer_close.response()))
                    return
                if self.proto.state is not ConnectionState.OPEN:
                    return
                await self.send(self.proto.send(CloseConnection(code=code or 1000, reason=ending)))
                while self.proto.state is not ConnectionState.CLOSED:
                    data = await self.stream.receive_some(RECV)
                    if not data:
                        return
                    self.proto.receive_data(bytes(data))
                    for _ in self.proto.events():
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
