"""Publish events to a running edge daemon from any process, with the standard library only.

from schema.publisher import Publisher
pub = Publisher("http://127.0.0.1:8080")
pub.publish({"type": "model_metric", "model": "gru", "accuracy": 0.91})
pub.try_publish([...])  # never raises: for scripts that must not die on a dead daemon
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any, Final

# The largest body the daemon's POST /publish takes (edge.server.serve's max_body default).
MAX_BODY: Final = 1 << 20


class PublishError(RuntimeError):
    """The daemon refused the events or could not be reached; ``status`` is the HTTP code or None
    (413 also when the body was refused here, before sending, for being over ``max_body``)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _builtin(event: Any) -> Any:
    if isinstance(event, Mapping):
        return dict(event)
    if hasattr(event, "__struct_config__"):  # a msgspec Struct from schema.events
        import msgspec

        return msgspec.to_builtins(event)
    raise TypeError(f"cannot publish {type(event).__name__}: give a dict or a schema.events Struct")


class Publisher:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        timeout: float = 2.0,
        max_body: int | None = MAX_BODY,
    ) -> None:
        """``max_body``: refuse a bigger body here, before sending (None: let the daemon judge)."""
        self.endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/publish") else "/publish")
        self.token = token
        self.timeout = timeout
        self.max_body = max_body

    def publish(self, events: Any | Iterable[Any]) -> int:
        """POST one event or a list; returns how many browsers it was delivered to."""
        if isinstance(events, (Mapping,)) or hasattr(events, "__struct_config__"):
            body: Any = _builtin(events)
        else:
            body = [_builtin(e) for e in events]
        data = json.dumps(body, allow_nan=False).encode()
        if self.max_body is not None and len(data) > self.max_body:
            raise PublishError(
                f"{self.endpoint}: {len(data)} bytes of events are over the daemon's limit of "
                f"{self.max_body} bytes; publish them in smaller lists",
                413,
            )
        req = urllib.request.Request(self.endpoint, data=data, method="POST")
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return int(json.loads(resp.read() or b"{}").get("delivered", 0))
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise PublishError(f"{self.endpoint}: HTTP {e.code}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PublishError(f"{self.endpoint}: {e}") from None

    def try_publish(self, events: Any | Iterable[Any]) -> bool:
        """Like publish, but reports failure as False instead of raising."""
        try:
            self.publish(events)
            return True
        except (PublishError, TypeError):
            return False
