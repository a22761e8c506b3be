"""Benchmark the edge daemon as it runs: a real ``edge-daemon`` process, real files, a real WebSocket.

    .venv/bin/python benchmarks/bench_daemon.py [--models DIR] [--episodes 10] [--seconds 90]
                                                [--capacity 300,1000] [--backends poll,inotify]
                                                [--out bench-daemon.json]

1. start-up: spawn the daemon with all twelve models, time until ``/healthz`` answers,
   then read its resident memory (VmRSS, VmHWM) from ``/proc``;
2. latency: ``--episodes`` live episodes written at 10 Hz in real time (staggered starts);
   for every window, the time the line that completed it was appended -> the time its
   ``prediction`` reached our WebSocket client; p50/p99/max;
3. capacity: the daemon pinned to one core, N episodes at 10 Hz for each N of
   ``--capacity``: its CPU share of that core, the window latency, dropped windows. It
   keeps up when its share stays below 1 and the latency stays bounded. Each N runs once per
   ``--backends`` entry (``poll``: the stat-polling tailer, what the daemon did before inotify;
   ``inotify``: event-driven), side by side in one run, and the ratios are printed.

Without ``--models`` it exports a set of the real architectures (trainer.models, quick
profile, trained for one epoch on random data: the graphs are what cost time and memory,
not the weights) into ``--work``; pass the output of ``phasewatch export`` to measure the
shipped models instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import trio
import trio_websocket

from edge.tail import TailConfig
from schema.rows import row_fields
from schema.vocab import SOURCES

ROOT = Path(__file__).resolve().parents[1]
STEP_NS = 100_000_000


# --- a models directory of the real architectures -----------------------------------------


def export_random_models(out: Path, seed: int = 0) -> Path:
    """Twelve real graphs + two projectors, trained briefly on random data; manifest and SHA256SUMS."""
    import msgspec
    import onnx

    from schema.artifacts import (
        Envelope,
        FileEntry,
        HeldoutMetrics,
        Manifest,
        ModelEntry,
        ProjectorEntry,
        estimate,
    )
    from schema.channels import CHANNEL_NAMES, SUMMARY_STATS, WINDOW_STEPS, view_channels
    from schema.extract import input_shape
    from schema.hashing import schema_hash
    from schema.vocab import MODEL_INPUT, MODELS, PHASES, THREAT_MODELS
    from trainer.graphs import gather_channels
    from trainer.models import build_model

    if (out / "SHA256SUMS").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    k = len(SUMMARY_STATS)
    rng = np.random.default_rng(seed)
    entries, projectors, files = [], [], {}
    for threat in THREAT_MODELS:
        chans = [CHANNEL_NAMES[i] for i in view_channels(threat)]
        for name in MODELS:
            kind = MODEL_INPUT[name]
            shape = (len(chans), WINDOW_STEPS) if kind == "tensor" else (len(chans) * k,)
            x = rng.lognormal(2, 2, (160, *shape)).astype(np.float32)
            y = rng.integers(0, len(PHASES), 160)
            over = {"rounds": 30} if name == "gbt" else {"epochs": 1}
            model = build_model(name, shape, profile="quick", seed=seed, **over)
            model.fit(x[:128], y[:128], x[128:], y[128:])
            path = out / f"{name}-{threat}.onnx"
            model.to_onnx(path)
            # every exported graph reads the full window and gathers its own channels
            proto = gather_channels(onnx.load(path), view_channels(threat), kind, str(path))
            meta = {
                "schema_hash": schema_hash(),
                "model": name,
                "threat_model": threat,
                "input_kind": kind,
                "channels": json.dumps(chans),
                "classes": json.dumps(list(PHASES)),
            }
            onnx.helper.set_model_props(proto, meta)
            onnx.save(proto, path)
            files[path.name] = path.read_bytes()
            entries.append(
                ModelEntry(
                    file=path.name,
                    model=name,
                    threat_model=threat,
                    input_kind=kind,
                    channels=chans,
                    input_shape=list(input_shape(kind)),
                    metrics=HeldoutMetrics(estimate(0.2), estimate(0.2), n_windows=0, n_episodes=0),
                )
            )
            print(f"  exported {path.name} ({len(files[path.name]) / 1024:.0f} KiB)", file=sys.stderr)
        proj = onnx.load_from_string(_projector(len(chans) * k, chans, threat, schema_hash()))
        proj = gather_channels(proj, view_channels(threat), "summary", f"projector-{threat}.onnx")
        files[f"projector-{threat}.onnx"] = proj.SerializeToString()
        projectors.append(
            ProjectorEntry(
                file=f"projector-{threat}.onnx",
                threat_model=threat,
                channels=chans,
                input_shape=list(input_shape("summary")),
                n_clusters=6,
                fitted_on="random",
                n_fit=0,
            )
        )
        (out / f"projector-{threat}.onnx").write_bytes(files[f"projector-{threat}.onnx"])
    manifest = Manifest(
        schema_hash=schema_hash(),
        created="bench",
        classes=list(PHASES),
        window_s=10,
        stride_s=5,
        rate_hz=10,
        opset=17,
        onnxruntime="1.17",
        files=[
            FileEntry(
                path=n,
                sha256=hashlib.sha256(d).hexdigest(),
                bytes=len(d),
                kind="projector" if n.startswith("projector") else "model",
            )
            for n, d in files.items()
        ],
        models=entries,
        projectors=projectors,
        envelopes=[Envelope(name="cpu-saturate", curve=[0.0, 1.0], shape="-")],
    )
    files["manifest.json"] = msgspec.json.encode(manifest)
    (out / "manifest.json").write_bytes(files["manifest.json"])
    (out / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    )
    return out


def _projector(width: int, chans: list[str], threat: str, schema: str) -> bytes:
    """A linear 3-D projection + nearest of 6 centroids, the shape of what export writes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["features", "P"], ["p"]),
        helper.make_node("Sigmoid", ["p"], ["xyz"]),
        helper.make_node("MatMul", ["features", "C"], ["c"]),
        helper.make_node("ArgMax", ["c"], ["cluster"], axis=1, keepdims=0),
    ]
    g = helper.make_graph(
        nodes,
        "projector",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [
            helper.make_tensor_value_info("xyz", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("cluster", TensorProto.INT64, ["N"]),
        ],
        [
            numpy_helper.from_array(rng.normal(0, 1e-6, (width, 3)).astype(np.float32), "P"),
            numpy_helper.from_array(rng.normal(0, 1e-6, (width, 6)).astype(np.float32), "C"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, {"schema_hash": schema, "threat_model": threat, "channels": json.dumps(chans)})
    return m.SerializeToString()


# --- live episodes written at 10 Hz ------------------------------------------------------------

# Every numeric column of each stream, as schema/rows defines it (proc also carries its pid).
_FIELDS = {s: (("pid",) if s == "proc" else ()) + row_fields(s) for s in SOURCES}
_MEMBER = {
    "proc": "telemetry-proc.jsonl",
    "guest": "telemetry-guest.jsonl",
    "qmp": "telemetry-qmp.jsonl",
    "netflow": "netflow.jsonl",
}


class Episode:
    """One live episode directory, appended to like a collector does (every stream, one row per tick)."""

    def __init__(self, live: Path, eid: str, started_ns: int, rng: random.Random) -> None:
        self.eid = eid
        self.dir = live / "bench-host" / eid
        self.dir.mkdir(parents=True)
        self.t0 = started_ns
        self.rng = rng
        self.i = 0
        meta = {
            "episode_id": eid,
            "host_id": "bench-host",
            "schema_version": 1,
            "sample_id": None,
            "profile": None,
            "started_ns": started_ns,
            "ended_ns": started_ns + 3600 * 10**9,
            "vm": {"vcpus": 2, "mem_mb": 2048, "os": "bench"},
            "collector": "bench",
        }
        (self.dir / "meta.json").write_text(json.dumps(meta))
        (self.dir / "labels.jsonl").write_text(json.dumps({"t_wall_ns": started_ns, "phase": "clean"}) + "\n")
        self.fds = {
            s: os.open(self.dir / m, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for s, m in _MEMBER.items()
        }
        self.completed: dict[int, float] = {}  # window -> wall time its completing line was appended

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _row(self, source: str, t: int) -> bytes:
        i = self.i
        vals = []
        for j, f in enumerate(_FIELDS[source]):
            if f == "pid":
                v = "4242"
            elif f == "interval_ms":
                v = "100"
            else:
                v = str(i * (j + 3) + self.rng.randint(0, 9))
            vals.append(f'"{f}":{v}')
        mono = t - self.t0 + 10**9
        return f'{{"t_wall_ns":{t},"t_mono_ns":{mono},{",".join(vals)}}}\n'.encode()

    def write_tick(self, t: int) -> None:
        """Rows stamped ``t`` for every 10 Hz stream (qmp once a second); notes completed windows."""
        for s in ("proc", "guest", "netflow"):
            os.write(self.fds[s], self._row(s, t))
        if self.i % 10 == 0:
            os.write(self.fds["qmp"], self._row("qmp", t))
        self.i += 1
        # window w is complete when every stream has a row at/after its last step
        qmp_t = self.t0 + ((self.i - 1) // 10) * 10 * STEP_NS
        reach = min(t, qmp_t)
        w = 0 if not self.completed else max(self.completed) + 1
        while self.t0 + (w * 50 + 99) * STEP_NS <= reach:
            self.completed[w] = time.time()
            w += 1


async def write_live(live: Path, n: int, seconds: float, seed: int, started: trio.Event) -> list[Episode]:
    rng = random.Random(seed)
    now = time.time_ns()
    # staggered: each episode began some seconds ago, so windows complete at spread-out times
    eps = [
        Episode(live, f"ep-{seed}-{k:04d}", now - rng.randint(0, 5 * 10**9) - 2 * 10**9, random.Random(k))
        for k in range(n)
    ]
    for ep in eps:  # the rows up to now, at once (what a collector had written before we looked)
        ep.i = 0
        t = ep.t0
        while t <= now:
            ep.write_tick(t)
            t += STEP_NS
    started.set()
    t_end = trio.current_time() + seconds
    while trio.current_time() < t_end:
        t = time.time_ns()
        for ep in eps:
            nxt = ep.t0 + ep.i * STEP_NS
            while nxt <= t:
                ep.write_tick(nxt)
                nxt += STEP_NS
        await trio.sleep(0.005)
    for ep in eps:
        ep.close()
    return eps


# --- the daemon process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DaemonProcess:
    def __init__(
        self, models: Path, live: Path, cpu: int | None = None, backend: str = "auto", run: str = "realistic"
    ) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "edge.daemon",
            "--models",
            str(models),
            "--live",
            str(live),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "WARNING",
            "--idle-timeout",
            "600",
            "--tail-backend",
            backend_config(backend)["backend"],
            "--defer-ms",
            str(1000 * float(backend_config(backend)["defer_s"])),
            "--run",
            run,
        ]
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.t_spawn = time.perf_counter()
        # The deployed unit (deploy/phasewatch-edge.service) sets MALLOC_ARENA_MAX=2: measure that.
        env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=pre, env=env)
        self.ready_s = self._wait_ready()
        self.ready_cpu_s = cpu_seconds(self.proc.pid)  # what a busy machine's wall clock hides

    def _wait_ready(self) -> float:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-daemon exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t_spawn
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("edge-daemon not ready within 60 s")

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_live(d: DaemonProcess, live: Path, n: int, seconds: float, seed: int) -> dict:
    """n episodes for `seconds`; per window: completing line appended -> prediction received."""
    received: dict[tuple[str, int], float] = {}
    eps: list[Episode] = []
    cpu0 = cpu_seconds(d.proc.pid)
    t0 = time.perf_counter()

    reconnects = 0

    async def client(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal reconnects
        started = False
        while True:  # a client the server closed for falling behind comes back, and is counted
            try:
                async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{d.port}/ws") as ws:
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        ev = json.loads(await ws.get_message())
                        if ev.get("type") == "prediction" and "window_no" in ev:
                            received.setdefault((ev["episode_id"], ev["window_no"]), time.time())
            except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
                reconnects += 1
                if d.proc.poll() is not None:
                    raise RuntimeError(f"edge-daemon exited with {d.proc.returncode}") from None
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        await nursery.start(client)
        started = trio.Event()
        eps = await write_live(live, n, seconds, seed, started)
        await trio.sleep(2.0)  # the last windows in flight
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(d.proc.pid) - cpu0
    lat, missing = [], 0
    for ep in eps:
        first = min(ep.completed) if ep.completed else 0
        for w, t_done in ep.completed.items():
            if w == first or t_done > time.time() - 3:
                continue  # the first was completed by the backfill; the last may be in flight
            got = received.get((ep.eid, w))
            if got is None:
                missing += 1
            else:
                lat.append(got - t_done)
    lat_ms = np.array(lat) * 1000
    h = d.health()
    return {
        "episodes": n,
        "seconds": round(wall, 1),
        "load_avg": round(os.getloadavg()[0], 1),
        "windows": len(lat),
        "missing": missing,
        "latency_ms": {
            "p50": _r(np.percentile(lat_ms, 50)),
            "p99": _r(np.percentile(lat_ms, 99)),
            "max": _r(lat_ms.max()),
        }
        if len(lat)
        else None,
        "cpu_share": round(cpu / wall, 3),
        "windows_dropped": h["windows_dropped"],
        "inference_queue": h["inference_queue"],
        "rss_mb": round(proc_status(d.proc.pid)["VmRSS"] / 1024, 1),
        "parse_errors": h["tail"]["parse_errors"],
        "fd_exhausted": h["tail"].get("fd_exhausted", 0),
        "client_reconnects": reconnects,
    }


# How each --backends entry runs the tailer: the stat-polling path (what the daemon did
# before inotify), inotify reading every changed file on every tick (last release), and
# inotify reading a changed file when its next window can complete (TailConfig.defer_s).
BACKENDS = {
    "poll": {"backend": "poll", "defer_s": 0.0},
    "inotify-eager": {"backend": "inotify", "defer_s": 0.0},
    "inotify": {"backend": "inotify", "defer_s": TailConfig.defer_s},
}


def backend_config(name: str) -> dict[str, str | float]:
    """A --backends entry: a BACKENDS name, or ``inotify@MS`` for deferred reads with ``--defer-ms MS``."""
    base, _, ms = name.partition("@")
    if base == "auto":  # the daemon's own default (the start-up and latency runs)
        return {"backend": "auto", "defer_s": TailConfig.defer_s}
    if base not in BACKENDS:
        raise SystemExit(
            f"bench_daemon: unknown backend {name!r}: one of {', '.join(BACKENDS)} or inotify@MS"
        )
    cfg: dict[str, str | float] = dict(BACKENDS[base])
    if ms:
        cfg["defer_s"] = float(ms) / 1000.0
    return cfg


def throughput(
    models: Path | None,
    work: Path,
    n: int,
    seconds: int,
    seed: int = 3,
    backend: str = "inotify",
    run: str = "all",
) -> dict:
    """CPU time the daemon's own work costs per episode-second, in process, immune to a busy box.

    N episodes are written in simulated real time: before each 20 ms tick (the daemon's
    tick) every row stamped up to that tick is appended (not timed), so each tick reads what
    a live collector wrote in those 20 ms, as the daemon does; then the tailer ticks (timed,
    stat calls and inotify reads included) and every ready window is scored by the models
    of ``--run`` and the projector the moment it is ready, and its events are encoded by the
    broadcaster (``models`` None: the tailer alone, windows extracted and summarised but not
    scored). ``episodes_per_core`` = episode-seconds / CPU-seconds."""
    import tempfile

    from edge.broadcast import Broadcaster
    from edge.infer import Engine
    from edge.livetree import LiveTailer
    from edge.modelset import load_models
    from schema.extract import extract_window, summarize

    engine = Engine(load_models(models), run=run) if models is not None else None
    bc = Broadcaster()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=work) as live:
        base = 1_700_000_000 * 10**9
        eps = [
            Episode(Path(live), f"tp-{k:04d}", base - rng.randint(0, 5 * 10**9), random.Random(k))
            for k in range(n)
        ]
        for ep in eps:  # what the collectors wrote before the daemon looked
            while ep.t0 + ep.i * STEP_NS <= base:
                ep.write_tick(ep.t0 + ep.i * STEP_NS)
        tailer = LiveTailer([Path(live)], TailConfig(idle_s=1e9, **backend_config(backend)))  # type: ignore[arg-type]
        cpu = 0.0
        windows = 0
        now = 0.0
        ticks = seconds * 50
        for k in range(ticks):
            t_end = base + (k + 1) * 20_000_000
            for ep in eps:
                while ep.t0 + ep.i * STEP_NS <= t_end:
                    ep.write_tick(ep.t0 + ep.i * STEP_NS)
            c0 = time.process_time()
            now += 0.02
            jobs = tailer.poll(now).jobs
            if jobs:
                windows += len(jobs)
                if engine is None:
                    for j in jobs:
                        summarize(extract_window(j.streams, j.t0_ns, j.w).tensor)
                else:
                    for s in engine.score(jobs):
                        bc.publish_many(s.all_events)
            cpu += time.process_time() - c0
        for ep in eps:
            ep.close()
        tailer.close()
    per_ep_s = cpu / (n * seconds)
    return {
        "what": "tailer + extract + summarize"
        if engine is None
        else f"tailer + extract + {engine.run} models + projector",
        "backend": backend,
        "run": run if engine is not None else None,
        "episodes": n,
        "seconds": seconds,
        "windows": windows,
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_episode_second": round(per_ep_s * 1000, 3),
        "cpu_ms_per_window": round(cpu / max(windows, 1) * 1000, 2),
        "episodes_per_core": int(1 / per_ep_s),
    }


def path_cost(models: Path, store: Path, episodes: int = 3, repeats: int = 5) -> dict:
    """The daemon's per-window path, median µs per window over the windows of ``episodes``
    store archives, each window given only its own rows (as the tailer hands them over):
    extract + summarize alone; + the six realistic models the issue names (all but rocket)
    + the projector, at batch 1; + all seven realistic models + projector at batch 1; and
    the real ``Engine`` (``--run realistic``: events, OOD score, projector) over 8 windows
    at once (what a tick with several ready windows costs, per window), and that Engine
    without rocket over 8 and over 2 windows (the six models the 1 ms target names)."""
    from edge.infer import Engine
    from edge.modelset import load_models
    from edge.tail import WindowJob
    from schema.columns import StreamColumns
    from schema.extract import extract_window, n_windows, summarize, window_last_step_ns, window_start_ns
    from schema.reader import read_episode

    ms = load_models(models)
    realistic = [m for m in ms.models if m.threat_model == "realistic"]
    six = [m for m in realistic if m.name != "rocket"]
    proj = ms.projectors.get("realistic")
    jobs: list[WindowJob] = []
    for path in sorted(store.glob("*/*.tar.zst"))[
        :: max(1, len(list(store.glob("*/*.tar.zst"))) // episodes)
    ][:episodes]:
        ep = read_episode(path)
        if ep.meta is None or "proc" not in ep.streams:
            continue
        t0 = ep.meta.started_ns
        for w in range(n_windows(t0, int(ep.streams["proc"].t_wall_ns.max()))):
            lo, hi = window_start_ns(t0, w) - 5_000_000_000, window_last_step_ns(t0, w)
            cut = {}
            for src, sc in ep.streams.items():
                k = (sc.t_wall_ns >= lo) & (sc.t_wall_ns <= hi)
                cut[src] = StreamColumns(src, sc.t_wall_ns[k], sc.t_mono_ns[k], sc.values[k], sc.malformed)
            jobs.append(WindowJob(ep.meta.host_id, ep.meta.episode_id, w, t0, cut, None, 0.0))

    def one(j: WindowJob, chosen: list) -> None:
        win = extract_window(j.streams, j.t0_ns, j.w)
        summary = summarize(win.tensor)
        for m in chosen:
            m.predict_proba(win.tensor if m.input_kind == "tensor" else summary)
        if chosen and proj is not None:
            proj.project(summary)

    engine = Engine(ms, run="realistic")
    # the same Engine without rocket: the six models the 1 ms names, as the daemon
    # batches them (windows of a tick together, the others over several ticks: edge/scoring.py)
    engine_six = Engine(
        dataclasses.replace(ms, models=[m for m in ms.models if m.name != "rocket"]), run="realistic"
    )

    def timed(fn, n: int) -> float:
        med = []
        for _ in range(repeats):
            ts = []
            for i in range(0, len(jobs) - n + 1, n):
                t = time.perf_counter_ns()
                fn(jobs[i : i + n])
                ts.append((time.perf_counter_ns() - t) / 1000 / n)
            med.append(float(np.median(ts)))
        return round(float(np.median(med)), 1)

    for j in jobs[:20]:
        one(j, realistic)
    out = {
        "windows": len(jobs),
        "extract_summarize_us": timed(lambda b: one(b[0], []), 1),
        "six_realistic_models_us": timed(lambda b: one(b[0], six), 1),
        "seven_realistic_models_us": timed(lambda b: one(b[0], realistic), 1),
        "engine_realistic_batch8_us": timed(lambda b: engine.score(b), 8),
        "engine_six_batch8_us": timed(lambda b: engine_six.score(b), 8),
        "engine_six_batch2_us": timed(lambda b: engine_six.score(b), 2),
        "models": [m.key for m in realistic],
    }
    return out


def _ratios(rows: list[dict], key: str, what: str) -> None:
    """Every backend side by side for each episode count, and old / new for each of them
    (poll = the old stat-polling path; > 1: that backend costs less than polling)."""
    by_n: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault(r["episodes"], {})[r.get("backend", "auto")] = r
    for n, b in sorted(by_n.items()):
        names = list(b)
        print(f"{what}, {n} episodes: " + " | ".join(f"{k} {b[k][key]}" for k in names), flush=True)
        if "poll" in b:
            ratios = [
                f"poll/{k} {b['poll'][key] / b[k][key]:.2f}" for k in names if k != "poll" and b[k][key]
            ]
            if ratios:
                print(f"    {key} ratios: " + ", ".join(ratios), flush=True)
        lat = [
            f"{k} p50 {v['latency_ms']['p50']} / p99 {v['latency_ms']['p99']} ms"
            for k, v in b.items()
            if v.get("latency_ms")
        ]
        if lat:
            print("    latency: " + ", ".join(lat), flush=True)


def _r(x: float) -> float:
    return round(float(x), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", type=Path, help="a models directory (default: export random-weight real graphs)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/phasewatch-bench"))
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument(
        "--capacity", default="100", help="comma-separated episode counts for the one-core runs ('' skips)"
    )
    ap.add_argument("--capacity-seconds", type=float, default=60)
    ap.add_argument("--cpu", type=int, default=1, help="core the daemon is pinned to for the capacity runs")
    ap.add_argument("--run", default="realistic", help="models run per window (the daemon's --run)")
    ap.add_argument(
        "--backends",
        default="poll,inotify-eager,inotify",
        help="tailer paths measured side by side: poll (the old stat-polling path), inotify-eager "
        "(inotify, every change read at once), inotify (reads deferred to the next window)",
    )
    ap.add_argument("--throughput", default="100,200", help="episode counts for the in-process CPU-time runs")
    ap.add_argument("--throughput-seconds", type=int, default=60)
    ap.add_argument("--skip-live", action="store_true", help="only the in-process throughput runs")
    ap.add_argument(
        "--tail-cost", default="", help="episode counts for in-process runs of the tailer + extractor alone"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--path-store", type=Path, default=None, help="a store: time the per-window path on its windows"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    need_models = bool(args.throughput.strip()) or not args.skip_live
    models = args.models or (export_random_models(args.work / "models") if need_models else None)
    report: dict = {"models": str(models), "host": os.uname().machine, "cores": os.cpu_count()}

    import tempfile

    # 0: capacity as CPU time per episode-second (what a busy shared machine cannot distort)
    backends = [b for b in args.backends.split(",") if b.strip()]
    # the in-process runs are CPU time of this process, pinned to the same core as the daemon's
    home = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.cpu})
    report["tail_cost"] = []
    for n in [int(x) for x in args.tail_cost.split(",") if x.strip()]:
        for backend in backends:
            r = throughput(None, args.work, n, args.throughput_seconds, backend=backend)
            report["tail_cost"].append(r)
            print("tail_cost", r, flush=True)
    _ratios(report["tail_cost"], "cpu_ms_per_episode_second", "tail_cost")
    report["throughput"] = []
    for n in [int(x) for x in args.throughput.split(",") if x.strip()]:
        for backend in backends:
            r = throughput(models, args.work, n, args.throughput_seconds, backend=backend, run=args.run)
            report["throughput"].append(r)
            print("throughput", r, flush=True)
    _ratios(report["throughput"], "cpu_ms_per_episode_second", "throughput")
    if args.path_store is not None and models is not None:
        report["path"] = path_cost(models, args.path_store)
        print("path", report["path"], flush=True)
    os.sched_setaffinity(0, home)
    if args.skip_live:
        print(json.dumps(report, indent=2))
        return 0
    # 1 + 2: start-up and latency, unpinned
    with tempfile.TemporaryDirectory(dir=args.work) as live:
        d = DaemonProcess(models, Path(live))
        try:
            st = proc_status(d.proc.pid)
            h = d.health()
            report["startup"] = {
                "ready_s": round(d.ready_s, 2),
                "ready_cpu_s": round(d.ready_cpu_s, 2),
                "load_avg": round(os.getloadavg()[0], 1),
                "rss_mb": round(st["VmRSS"] / 1024, 1),
                "models": len(h["models"]["models"]),
                "projectors": len(h["models"]["projectors"]),
            }
            print("startup", report["startup"], flush=True)
            report["latency"] = trio.run(run_live, d, Path(live), args.episodes, args.seconds, 1)
            report["latency"]["rss_hwm_mb"] = round(proc_status(d.proc.pid)["VmHWM"] / 1024, 1)
            print("latency", report["latency"], flush=True)
        finally:
            d.stop()
    # 3: capacity on one core
    report["capacity"] = []
    # The writer (the collectors' side: up to 30k appends/s at 1,000 episodes) runs off the
    # daemon's core wherever there is another one, so the daemon's share is its own.
    others = home - {args.cpu}
    if others:
        os.sched_setaffinity(0, others)
    report["writer_cpus"] = sorted(others or home)
    for n in [int(x) for x in args.capacity.split(",") if x.strip()]:
        for backend in backends:
            with tempfile.TemporaryDirectory(dir=args.work) as live:
                d = DaemonProcess(models, Path(live), cpu=args.cpu, backend=backend, run=args.run)
                try:
                    r = trio.run(run_live, d, Path(live), n, args.capacity_seconds, 2)
                    r["rss_hwm_mb"] = round(proc_status(d.proc.pid)["VmHWM"] / 1024, 1)
                finally:
                    d.stop()
            r["backend"] = backend
            r["keeps_up"] = bool(r["cpu_share"] < 0.95 and r["missing"] == 0 and r["inference_queue"] < n)
            report["capacity"].append(r)
            print("capacity", r, flush=True)
    os.sched_setaffinity(0, home)
    _ratios(report["capacity"], "cpu_share", "capacity")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
