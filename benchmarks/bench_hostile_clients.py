"""Does a crowd of WebSocket clients that never read slow inference or grow memory? (issue 14, item 10)

    MALLOC_ARENA_MAX=2 .venv/bin/python benchmarks/bench_hostile_clients.py [--stalled 100]
        [--seconds 12] [--rounds 8] [--warmup 10] [--speed 20] [--models DIR] [--tracemalloc]
        [--out bench-hostile.json]

One real daemon for the whole run, as on a Pi (real ONNX Runtime sessions, replaying episodes
as live ones at ``--speed``, every model's predictions published, one WebSocket client that
reads everything). After ``--warmup`` s (not counted, the sticky state fills), ``--rounds``
times, side by side: a baseline phase of ``--seconds`` s, then a stalled phase of as long in
which ``--stalled`` more clients over real TCP sockets (a 4 KiB receive buffer), from another
process as hostile clients are on other machines, complete the handshake and never read
again. Between phases the crowd is shut and the server settles for a second, uncounted.

Per phase: the window latency (the tick that saw a window complete -> its events published;
``phasewatch_window_latency_seconds`` taken raw), p50/p99, and the process's RSS at its end
(VmRSS; with ``--tracemalloc`` also the bytes Python has allocated, to tell live objects from
allocator fragmentation), and the CPU seconds the trio thread (event loop: replay, tailer,
server) used in it, which a loaded machine disturbs less than wall-clock latency. The summary
gives the medians over rounds of p50/p99 with and without the crowd and their ratio, and
p50/p99 over every window of all rounds pooled (target: p99 within 20 %; one phase has too
few windows for its p99 to be more than its worst two), and the RSS plateau: the highest RSS
after a stalled phase in the last half of the rounds minus that in the first half (bounded
memory: about zero), and the RSS the process gained during the baseline phases and during the
stalled ones, each summed (memory the crowd costs and keeps shows as the difference).
Run it as the edge unit runs the daemon, with ``MALLOC_ARENA_MAX=2`` in the environment
(without it glibc's per-thread heaps let RSS climb whatever the clients do).
Without ``--models`` the tiny real graphs of ``tests/test_infer.build_models_dir`` are used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from archive_kit import episode_members, write_archive  # noqa: E402

from edge.daemon import Daemon  # noqa: E402
from edge.modelset import load_models  # noqa: E402

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
ENDINGS = ("stalled", "send_timeout", "pong_timeout")


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 3:
        return float("nan"), float("nan")
    q = statistics.quantiles(values, n=100)
    return q[49] * 1e3, q[98] * 1e3


# The crowd lives in its own process, as hostile clients live on other machines: its handshakes
# (the reply read byte by byte, so the frames behind it stay unread) must not run on the daemon's
# event loop. It prints "ready" once all are connected and holds them until its stdin closes.
CROWD = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
handshake = sys.stdin.buffer.readline().replace(b"|", b"\r\n")  # the request, "|" for each CRLF
crowd = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(handshake)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    crowd.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


async def open_crowd(port: int, n: int) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            CROWD,
            str(port),
            str(n),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    await proc.stdin.send_all(HANDSHAKE.replace(b"\r\n", b"|") + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(64)
        if not chunk:
            raise RuntimeError(f"the crowd process ended early ({await proc.wait()})")
        line += chunk
    return proc


async def run(args: argparse.Namespace, models: Path, store: Path) -> dict[str, Any]:
    modelset = load_models(models)
    with tempfile.TemporaryDirectory() as state:
        d = Daemon(
            models,
            replay=store,
            speed=args.speed,
            replay_concurrency=8,
            bind="127.0.0.1",
            port=0,
            modelset=modelset,
            all_predictions=True,
            state_dir=Path(state),
        )
        samples: list[tuple[float, float]] = []  # (when, latency)
        observe = d.latency.observe

        def record(value: float, **labels: str) -> None:
            samples.append((trio.current_time(), value))
            observe(value, **labels)

        d.latency.observe = record  # type: ignore[method-assign]
        received = reader_closed = 0
        phases: list[dict[str, Any]] = []
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]

            async def reader() -> None:  # reconnects if the server closes it (counted: it should not)
                nonlocal received, reader_closed
                while True:
                    try:
                        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                            while True:
                                await ws.get_message()
                                received += 1
                    except trio_websocket.ConnectionClosed:
                        reader_closed += 1

            n.start_soon(reader)
            await trio.sleep(args.warmup)

            async def phase(stalled: int) -> dict[str, Any]:
                crowd: trio.Process | None = None
                ended_before = {r: d.metrics.connection_errors.value(reason=r) for r in ENDINGS}
                received_before, connected = received, 0
                start, cpu0 = trio.current_time(), time.thread_time()
                with trio.move_on_after(args.seconds):
                    if stalled:
                        crowd = await open_crowd(port, stalled)
                        connected = stalled
                    await trio.sleep_forever()
                end, loop_cpu = trio.current_time(), time.thread_time() - cpu0
                ended = {r: d.metrics.connection_errors.value(reason=r) - ended_before[r] for r in ENDINGS}
                clients_at_end = d.broadcaster.client_count
                if crowd is not None:
                    assert crowd.stdin is not None
                    await crowd.stdin.aclose()  # the crowd closes its sockets and exits
                    await crowd.wait()
                lat = [v for t, v in samples if start <= t < end]
                worst = sorted(((v, t - start) for t, v in samples if start <= t < end), reverse=True)[:3]
                p50, p99 = quantiles(lat)
                out = {
                    "latencies": lat,
                    "stalled": stalled,
                    "connected": connected,
                    "windows": len(lat),
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "reader_messages": received - received_before,
                    "loop_cpu_s": loop_cpu,
                    "worst_ms_at_s": [(round(v * 1e3, 1), round(at, 2)) for v, at in worst],
                    "clients_at_end": clients_at_end,
                    "closed": ended,
                    "rss_mib": rss_mib(),
                    "traced_mib": tracemalloc.get_traced_memory()[0] / 2**20 if args.tracemalloc else None,
                    "load": os.getloadavg()[0],
                }
                with trio.fail_after(30):  # settle, uncounted: the crowd's sockets are gone
                    while d.broadcaster.client_count > 1:
                        await trio.sleep(0.05)
                await trio.sleep(1.0)
                return out

            for r in range(args.rounds):
                for stalled in (0, args.stalled):
                    res = {"round": r, **await phase(stalled)}
                    print(json.dumps({k: v for k, v in res.items() if k != "latencies"}), flush=True)
                    phases.append(res)
            n.cancel_scope.cancel()
    return {"phases": phases, "reader_closed": reader_closed}


def summarise(phases: list[dict[str, Any]]) -> dict[str, Any]:
    base = [p for p in phases if p["stalled"] == 0]
    crowd = [p for p in phases if p["stalled"] > 0]

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pooled = {
        name: quantiles([v for p in rows for v in p["latencies"]])
        for name, rows in (("baseline", base), ("stalled", crowd))
    }
    rss = [p["rss_mib"] for p in crowd]  # after each stalled phase, one per round
    half = len(rss) // 2
    # what RSS did during each kind of phase: growth the crowd causes shows in the stalled ones only
    grew = {"baseline": 0.0, "stalled": 0.0}
    for before, p in zip(phases, phases[1:]):
        grew["stalled" if p["stalled"] else "baseline"] += p["rss_mib"] - before["rss_mib"]
    return {
        "p50_ms_median": {"baseline": med(base, "p50_ms"), "stalled": med(crowd, "p50_ms")},
        "p99_ms_median": {"baseline": med(base, "p99_ms"), "stalled": med(crowd, "p99_ms")},
        "pooled": {  # every window of every round, per kind of phase
            "windows": {
                "baseline": sum(p["windows"] for p in base),
                "stalled": sum(p["windows"] for p in crowd),
            },
            "p50_ms": {k: v[0] for k, v in pooled.items()},
            "p99_ms": {k: v[1] for k, v in pooled.items()},
            "p99_ratio": pooled["stalled"][1] / pooled["baseline"][1],
        },
        "p99_ratio_median": statistics.median(c["p99_ms"] / b["p99_ms"] for b, c in zip(base, crowd)),
        "loop_cpu_s_median": {"baseline": med(base, "loop_cpu_s"), "stalled": med(crowd, "loop_cpu_s")},
        "p99_ratio_of_medians": med(crowd, "p99_ms") / med(base, "p99_ms"),
        "rss_mib_per_round": rss,
        "rss_plateau_mib": {
            "first_half_max": max(rss[:half] or rss),
            "last_half_max": max(rss[half:]),
            "growth": max(rss[half:]) - max(rss[:half] or rss),
        },
        "rss_growth_mib_during": grew,
        "vm_hwm_mib": rss_mib("VmHWM"),
        "closed_total": {r: sum(p["closed"][r] for p in crowd) for r in ENDINGS},
        "load_median": statistics.median(p["load"] for p in phases),
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),  # the edge unit sets 2
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stalled", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=12.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=8, help="baseline/stalled pairs")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before the first phase, uncounted")
    ap.add_argument("--speed", type=float, default=20.0, help="replay time multiplier")
    ap.add_argument("--tracemalloc", action="store_true", help="also report Python's allocated bytes")
    ap.add_argument("--models", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.tracemalloc:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.models is None:
            from test_infer import build_models_dir

            args.models = build_models_dir(work / "models")
        store = work / "store"
        for i in range(8):
            members = episode_members(f"ep{i}", f"host-{i % 2}", duration_s=120, seed=i)
            write_archive(store / f"host-{i % 2}" / f"ep{i}.tar.zst", members)
        result = trio.run(run, args, args.models, store)
    summary = {**summarise(result["phases"]), "reader_closed": result["reader_closed"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        phases = [{k: v for k, v in p.items() if k != "latencies"} for p in result["phases"]]
        args.out.write_text(json.dumps({**summary, "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
