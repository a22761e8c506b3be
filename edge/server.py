"""One port for everything the deck and the producers need, on trio.

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            serve, broadcaster, port=8080, static_dir=deck_dir, health=health,
            metrics=metrics, publish_token=token))
        port = listeners[0].socket.getsockname()[1]      # the real port when port=0

Routes (HTTP/1.1 parsed with h11; keep-alive supported):

``GET /`` and ``GET /<file>``
    the deck's static files from ``static_dir`` (``index.html`` for a directory), with the
    content type browsers insist on for ES modules; nothing outside ``static_dir`` is served.
``GET /ws``
    WebSocket on the same connection (wsproto, ``edge.wsconn``): the sticky replay, then live
    events, one JSON event per text message, each framed once for all clients and sent many
    to a write. Pinged every ``ws_ping_interval`` s; a client that does not pong within
    ``ws_pong_timeout`` s, or cannot take one write (at most ``ws_send_batch`` bytes) in
    ``ws_send_timeout`` s, or falls ``QueuePolicy`` frames behind (``stalled``), is closed.
    What clients send is read and dropped; a binary frame (1003), a message over
    ``ws_max_incoming`` (1009), a frame wsproto cannot parse (1002) or more than
    ``ws_incoming_burst`` messages in ``ws_incoming_window`` s (1008) closes that client.
``POST /publish``
    one event or a JSON list (SPEC section 7), all validated before any is published.
    200 ``{"delivered": n}`` (n: browsers the events were queued for); 400
    ``{"error": ..., "field": "$.accuracy"}``; 401 unless the peer is loopback or sends
    ``Authorization: Bearer <publish_token>``; 403 for a browser's cross-origin POST; 413
    over ``max_body``, sent after reading the body when it is under ``max_drain`` (a client
    that writes all before reading, as urllib does, would otherwise meet a reset, not the 413).

``/publish`` and ``/ws`` answer only to the ``Host`` names of ``edge.access.HostPolicy``
(403 otherwise: DNS rebinding). ``Server.handle(stream, peer)`` serves one connection on any
``trio.abc.Stream``; the HTTP plumbing is ``edge.httpio``.
``GET /healthz``
    ``health()`` as JSON, plus ``clients``.
``GET /metrics``
    Prometheus text format 0.0.4.

Whatever one connection does, it ends that connection only (``PEER_ERRORS``); every wait on
a peer runs under a deadline from ``Limits``.
"""

from __future__ import annotations

import logging
import mimetypes
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h11
import msgspec
import trio

from schema.events import decode_events
from schema.publisher import MAX_BODY
from schema.rows import error_path

from .access import HostPolicy, host_name, is_loopback, publish_allowed
from .broadcast import Broadcaster, ClientClosed
from .httpio import (
    RECV,
    Reply,
    TooLarge,
    discard_unread,
    drain_body,
    header,
    next_request,
    read_body,
    send_reply,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .wsconn import CLOSE_CODES, Ending, WebSocket, accept, handshake_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_head: int = 16 << 10  # request line + headers
    head_timeout: float = 10.0  # the whole head must arrive within this (slowloris)
    request_timeout: float = 30.0  # body in + response out
    max_requests: int = 100  # per keep-alive connection
    max_static_bytes: int = 32 << 20
    ws_handshake_timeout: float = 10.0
    ws_ping_interval: float = 10.0
    ws_pong_timeout: float = 10.0
    ws_send_timeout: float = 10.0  # one write (what was queued, up to ws_send_batch) to one client
    ws_send_batch: int = 16 << 10  # bytes of queued frames one write to one client carries at most
    ws_max_incoming: int = 4 << 10  # largest client message; bigger ones close the socket (1009)
    ws_incoming_burst: int = 32  # client messages per ws_incoming_window s; more is a flood (1008)
    ws_incoming_window: float = 1.0
    ws_close_timeout: float = 2.0
    ws_send_buffer: int = 32 << 10  # SO_SNDBUF of a WebSocket: a client that stops reading blocks soon
    max_drain: int = 16 << 20  # an over-limit body up to this size is read before the 413 (see drain_body)


# Why the server ends a WebSocket itself, and the close code the client is told.
WS_CLOSE_CODES: Final[Mapping[str, int]] = CLOSE_CODES


# What may end one connection, and the reason it is counted under
# (phasewatch_connection_errors_total); anything else is logged with its traceback as "internal".
PEER_ERRORS: Final[Mapping[type[BaseException], str]] = {
    trio.TooSlowError: "timeout",
    trio.BrokenResourceError: "broken",
    trio.ClosedResourceError: "closed",
    h11.RemoteProtocolError: "bad_http",
    ClientClosed: "stalled",
}

CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # module scripts are refused under any other type
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8",
}

__all__ = ["PEER_ERRORS", "HostPolicy", "Limits", "Server", "is_loopback", "publish_allowed", "serve"]


def validation_field(error: msgspec.DecodeError) -> str | None:
    """The JSON path msgspec blames (``$.accuracy``, ``$[2].phase``), if any."""
    return error_path(str(error))


def _classify(exc: BaseException) -> str:
    for kind, reason in PEER_ERRORS.items():
        if isinstance(exc, kind):
            return reason
    inner = getattr(exc, "exceptions", None)  # an exception group from a nursery
    if inner:
        reasons = {_classify(e) for e in inner}
        if len(reasons) == 1:
            return reasons.pop()
    return "internal"


def _load_static(root: Path, parts: list[str], max_bytes: int) -> tuple[bytes, str] | None:
    """Runs in a worker thread: resolve inside root, read. None when absent or outside."""
    path = root.joinpath(*parts)
    try:
        if path.is_dir():
            path = path / "index.html"
        path = path.resolve(strict=True)
        if not path.is_relative_to(root) or not path.is_file() or path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    ctype = (
        CONTENT_TYPES.get(path.suffix.lower())
        or mimetypes.guess_type(path.name)[0]
        or "application/octet-stream"
    )
    return data, ctype


# (request, peer address, its h11 connection, its stream) -> the reply
_Handler = Callable[[h11.Request, "str | None", h11.Connection, trio.abc.Stream], Awaitable[Reply]]


class Server:
    """The routes and the per-connection protocol; ``handle(stream, peer)`` serves one
    connection on any ``trio.abc.Stream`` (``serve`` gives it TCP ones)."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        *,
        static_root: Path | None = None,
        health: Callable[[], Mapping[str, Any]] = dict,
        metrics: Metrics | None = None,
        publish_token: str | None = None,
        max_body: int = MAX_BODY,
        limits: Limits = Limits(),
        trust_loopback: bool = True,
        hosts: HostPolicy | None = None,
    ) -> None:
        self.broadcaster = broadcaster
        self.static_root = static_root
        self.health = health
        self.metrics = metrics if metrics is not None else broadcaster.metrics
        self.hosts = hosts if hosts is not None else HostPolicy.for_daemon()
        self.publish_token = publish_token
        self.max_body = max_body
        self.limits = limits
        self.trust_loopback = trust_loopback
        self.routes: Mapping[str, tuple[tuple[str, ...], _Handler]] = {
            "/publish": (("POST",), self._publish),
            "/healthz": (("GET", "HEAD"), self._healthz),
            "/metrics": (("GET", "HEAD"), self._metrics),
        }

    async def handle(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """One connection (``peer``: its address, else the socket's); never raises (except
        Cancelled), so the server outlives any peer."""
        peer = peer if peer is not None else _peer(stream)
        try:
            await self._connection(stream, peer)
        except Exception as exc:
            reason = _classify(exc)
            self.metrics.connection_errors.inc(reason=reason)
            if reason == "internal":
                logger.exception("connection from %s failed", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.abc.Stream, peer: str | None) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        for _ in range(self.limits.max_requests):
            try:
                with trio.fail_after(self.limits.head_timeout):
                    request = await next_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                await self._refuse(stream, conn, exc.error_status_hint, str(exc))
                raise
            if request is None:
                return
            path = urllib.parse.urlsplit(request.target.decode("latin-1")).path
            if path == "/ws" and request.method == b"GET" and header(request, b"upgrade"):
                await self._websocket(stream, conn, request)
                return
            with trio.fail_after(self.limits.request_timeout):
                reply = await self._dispatch(request, path, peer, conn, stream)
                await send_reply(stream, conn, reply, head_only=request.method == b"HEAD")
                if conn.our_state is h11.DONE and conn.their_state is h11.SEND_BODY:
                    # a GET's (empty) body is still unread; read it so the connection can be reused
                    try:
                        await read_body(stream, conn, RECV)
                    except TooLarge:
                        return
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                if conn.their_state is h11.SEND_BODY:
                    await discard_unread(stream, self.max_body)
                return

    async def _refuse(self, stream: trio.abc.Stream, conn: h11.Connection, status: int, detail: str) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with trio.move_on_after(self.limits.request_timeout):
                await send_reply(stream, conn, Reply.json(status, {"error": detail}, close=True))

    async def _dispatch(
        self, request: h11.Request, path: str, peer: str | None, conn: h11.Connection, stream: trio.abc.Stream
    ) -> Reply:
        method = request.method.decode("latin-1")
        if path == "/ws":
            return Reply.json(426, {"error": "GET /ws is a WebSocket"}, headers=(("upgrade", "websocket"),))
        route = self.routes.get(path)
        allowed, handler = route if route else (("GET", "HEAD"), self._static)
        if method not in allowed:
            return Reply.json(
                405, {"error": f"{method} not allowed on {path}"}, headers=(("allow", ", ".join(allowed)),)
            )
        return await handler(request, peer, conn, stream)

    async def _publish(
        self, request: h11.Request, peer: str | None, conn: h11.Connection, stream: trio.abc.Stream
    ) -> Reply:
        if refused := self._misdirected(request):
            return refused
        auth = header(request, b"authorization")
        if not publish_allowed(peer, auth, self.publish_token, trust_loopback=self.trust_loopback):
            return Reply.json(
                401,
                {"error": "publishing needs loopback or Authorization: Bearer <token>"},
                headers=(("www-authenticate", "Bearer"),),
                close=True,
            )
        origin = header(request, b"origin")
        if origin and urllib.parse.urlsplit(origin).netloc != (header(request, b"host") or ""):
            # a web page in some browser may not post to a daemon it happens to reach
            return Reply.json(403, {"error": f"cross-origin publish from {origin} refused"}, close=True)
        length = header(request, b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > self.max_body:
            if declared <= self.limits.max_drain:  # read it, so a client still writing sees the 413
                await drain_body(stream, conn, self.limits.max_drain)
            return Reply.json(413, {"error": f"body of {length} bytes is over {self.max_body}"}, close=True)
        try:
            body = await read_body(stream, conn, self.max_body)
        except TooLarge:
            await drain_body(stream, conn, self.limits.max_drain)
            return Reply.json(413, {"error": f"body is over {self.max_body} bytes"}, close=True)
        try:
            events = decode_events(body)
        except msgspec.DecodeError as exc:
            self.metrics.parse_errors.inc(stream="publish")
            field = validation_field(exc)
            return Reply.json(400, {"error": str(exc), **({"field": field} if field else {})})
        return Reply.json(200, {"delivered": self.broadcaster.publish_many(events)})

    def _misdirected(self, request: h11.Request) -> Reply | None:
        """403 unless Host is a name this daemon answers to (DNS rebinding; see edge.access)."""
        host = header(request, b"host")
        if self.hosts.allows(host):
            return None
        name = host_name(host or "") or host
        return Reply.json(
            403,
            {"error": f"Host {name!r} is not a name of this daemon (add --allowed-host {name})"},
            close=True,
        )

    async def _healthz(
        self, request: h11.Request, peer: str | None, conn: h11.Connection, stream: trio.abc.Stream
    ) -> Reply:
        try:
            body = {**self.health(), "clients": self.broadcaster.client_count}
            return Reply.json(200, body)
        except Exception as exc:  # a broken health callback is a 500, not a dead server
            logger.exception("health() failed")
            return Reply.json(500, {"error": f"health check failed: {exc!r}"})

    async def _metrics(
        self, request: h11.Request, peer: str | None, conn: h11.Connection, stream: trio.abc.Stream
    ) -> Reply:
        return Reply(200, self.metrics.render().encode(), METRICS_CONTENT_TYPE)

    async def _static(
        self, request: h11.Request, peer: str | None, conn: h11.Connection, stream: trio.abc.Stream
    ) -> Reply:
        not_found = Reply.json(404, {"error": "not found"})
        if self.static_root is None:
            return not_found
        path = urllib.parse.unquote(urllib.parse.urlsplit(request.target.decode("latin-1")).path)
        parts = path.split("/")[1:]
        if parts and parts[-1] == "":
            parts[-1] = "index.html"
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            return not_found
        found = await trio.to_thread.run_sync(
            _load_static, self.static_root, parts, self.limits.max_static_bytes
        )
        if found is None:
            return not_found
        data, ctype = found
        return Reply(200, data, ctype)

    async def _websocket(self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request) -> None:
        if problem := handshake_problem(request):
            with trio.fail_after(self.limits.request_timeout):
                await send_reply(
                    stream,
                    conn,
                    Reply.json(
                        400,
                        {"error": f"bad WebSocket handshake: {problem}"},
                        headers=(("sec-websocket-version", "13"),),
                        close=True,
                    ),
                )
            return
        if refused := self._misdirected(request):
            with trio.fail_after(self.limits.request_timeout):
                await send_reply(stream, conn, refused)
            return
        _set_send_buffer(stream, self.limits.ws_send_buffer)
        with trio.fail_after(self.limits.ws_handshake_timeout):
            ws = await accept(stream, conn, request)
        ending: Ending = "closed"
        try:
            ending = await self._session(ws)
        finally:
            if ending != "closed":
                self.metrics.connection_errors.inc(reason=ending)
            await ws.close(ending, self.limits)  # ``handle`` closes the stream itself

    async def _session(self, ws: WebSocket) -> Ending:
        """Serve one browser until it goes; returns why (``edge.wsconn.Ending``)."""
        ending: list[Ending] = []
        async with self.broadcaster.subscribe() as client:
            async with trio.open_nursery() as nursery:

                async def until_first_ends(task: Callable[[], Awaitable[Ending]]) -> None:
                    try:
                        ending.append(await task())
                    finally:
                        nursery.cancel_scope.cancel()

                async def dropped() -> Ending:
                    return "stalled" if await client.wait_closed() == "stalled" else "closed"

                nursery.start_soon(until_first_ends, lambda: ws.pump(client, self.limits, self.metrics))
                nursery.start_soon(until_first_ends, lambda: ws.keepalive(self.limits))
                nursery.start_soon(until_first_ends, lambda: ws.incoming(self.limits))
                nursery.start_soon(until_first_ends, dropped)
        return ending[0] if ending else "closed"


def _set_send_buffer(stream: trio.abc.Stream, size: int) -> None:
    """Without a cap the kernel grows a socket's send buffer to megabytes, all of which a client
    that never reads makes the server fill, frame by frame, before its send blocks."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass


def _peer(stream: trio.abc.Stream) -> str | None:
    try:
        return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (AttributeError, OSError, IndexError, TypeError):
        return None


async def serve(
    broadcaster: Broadcaster,
    *,
    host: str | None = "0.0.0.0",
    port: int = 8080,
    static_dir: Path | str | None = None,
    health: Callable[[], Mapping[str, Any]] = dict,
    metrics: Metrics | None = None,
    publish_token: str | None = None,
    max_body: int = MAX_BODY,
    limits: Limits = Limits(),
    trust_loopback: bool = True,
    allowed_hosts: Sequence[str] = (),
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the listeners (as ``trio.serve_tcp``).

    ``metrics`` defaults to the broadcaster's, so events sent/dropped and clients show up in
    /metrics either way. ``trust_loopback=False`` makes even loopback peers need the token
    (for a daemon behind a reverse proxy on the same host). ``/publish`` and ``/ws`` answer only
    to ``Host`` names in ``HostPolicy.for_daemon(host, allowed_hosts)``.
    """
    static_root = None if static_dir is None else await trio.Path(static_dir).resolve()
    server = Server(
        broadcaster,
        static_root=None if static_root is None else Path(static_root),
        health=health,
        metrics=metrics if metrics is not None else broadcaster.metrics,
        publish_token=publish_token,
        max_body=max_body,
        limits=limits,
        trust_loopback=trust_loopback,
        hosts=HostPolicy.for_daemon(host, allowed_hosts),
    )
    await trio.serve_tcp(server.handle, port, host=host, task_status=task_status)
