"""The stdlib Publisher against a real HTTP endpoint on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schema.events import ModelMetric
from schema.publisher import Publisher, PublishError


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
