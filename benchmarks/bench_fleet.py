"""Benchmark the fleet: simulated nodes -> one local Mosquitto -> one ``edge-daemon --fleet`` -> a WebSocket.

    .venv/bin/python benchmarks/bench_fleet.py [--nodes 1,10,50] [--episodes 30] [--seconds 20]
                                               [--models DIR] [--inference-seconds 30] [--out FILE]

1. fleet: for each N of ``--nodes``, N nodes (each a real ``edge.mqtt.MqttPublisher``, all in one
   simulator process) publish the event rate of ``--episodes`` live episodes each: per episode a
   window every 5 s (stride), each giving a ``phase``, the primary's ``prediction`` (QoS 1) and
   an ``embedding``, plus the heartbeat. One ``edge-daemon --fleet`` relays them to our WebSocket
   client. Per prediction published inside the measured ``--seconds``: publish (handed to the
   node's broadcaster) -> received on the fleet deck's WebSocket, p50/p99/max; events/s at the
   client; CPU share of one core for the broker and the fleet daemon; predictions lost.
2. broker down: a real ``edge-daemon --models`` on live episodes, without ``--mqtt`` and with
   ``--mqtt`` pointing at a broker that was stopped, alternated ``--rounds`` times: the window
   latency p99 (line appended -> prediction on the node's own WebSocket), medians per mode and
   their ratio. Target: within 10 %.

Figures on a shared machine are noisy: each run prints medians and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from mosquitto_kit import Mosquitto, free_port  # noqa: E402

STRIDE_S = 5.0  # a window every 5 s per live episode (schema window stride)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _spawn(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "edge.daemon", *args, "--bind", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], cwd=ROOT)
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"http://127.0.0.1:{port}/healthz")
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge-daemon {args} did not come up") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the node simulator (a subprocess: its threads must not share our GIL) ---------------------


async def simulate(url: str, nodes: int, episodes: int, log_path: Path, seed: int) -> None:
    from edge.broadcast import Broadcaster
    from edge.metrics import Metrics
    from edge.mqtt import MqttConfig, MqttPublisher, parse_broker_url
    from schema.events import Embedding, NodeStatus, PhaseEvent, Prediction

    rng = random.Random(seed)
    broker = parse_broker_url(url)
    sent: list[tuple[str, str, int, float]] = []  # node, episode, window_no, published at (time.time)
    sims = []
    for i in range(nodes):
        node = f"sim-{i:02d}"
        metrics = Metrics()
        bc = Broadcaster(metrics=metrics)
        pub = MqttPublisher(
            broker,
            node=node,
            metrics=metrics,
            describe=lambda: NodeStatus(state="online", primary_model="gru", live_episodes=episodes),
            config=MqttConfig(status_interval_s=5.0),
        )
        pub.attach(bc)
        due = [trio.current_time() + rng.uniform(0, STRIDE_S) for _ in range(episodes)]
        sims.append((node, bc, pub, due, [0] * episodes))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as n:
            for _, _, pub, _, _ in sims:
                await n.start(pub.run)

            async def publish() -> None:
                while True:
                    now = trio.current_time()
                    for node, bc, _, due, seq in sims:
                        for k in range(episodes):
                            if due[k] <= now:
                                due[k] += STRIDE_S
                                w = seq[k] = seq[k] + 1
                                ep = f"ep-{k:02d}"
                                bc.publish(PhaseEvent(phase="clean", episode_id=ep, host=node))
                                sent.append((node, ep, w, time.time()))
                                bc.publish(
                                    Prediction(
                                        episode_id=ep,
                                        window_idx=w % 6,
                                        window_no=w,
                                        predicted="clean",
                                        model="gru",
                                    )
                                )
                                bc.publish(
                                    Embedding(x=rng.random(), y=rng.random(), z=rng.random(), phase="clean")
                                )
                    await trio.sleep(0.005)

            n.start_soon(publish)
            async for _ in signals:
                break
            n.cancel_scope.cancel()  # the publishers flush and say offline on the way out
    dropped = sum(sum(pub.stats.dropped_by_type.values()) for _, _, pub, _, _ in sims)
    log_path.write_text(json.dumps({"sent": sent, "outbox_dropped": dropped}))


# --- 1. the fleet --------------------------------------------------------------------------------


def run_fleet(nodes: int, episodes: int, seconds: float, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(work)
    fleet, port = _spawn(["--fleet", broker.url])
    log_path = work / "sent.json"
    received: dict[tuple[str, str, int], float] = {}
    frames = [0]
    try:

        async def main() -> dict[str, Any]:
            async with trio.open_nursery() as n:

                async def client(task_status: trio.TaskStatus[None]) -> None:
                    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                        task_status.started()
                        while True:
                            msg = await ws.get_message()
                            t = time.time()
                            frames[0] += 1
                            if msg.startswith('{"type":"prediction"'):
                                ev = json.loads(msg)
                                received.setdefault((ev["node"], ev["episode_id"], ev["window_no"]), t)

                await n.start(client)
                sim = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        __file__,
                        "--simulate",
                        broker.url,
                        "--sim-nodes",
                        str(nodes),
                        "--episodes",
                        str(episodes),
                        "--sim-log",
                        str(log_path),
                    ],
                    cwd=ROOT,
                )
                with trio.fail_after(60):
                    while True:
                        h = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}/healthz")
                        online = [v for v in h["fleet"]["nodes"].values() if v["state"] == "online"]
                        if len(online) >= nodes:
                            break
                        await trio.sleep(0.2)
                await trio.sleep(STRIDE_S)  # every episode has begun its cadence
                cpu0 = {"broker": cpu_seconds(broker.proc.pid), "fleet": cpu_seconds(fleet.pid)}  # type: ignore[union-attr]
                f0, t0 = frames[0], time.time()
                await trio.sleep(seconds)
                t1 = time.time()
                cpu1 = {"broker": cpu_seconds(broker.proc.pid), "fleet": cpu_seconds(fleet.pid)}  # type: ignore[union-attr]
                f1 = frames[0]
                await trio.sleep(3.0)  # what is in flight
                sim.send_signal(signal.SIGTERM)
                with trio.fail_after(60):
                    await sim.wait()
                metrics = await trio.to_thread.run_sync(
                    lambda: (
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                    )
                )
                n.cancel_scope.cancel()
            log = json.loads(log_path.read_text())
            lat, lost = [], 0
            for node, ep, w, t_sent in log["sent"]:
                if not (t0 <= t_sent < t1):
                    continue
                got = received.get((node, ep, w))
                if got is None:
                    lost += 1
                else:
                    lat.append(got - t_sent)
            ms = np.array(lat) * 1000
            deck_drops = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("phasewatch_events_dropped_total{")
            )
            wall = t1 - t0
            return {
                "nodes": nodes,
                "episodes_per_node": episodes,
                "seconds": round(wall, 1),
                "predictions": len(lat) + lost,
                "lost": lost,
                "latency_ms": {
                    "p50": round(float(np.percentile(ms, 50)), 1),
                    "p99": round(float(np.percentile(ms, 99)), 1),
                    "max": round(float(ms.max()), 1),
                }
                if len(ms)
                else None,
                "events_per_s": round((f1 - f0) / wall, 1),
                "cpu_share": {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu0},
                "outbox_dropped": log["outbox_dropped"],
                "deck_dropped": deck_drops,
                "load_avg": round(os.getloadavg()[0], 1),
            }

        return trio.run(main)
    finally:
        _stop(fleet)
        broker.stop()


# --- 2. inference with the broker down -----------------------------------------------------------


def inference_p99(models: Path, work: Path, episodes: int, seconds: float, mqtt_url: str | None) -> dict:
    import bench_daemon as bd

    live = work / f"live-{time.time_ns()}"
    live.mkdir(parents=True)
    args = ["--models", str(models), "--live", str(live), "--idle-timeout", "600"]
    if mqtt_url:
        args += ["--mqtt", mqtt_url, "--node-id", "bench"]
    proc, port = _spawn(args)

    class _D:  # what bench_daemon.run_live reads
        def __init__(self) -> None:
            self.proc, self.port = proc, port

        def health(self) -> dict:
            return _get(f"http://127.0.0.1:{port}/healthz")

    try:
        r = trio.run(bd.run_live, _D(), live, episodes, seconds, 7)
        h = _get(f"http://127.0.0.1:{port}/healthz")
        r["mqtt"] = h.get("mqtt")
        return r
    finally:
        _stop(proc)


def broker_down(models: Path, work: Path, episodes: int, seconds: float, rounds: int) -> dict[str, Any]:
    dead = Mosquitto(work / "dead-broker")
    dead.stop()  # its port now refuses connections: the daemon retries with back-off, forever
    runs: dict[str, list[dict]] = {"no_mqtt": [], "broker_down": []}
    for r in range(rounds):
        for mode in ("no_mqtt", "broker_down") if r % 2 == 0 else ("broker_down", "no_mqtt"):
            res = inference_p99(models, work, episodes, seconds, dead.url if mode == "broker_down" else None)
            runs[mode].append(res)
            lat = res["latency_ms"] or {}
            print(f"  round {r + 1} {mode:12s} p50 {lat.get('p50')} ms  p99 {lat.get('p99')} ms", flush=True)
    med = {m: round(statistics.median(x["latency_ms"]["p99"] for x in v), 1) for m, v in runs.items()}
    med50 = {m: round(statistics.median(x["latency_ms"]["p50"] for x in v), 1) for m, v in runs.items()}
    down = runs["broker_down"][-1]["mqtt"] or {}
    return {
        "episodes": episodes,
        "seconds": seconds,
        "rounds": rounds,
        "p99_ms_median": med,
        "p50_ms_median": med50,
        "p99_ratio": round(med["broker_down"] / med["no_mqtt"], 3),
        "broker_down_outbox": down.get("outbox"),
        "broker_down_dropped": down.get("dropped"),
        "runs": runs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,10,50")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--inference-episodes", type=int, default=10)
    ap.add_argument("--inference-seconds", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of no-MQTT / broker-down runs")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    # the simulator subprocess
    ap.add_argument("--simulate", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--sim-nodes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--sim-log", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.simulate:
        trio.run(simulate, args.simulate, args.sim_nodes, args.episodes, args.sim_log, 1)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="phasewatch-bench-fleet-"))
    out: dict[str, Any] = {"fleet": [], "machine": {"cpus": os.cpu_count()}}
    print(f"fleet: N nodes x {args.episodes} live episodes -> mosquitto -> edge-daemon --fleet -> WebSocket")
    print(
        f"{'nodes':>5} {'pred':>6} {'lost':>4} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'ev/s':>7}"
        f" {'broker':>7} {'fleet':>6}"
    )
    for n in (int(x) for x in args.nodes.split(",") if x.strip()):  # --nodes "": only the broker-down part
        r = run_fleet(n, args.episodes, args.seconds, work / f"fleet-{n}")
        out["fleet"].append(r)
        lat = r["latency_ms"] or {"p50": None, "p99": None, "max": None}
        print(
            f"{n:>5} {r['predictions']:>6} {r['lost']:>4}"
            f" {lat['p50']!s:>7} {lat['p99']!s:>7} {lat['max']!s:>7}"
            f" {r['events_per_s']:>7} {r['cpu_share']['broker']:>7} {r['cpu_share']['fleet']:>6}"
            "   (cpu: share of one core)",
            flush=True,
        )
    if not args.skip_inference:
        models = args.models
        if not (models / "SHA256SUMS").exists():
            import bench_daemon as bd

            models = bd.export_random_models(work / "models")
        print(f"\nbroker down: window latency p99 of a node ({args.inference_episodes} live episodes)")
        b = broker_down(models, work, args.inference_episodes, args.inference_seconds, args.rounds)
        out["broker_down"] = b
        m = b["p99_ms_median"]
        print(
            f"  median p99: no MQTT {m['no_mqtt']} ms, broker down {m['broker_down']} ms"
            f" -> ratio {b['p99_ratio']}"
            f" (target <= 1.10); outbox {b['broker_down_outbox']}, dropped {b['broker_down_dropped']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
