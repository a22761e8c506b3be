"""Debian's headless Chromium and an in-process edge server, for the deck's browser tests.

    with live_server() as srv, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto(srv.url + "/#knn")
        srv.publish({"type": "embedding", "x": 0.2, "y": 0.4})

The server is the real one (edge.server.serve + edge.broadcast.Broadcaster) running in its
own trio thread on a free loopback port; events go through POST /publish like any producer.
Playwright never downloads a browser here: it drives /usr/bin/chromium.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from edge.broadcast import Broadcaster
from edge.server import serve
from schema.publisher import Publisher

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DECK_DIR = Path(__file__).resolve().parent.parent / "deck"


def launch_chromium(playwright: Any, **kw: Any) -> Any:
    """A headless Chromium from Debian's package (``make browser`` installs it)."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, **kw)


@dataclass
class LiveServer:
    url: str
    broadcaster: Broadcaster
    publisher: Publisher

    def publish(self, events: Any | Iterable[Any]) -> int:
        """POST one event or a list to /publish; returns how many browsers got them."""
        return self.publisher.publish(events)


@contextmanager
def live_server(static_dir: Path = DECK_DIR) -> Iterator[LiveServer]:
    """The real edge server on 127.0.0.1:<free port>, serving ``static_dir``, in a trio thread."""
    started: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException] = (
        queue.Queue()
    )
    broadcaster = Broadcaster()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    lambda task_status: serve(
                        broadcaster, host="127.0.0.1", port=0, static_dir=static_dir, task_status=task_status
                    )
                )
                port = listeners[0].socket.getsockname()[1]
                started.put((port, trio.lowlevel.current_trio_token(), scope))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # surfaced to the waiting test instead of dying silently
            started.put(e)

    thread = threading.Thread(target=run, name="edge-server", daemon=True)
    thread.start()
    got = started.get(timeout=20)
    if isinstance(got, BaseException):
        raise RuntimeError("edge server failed to start") from got
    port, token, scope = got
    url = f"http://127.0.0.1:{port}"
    try:
        yield LiveServer(url=url, broadcaster=broadcaster, publisher=Publisher(url, timeout=10.0))
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)
