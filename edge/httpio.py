"""HTTP/1.1 over any ``trio.abc.Stream``: h11 does the protocol, these helpers move its bytes.

The server's connection handler (``edge.server.Server.handle``) is written against these, so
it runs the same on a TCP socket and on ``trio.testing.memory_stream_pair()`` (the tests drive
timeouts, pings, slowloris and 413 there under ``MockClock``, without a port or a real sleep).

Every wait here is on the peer; the caller puts it under a deadline (``fail_after`` at the
call site, from ``edge.server.Limits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import h11
import msgspec
import trio

JSON: Final = "application/json"
RECV: Final = 16 << 10  # bytes asked of the stream per receive
_json = msgspec.json.Encoder()


class TooLarge(Exception):
    """A request body went over its limit while being read (chunked, or a lying Content-Length)."""


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    @classmethod
    def json(cls, status: int, obj: Any, **kw: Any) -> Reply:
        return cls(status, _json.encode(obj), JSON, **kw)


def header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def next_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    """The next request head, or None when the peer closed between requests."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECV)))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed, or PAUSED after a refused upgrade
            return None


async def read_body(stream: trio.abc.Stream, conn: h11.Connection, limit: int) -> bytes:
    """The whole body; ``TooLarge`` as soon as more than ``limit`` bytes arrived."""
    await _continue(stream, conn)
    chunks: list[bytes] = []
    size = 0
    while (data := await _next_data(stream, conn)) is not None:
        size += len(data)
        if size > limit:  # chunked or lying Content-Length: enforce while reading
            raise TooLarge
        chunks.append(data)
    return b"".join(chunks)


async def drain_body(stream: trio.abc.Stream, conn: h11.Connection, bound: int) -> bool:
    """Read and drop the rest of the body, at most ``bound`` bytes; True if it all came.

    A client that writes its whole body before reading (urllib, and so ``schema.publisher``)
    only sees an early refusal if the body was read: closing a socket with unread input sends
    a reset, which the client meets as EPIPE while still writing."""
    await _continue(stream, conn)
    seen = 0
    while (data := await _next_data(stream, conn)) is not None:
        seen += len(data)
        if seen > bound:
            return False
    return True


async def _continue(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    if conn.they_are_waiting_for_100_continue:  # curl waits a second for this before a big body
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))


async def _next_data(stream: trio.abc.Stream, conn: h11.Connection) -> bytes | None:
    """The next piece of the request body, None at its end."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECV)))
        elif isinstance(event, h11.Data):
            return bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return None
        else:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in request body")


async def discard_unread(stream: trio.abc.Stream, limit: int, timeout: float = 1.0) -> None:
    """Before closing with input unread: half-close, then read and drop some of it, since closing
    a socket with unread input sends a reset that can destroy the reply before the client reads it."""
    with trio.move_on_after(timeout):
        await stream.send_eof()  # type: ignore[attr-defined]
        seen = 0
        while seen <= 4 * limit:
            chunk = await stream.receive_some(RECV)
            if not chunk:
                return
            seen += len(chunk)


async def send_reply(
    stream: trio.abc.Stream, conn: h11.Connection, reply: Reply, *, head_only: bool = False
) -> None:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-cache"),
        ("x-content-type-options", "nosniff"),
        *reply.headers,
    ]
    if reply.close:
        headers.append(("connection", "close"))
    out = conn.send(
        h11.Response(status_code=reply.status, headers=headers, reason=HTTPStatus(reply.status).phrase)
    )
    if reply.body and not head_only:
        out += conn.send(h11.Data(data=reply.body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
