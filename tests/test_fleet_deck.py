"""The fleet deck in real headless Chromium: two `edge-daemon --demo --mqtt` nodes, a real
Mosquitto, `edge-daemon --fleet`; the fleet scene lists the nodes and the node picker filters
every scene."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import CHROMIUM, launch_chromium
from mosquitto_kit import Mosquitto, have_mosquitto
from test_fleet import daemon, until

from schema.vocab import MODELS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed (make mosquitto)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (make browser)"),
]
EPS = "#chunking-grid .ep"
OUT = Path(__file__).resolve().parent.parent / "out" / "deck"


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


def _retained_status(port: int, node: str, **fields: Any) -> None:
    """A node from before: its last retained status, with another schema hash."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"old-{node}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    body = json.dumps({"type": "status", "node": node, **fields}).encode()
    c.publish(f"phasewatch/v1/{node}/status", body, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_fleet_deck_shows_two_nodes_and_the_picker_filters(tmp_path: Path, browser: Any) -> None:
    with Mosquitto(tmp_path) as broker:
        _retained_status(
            broker.port, "pi-old", state="offline", schema_hash="0" * 64, t_ns=time.time_ns() - 7200 * 10**9
        )
        with (
            daemon("--demo", "--mqtt", broker.url, "--node-id", "pi-a") as a,
            daemon("--demo", "--mqtt", broker.url, "--node-id", "pi-b") as b,
        ):
            for n in (a, b):
                until(lambda n=n: n.health()["mqtt"]["connected"], what="node connections")
            with daemon("--fleet", broker.url) as fleet:
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                errors: list[str] = []
                page.on(
                    "console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None
                )
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(fleet.url + "/#fleet")
                page.wait_for_function("window.__deck && window.__deck.fleet.on", timeout=15_000)
                page.wait_for_function("window.__deck.current === 'fleet'")
                rows = "#fleet-table tr[data-node]"
                page.wait_for_function(
                    f"document.querySelectorAll('{rows}[data-state=online]').length === 2", timeout=15_000
                )
                assert page.locator(rows).count() == 3
                assert (
                    page.locator('#fleet-table tr[data-node="pi-old"]').get_attribute("data-state")
                    == "offline"
                )
                # the odd hash out is marked; the two live nodes agree
                assert "mismatch" in (
                    page.locator('#fleet-table tr[data-node="pi-old"]').get_attribute("class") or ""
                )
                assert page.locator("#fleet-table tr.mismatch").count() == 1
                assert "3 nodes · 2 online · 2 schema hashes" in page.locator("#fleet-summary").text_content()
                assert page.evaluate("window.__deck.scenes.length") == 13
                assert page.locator("#scene-no").text_content().startswith("13 / 13")
                page.wait_for_function(
                    "[...document.querySelectorAll('#fleet-table tr[data-state=online] td:nth-child(5)')]"
                    ".every(td => parseFloat(td.textContent) >= 0)"
                )
                OUT.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(OUT / "13-fleet.png"))
                # all nodes: both nodes' timelines on the chunking scene
                page.evaluate("window.__deck.go('chunking')")
                page.wait_for_function(
                    f"new Set([...document.querySelectorAll('{EPS}')].map(e => e.dataset.node)).size === 2",
                    timeout=15_000,
                )
                all_events = page.evaluate("window.__deck.state.events")
                # the picker: one node on every scene
                page.select_option("#node-picker", "pi-a")
                page.wait_for_function("window.__deck.fleet.picked === 'pi-a'")
                page.wait_for_function(
                    f"[...document.querySelectorAll('{EPS}')].length > 0 && "
                    f"[...document.querySelectorAll('{EPS}')].every(e => e.dataset.node === 'pi-a')",
                    timeout=10_000,
                )
                assert page.evaluate("window.__deck.state.events") < all_events
                page.evaluate("window.__deck.go('models')")
                page.wait_for_function(
                    f"document.querySelectorAll('#models-chart g[data-model] rect').length === {len(MODELS)}",
                    timeout=10_000,
                )
                n_a = page.evaluate("window.__deck.knn.count()")
                # a click on a row picks that node too
                page.evaluate("window.__deck.go('fleet')")
                page.click('#fleet-table tr[data-node="pi-b"]')
                page.wait_for_function("window.__deck.fleet.picked === 'pi-b'")
                assert page.locator("#node-picker").input_value() == "pi-b"
                # the fleet table redraws on the next frame
                page.wait_for_function(
                    "document.querySelector('#fleet-table tr[data-node=\"pi-b\"]')"
                    "?.classList.contains('picked') === true",
                    timeout=10_000,
                )
                page.select_option("#node-picker", "")
                page.wait_for_function("window.__deck.fleet.picked === ''")
                assert page.evaluate("window.__deck.knn.count()") > n_a  # both nodes' points again
                assert errors == []
                page.close()
