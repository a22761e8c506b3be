"""Does a crowd of WebSocket clients that never read slow inference or grow memory? (issue 14, item 10)

    .venv/bin/python benchmarks/bench_hostile_clients.py [--stalled 100] [--seconds 30] [--rounds 2]
                                                          [--models DIR] [--out bench-hostile.json]

Side by side in one process, alternating ``--rounds`` times: the real daemon (real ONNX Runtime
sessions, replaying episodes as live ones at ``--speed``, every model's predictions published)
with one reading WebSocket client, then the same with ``--stalled`` more clients over real TCP
sockets (a 4 KiB receive buffer) that complete the handshake and never read again. For each
round: the window latency (the tick that saw a window complete -> its events published,
``phasewatch_window_latency_seconds`` taken raw), p50/p99, and the process's RSS before the
clients connected and at the end (VmRSS; VmHWM at exit). Prints the p99 ratio stalled/baseline.
Without ``--models`` the tiny real graphs of ``tests/test_infer.build_models_dir`` are used.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
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


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def never_reads(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(HANDSHAKE)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await stream.receive_some(1)
    return stream


async def one_round(models: Path, store: Path, stalled: int, seconds: float, speed: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        d = Daemon(
            models,
            replay=store,
            speed=speed,
            replay_concurrency=8,
            bind="127.0.0.1",
            port=0,
            modelset=load_models(models),
            all_predictions=True,
            state_dir=Path(state),
        )
        latencies: list[float] = []
        observe = d.latency.observe

        def record(value: float, **labels: str) -> None:
            latencies.append(value)
            observe(value, **labels)

        d.latency.observe = record  # type: ignore[method-assign]
        received = reader_closed = 0
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            rss_before = rss_kib()
            crowd = [await never_reads(port) for _ in range(stalled)]

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
            await trio.sleep(seconds)
            rss_after = rss_kib()
            clients = d.broadcaster.client_count
            queued = max((c.queued for c in d.broadcaster._clients), default=0)
            for s in crowd:
                await s.aclose()
            n.cancel_scope.cancel()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    return {
        "stalled": stalled,
        "windows": len(latencies),
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "reader_messages": received,
        "reader_closed": reader_closed,
        "clients_at_end": clients,
        "max_queued_frames": queued,
        "closed": {
            r: d.metrics.connection_errors.value(reason=r)
            for r in ("stalled", "send_timeout", "pong_timeout")
        },
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stalled", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30.0, help="per round")
    ap.add_argument("--rounds", type=int, default=2, help="baseline/stalled pairs")
    ap.add_argument("--speed", type=float, default=20.0, help="replay time multiplier")
    ap.add_argument("--models", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.models is None:
            from test_infer import build_models_dir

            args.models = build_models_dir(work / "models")
        store = work / "store"
        for i in range(8):
            members = episode_members(f"ep{i}", f"host-{i % 2}", duration_s=120, seed=i)
            write_archive(store / f"host-{i % 2}" / f"ep{i}.tar.zst", members)
        rounds = []
        for _ in range(args.rounds):
            for stalled in (0, args.stalled):
                res = trio.run(one_round, args.models, store, stalled, args.seconds, args.speed)
                print(json.dumps(res), flush=True)
                rounds.append(res)
    base = [r["p99_ms"] for r in rounds if r["stalled"] == 0]
    crowd = [r["p99_ms"] for r in rounds if r["stalled"] > 0]
    summary = {
        "rounds": rounds,
        "p99_ms_baseline_median": statistics.median(base),
        "p99_ms_stalled_median": statistics.median(crowd),
        "p99_ratio": statistics.median(crowd) / statistics.median(base),
        "rss_growth_mib_stalled_max": max(
            r["rss_after_mib"] - r["rss_before_mib"] for r in rounds if r["stalled"]
        ),
        "vm_hwm_mib": rss_kib("VmHWM") / 1024,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
