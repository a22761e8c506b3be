"""The stdlib Publisher against a real HTTP endpoint on loopback (a stdlib one, and the daemon's)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from edge.broadcast import Broadcaster
from edge.server import serve
from schema.events import ModelMetric
from schema.publisher import MAX_BODY, Publisher, PublishError


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list]]:
    received: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, self.headers.get("Authorization"), body))
            if isinstance(body, dict) and body.get("model") == "refuse-me":
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error":"bad","field":"$.accuracy"}')
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"delivered": 3}).encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def test_publish_dict_struct_and_list(endpoint) -> None:
    url, received = endpoint
    pub = Publisher(url, token="s3cret")
    assert pub.publish({"type": "phase", "phase": "armed"}) == 3
    assert pub.publish(ModelMetric(model="gru", accuracy=0.9)) == 3
    assert pub.publish([{"type": "phase", "phase": "clean"}, ModelMetric(model="cnn", accuracy=0.7)]) == 3
    paths = {r[0] for r in received}
    assert paths == {"/publish"}
    assert received[0][1] == "Bearer s3cret"
    assert received[1][2] == {
        "type": "model_metric",
        "model": "gru",
        "accuracy": 0.9,
    }  # unset fields left out
    assert len(received[2][2]) == 2


def test_refusal_names_status_and_field(endpoint) -> None:
    url, _ = endpoint
    with pytest.raises(PublishError) as info:
        Publisher(url).publish({"type": "model_metric", "model": "refuse-me", "accuracy": 2})
    assert info.value.status == 400 and "$.accuracy" in str(info.value)


def test_try_publish_never_raises() -> None:
    pub = Publisher("http://127.0.0.1:9", timeout=0.5)  # discard port: nothing listens
    assert pub.try_publish({"type": "phase", "phase": "clean"}) is False
    with pytest.raises(PublishError):
        pub.publish({"type": "phase", "phase": "clean"})


# --- an oversized body (issue 14, item 8) ---------------------------------------------------------


def test_oversized_list_is_refused_before_sending() -> None:
    pub = Publisher("http://127.0.0.1:9", max_body=MAX_BODY)  # nothing listens: sending would fail otherwise
    events = [{"type": "phase", "phase": "clean"}] * (MAX_BODY // 20)
    with pytest.raises(PublishError) as info:
        pub.publish(events)
    assert info.value.status == 413
    assert "over the daemon's limit of 1048576 bytes" in str(info.value) and "smaller lists" in str(
        info.value
    )


@pytest.mark.parametrize("size", [64 << 10, 3 << 20])
def test_the_daemon_answers_413_not_a_reset_to_a_client_that_writes_first(size: int) -> None:
    """urllib writes the whole body before it reads: the daemon reads it (up to Limits.max_drain)
    before answering, so the Publisher sees the 413 instead of EPIPE / connection reset."""
    events = [{"type": "phase", "phase": "clean"}] * (size // 32)
    b = Broadcaster()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(serve, b, host="127.0.0.1", port=0, max_body=1000))
            url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            for _ in range(3):  # not a lucky race: every time
                with pytest.raises(PublishError) as info:
                    await trio.to_thread.run_sync(Publisher(url, max_body=None, timeout=10).publish, events)
                assert info.value.status == 413, info.value
                assert "over 1000" in str(info.value)
            assert await trio.to_thread.run_sync(Publisher(url).publish, events[:3]) == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(b.sticky_events()) == 3
