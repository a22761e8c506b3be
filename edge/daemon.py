"""``edge-daemon``: tail live episodes, score every window with the loaded models, serve the deck.

    edge-daemon --models DIR [--live DIR] [--store DIR] [--replay STORE [--speed X]]
                [--bind ADDR] [--port N] [--publish-token TOKEN] [--demo]
                [--mqtt mqtt://[user:pass@]host[:port] [--node-id ID] [--mqtt-ca FILE]]
    edge-daemon --fleet mqtt://... [--port N]      # one deck for every node on the broker

One trio loop: the tailer ticks every ``--poll-ms``; ready windows go through a bounded
channel to one worker thread (``CapacityLimiter(1)``) that extracts and runs every model;
the results are published to the broadcaster, which the server fans out to browsers. The
models directory is reloaded on SIGHUP or when its files change (and then hold still); a
reload that fails keeps the old set serving and shows the error on ``/healthz``.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import trio

from edge.broadcast import Broadcaster
from edge.infer import Engine, startup_events
from edge.livetree import LiveTailer, TailBatch
from edge.metrics import LATENCY_BUCKETS, Metrics, _Family, format_value
from edge.modelset import RUN_CHOICES, ModelSet, ModelSetError, load_models
from edge.scoring import ScoringLoop
from edge.tail import TailConfig, TailCounters, WindowJob
from schema.hashing import schema_hash

log = logging.getLogger("edge.daemon")


class _TailFamily(_Family):
    """The tailer's counters, read at scrape time (no double bookkeeping)."""

    kind = "counter"

    def __init__(self, counters: TailCounters) -> None:
        super().__init__("phasewatch_tail_total", "What the tailer read and survived, by kind.", ("kind",))
        self.counters = counters

    def samples(self) -> Iterator[str]:
        for k, v in self.counters.as_dict().items():
            yield f'{self.name}{{kind="{k}"}} {format_value(v)}'


def static_dir() -> Path | None:
    """The deck: inside the wheel as edge/deck, in a checkout at <repo>/deck."""
    here = Path(__file__).resolve().parent
    for d in (here / "deck", here.parent / "deck"):
        if (d / "index.html").is_file():
            return d
    return None


class Daemon(ScoringLoop):
    def __init__(
        self,
        models_dir: Path | None,
        *,
        live: Sequence[Path] = (),
        store: Path | None = None,
        replay: Path | None = None,
        speed: float = 1.0,
        replay_concurrency: int = 4,
        bind: str = "0.0.0.0",
        port: int = 8080,
        publish_token: str | None = None,
        allowed_hosts: Sequence[str] = (),
        trust_loopback: bool = True,
        demo: bool = False,
        poll_s: float = 0.02,
        tail: TailConfig | None = None,
        all_predictions: bool = False,
        run: str = "all",  # the CLI defaults to "realistic" (--run)
        state_dir: Path | None = None,
        max_batch: int = 64,
        modelset: ModelSet | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.store = store
        self.replay = replay
        self.speed = speed
        self.replay_concurrency = replay_concurrency
        self.bind, self.port = bind, port
        self.publish_token = publish_token
        self.allowed_hosts = tuple(allowed_hosts)
        self.trust_loopback = trust_loopback
        self.demo = demo
        self.poll_s = poll_s
        self.all_predictions = all_predictions
        self.state_dir = state_dir
        self.max_batch = max_batch
        self.metrics = Metrics()
        self.broadcaster = Broadcaster(metrics=self.metrics)
        self.counters = TailCounters()
        self.tailer = LiveTailer(list(live), tail or TailConfig(), self.counters)
        self.metrics.registry.register(_TailFamily(self.counters))
        self.latency = self.metrics.registry.histogram(
            "phasewatch_window_latency_seconds",
            "From the tick that saw a window complete to its events published.",
            buckets=LATENCY_BUCKETS,
        )
        self.windows_dropped = self.metrics.registry.counter(
            "phasewatch_windows_dropped_total", "Ready windows dropped because inference fell behind."
        )
        self.reload_failures = self.metrics.registry.counter(
            "phasewatch_reload_failures_total",
            "Model reloads refused; the old set kept serving.",
            ("reason",),
        )
        self.modelset = modelset
        self.run_models = run
        self.engine: Engine | None = Engine(modelset, self.metrics, run=run) if modelset is not None else None
        self.reload_error: str | None = None
        self.reloads = 0
        self.loaded_at: float | None = time.time() if modelset is not None else None
        self.started_at = time.time()
        self.store_error: str | None = None
        self.replay_dir: Path | None = None
        self.replay_retention: Any = None  # edge.replay.Retention: deletes what the tailer finished
        self.listeners: list[trio.SocketListener] = []
        self._limiter = trio.CapacityLimiter(1)
        self._loaded_sig = self._dir_sig()
        self._jobs_tx, self._jobs_rx = trio.open_memory_channel[WindowJob](1024)
        self.mqtt: Any = None  # edge.mqtt.MqttPublisher (--mqtt): started with the server
        self.fleet: Any = None  # edge.fleet.FleetReader (--fleet)

    # --- models ---

    def _dir_sig(self) -> frozenset[tuple[str, int, int]] | None:
        """What the models directory holds now (names, sizes, mtimes): a change means a new export."""
        if self.models_dir is None:
            return None
        try:
            with os.scandir(self.models_dir) as it:
                return frozenset(
                    (e.name, (st := e.stat()).st_size, st.st_mtime_ns) for e in it if e.is_file()
                )
        except OSError:
            return None

    def load(self) -> None:
        """First load; a ModelSetError here stops the daemon (the caller prints it)."""
        assert self.models_dir is not None
        self._install(load_models(self.models_dir, schema_hash(), run=self.run_models))

    def _install(self, ms: ModelSet) -> None:
        self.modelset = ms
        self.engine = Engine(ms, self.metrics, run=self.run_models)
        self.loaded_at = time.time()
        log.info("serving %d models; %s drives the timeline", len(ms.models), self.engine.primary.key)

    def publish_startup(self) -> None:
        if self.modelset is not None:
            self.broadcaster.publish_many(startup_events(self.modelset))

    async def reload(self, why: str) -> bool:
        """Load the directory again; whatever goes wrong (a refused set, an OSError such as
        SHA256SUMS being a directory or a file the service user may not read, a bug), the
        old set keeps serving and ``/healthz`` says why under ``reload_error``."""
        assert self.models_dir is not None
        log.info("reloading %s (%s)", self.models_dir, why)
        try:
            ms = await trio.to_thread.run_sync(
                functools.partial(load_models, self.models_dir, schema_hash(), run=self.run_models)
            )
            events = startup_events(ms)
        except Exception as e:
            detail = str(e) if isinstance(e, ModelSetError) else f"{type(e).__name__}: {e}"
            self.reload_error = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {detail}"
            self.reload_failures.inc(reason=type(e).__name__)
            log.error("reload failed, still serving the previous models: %s", detail)
            if not isinstance(e, (ModelSetError, OSError)):
                log.debug("reload failure", exc_info=True)
            return False
        self._install(ms)
        self.reload_error = None
        self.reloads += 1
        self.broadcaster.publish_many(events)
        return True

    async def _watch_models(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload on SIGHUP, or when the directory changed and then held still for one poll
        (an scp or rsync in progress is not loaded half-copied). A set that failed is not
        retried until the directory changes again."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()  # SIGHUP is ours from here: it no longer kills the process

            async def on_signal() -> None:
                async for _ in signals:
                    self._loaded_sig = self._dir_sig()
                    await self.reload("SIGHUP")

            async with trio.open_nursery() as n:
                n.start_soon(on_signal)
                previous = self._loaded_sig
                while True:
                    await trio.sleep(2.0)
                    sig = self._dir_sig()
                    if sig is not None and sig != self._loaded_sig and sig == previous:
                        self._loaded_sig = sig
                        await self.reload("models directory changed")
                    previous = sig

    # --- the live path ---

    async def _tail_loop(self) -> None:
        while True:
            batch = self.tailer.poll(trio.current_time())
            self._handle(batch)
            await self.tailer.wait(self.poll_s)  # inotify: until something changes; polling: a tick

    def _handle(self, batch: TailBatch) -> None:
        for ep, p in batch.problems:
            self.metrics.parse_errors.inc(stream=p.member or "?")
            if self.metrics.parse_errors.value(stream=p.member or "?") <= 3:
                log.warning("%s/%s: %s", ep.host, ep.episode_id, p)
        if self.replay_retention is not None:
            for ep in batch.finished:
                self.replay_retention.release(ep.path)  # a replayed episode leaves the disk
        for job in batch.jobs:
            try:
                self._jobs_tx.send_nowait(job)
            except trio.WouldBlock:
                self.windows_dropped.inc()
        self.metrics.live_episodes.set(len(self.tailer.episodes))

    # --- optional sources ---

    async def _store_loop(self) -> None:
        from edge.storewatch import StoreWatcher

        assert self.store is not None
        watcher = StoreWatcher(self.store)
        while True:
            try:
                up = await trio.to_thread.run_sync(watcher.poll)
                self.store_error = watcher.index_error
            except OSError as e:
                self.store_error = str(e)
                log.warning("store %s: %s", self.store, e)
            else:
                for ev in up.episodes:
                    self.broadcaster.publish(ev)
                if up.snapshot is not None:
                    self.broadcaster.publish(up.snapshot)
            await trio.sleep(3.0)

    async def _replay(self, out: Path) -> None:
        from edge.replay import Retention, replay_store

        assert self.replay is not None
        # --replay loops forever: an episode is deleted once written and the tailer is done with it
        self.replay_retention = Retention(out, keep=0, wait_for_reader=True)
        await replay_store(
            self.replay,
            out,
            speed=self.speed,
            loop=True,
            concurrency=self.replay_concurrency,
            retention=self.replay_retention,
        )

    # --- health ---

    def health(self) -> dict[str, Any]:
        ms = self.modelset
        return {
            "ok": ms is not None or self.demo or self.fleet is not None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "schema_hash": schema_hash(),
            "models": ms.describe() if ms is not None else None,
            "primary_model": self.engine.primary.key if self.engine is not None else None,
            "models_loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "live_roots": [str(r) for r in self.tailer.roots],
            "live_episodes": len(self.tailer.episodes),
            "tail": self.counters.as_dict(),
            "inference_queue": self._jobs_rx.statistics().current_buffer_used,
            "windows_dropped": int(self.windows_dropped.value()),
            "windows_unscored": self.metrics.windows_unscored.by_labels(),  # "<threat>/<reason>": n
            "store": str(self.store) if self.store else None,
            "store_error": self.store_error,
            "replay_dir": str(self.replay_dir) if self.replay_dir else None,
            "clients": self.broadcaster.client_count,
            **({"mqtt": self.mqtt.health()} if self.mqtt is not None else {}),
            **({"fleet": self.fleet.health()} if self.fleet is not None else {}),
        }

    def node_status(self) -> Any:
        """What this node's MQTT status says about it (edge.mqtt heartbeats)."""
        from schema.events import NodeStatus

        ms = self.modelset
        return NodeStatus(
            state="online",
            models=[m.key for m in ms.models] if ms is not None else None,
            primary_model=self.engine.primary.key if self.engine is not None else None,
            live_episodes=len(self.tailer.episodes),
        )

    # --- run ---

    async def run(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from edge.server import serve

        self.publish_startup()
        with tempfile.TemporaryDirectory(prefix="phasewatch-replay-", dir=self.state_dir) as tmp:
            async with trio.open_nursery() as n:
                self.listeners = await n.start(
                    lambda task_status: serve(
                        self.broadcaster,
                        host=self.bind,
                        port=self.port,
                        static_dir=static_dir(),
                        health=self.health,
                        metrics=self.metrics,
                        publish_token=self.publish_token,
                        allowed_hosts=self.allowed_hosts,
                        trust_loopback=self.trust_loopback,
                        task_status=task_status,
                    )
                )
                if self.replay is not None:
                    self.replay_dir = Path(tmp)
                    self.tailer.add_root(self.replay_dir)
                    n.start_soon(self._replay, self.replay_dir)
                if self.tailer.roots:
                    n.start_soon(self._tail_loop)
                    n.start_soon(self._infer_loop)
                if self.store is not None:
                    n.start_soon(self._store_loop)
                if self.models_dir is not None:
                    await n.start(self._watch_models)
                if self.mqtt is not None:
                    await n.start(self.mqtt.run)
                if self.fleet is not None:
                    await n.start(self.fleet.run)
                if self.demo:
                    from edge.demo import run_demo

                    n.start_soon(run_demo, self.broadcaster)
                task_status.started(self.listeners)
                log.info("listening on %s:%d", self.bind, self.listeners[0].socket.getsockname()[1])


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming the fix, as every other refusal of ``main``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _OneLineParser(prog="edge-daemon", description="Live malware-phase detection for the deck.")
    ap.add_argument("--models", type=Path, help="models directory from `phasewatch export`")
    ap.add_argument(
        "--live",
        type=Path,
        action="append",
        default=[],
        help="live episodes root, <live>/<host>/<episode>/ (repeatable)",
    )
    ap.add_argument("--store", type=Path, help="receiver store to summarise (snapshot, episode events)")
    ap.add_argument(
        "--replay", type=Path, metavar="STORE", help="replay this store's archives as live episodes"
    )
    ap.add_argument("--speed", type=float, default=1.0, help="replay time multiplier (default 1)")
    ap.add_argument("--replay-concurrency", type=int, default=4, help="episodes replayed at once")
    ap.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument(
        "--publish-token",
        default=os.environ.get("PHASEWATCH_PUBLISH_TOKEN"),
        help="bearer token for POST /publish from other hosts (env PHASEWATCH_PUBLISH_TOKEN)",
    )
    ap.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name /publish and /ws answer to besides localhost, this machine's names and "
        "addresses and --bind (repeatable; e.g. the name a reverse proxy forwards)",
    )
    ap.add_argument(
        "--no-trust-loopback",
        dest="trust_loopback",
        action="store_false",
        help="loopback peers need the token too (behind a reverse proxy on this host, where every "
        "request comes from loopback); needs --publish-token",
    )
    ap.add_argument("--demo", action="store_true", help="publish demo events (no models needed)")
    ap.add_argument(
        "--all-predictions",
        action="store_true",
        help="also publish every non-primary model's predictions (model field set)",
    )
    ap.add_argument("--poll-ms", type=float, default=20.0, help="tail tick in ms (default 20)")
    ap.add_argument(
        "--run",
        choices=RUN_CHOICES,
        default="realistic",
        help="models run per window: the primary, the realistic ones + projector (default), or all",
    )
    ap.add_argument(
        "--tail-backend",
        choices=("auto", "inotify", "poll"),
        default="auto",
        help="how live files are watched: inotify events, or stat polling (NFS; default auto)",
    )
    ap.add_argument(
        "--defer-ms",
        type=float,
        default=TailConfig.defer_s * 1000.0,
        help="inotify: read a changed file when the next window can complete, or after this many ms "
        f"(default {TailConfig.defer_s * 1000:.0f}; 0 reads on every change)",
    )
    ap.add_argument(
        "--idle-timeout", type=float, default=60.0, help="finalise a silent episode after this many s"
    )
    ap.add_argument(
        "--mqtt",
        default=os.environ.get("PHASEWATCH_MQTT"),
        metavar="URL",
        help="also publish every event to mqtt[s]://[user:pass@]host[:port] (env PHASEWATCH_MQTT)",
    )
    ap.add_argument(
        "--node-id",
        default=os.environ.get("PHASEWATCH_NODE_ID"),
        help="this daemon's name under phasewatch/v1/ (default: the hostname; env PHASEWATCH_NODE_ID)",
    )
    ap.add_argument(
        "--mqtt-ca",
        type=Path,
        default=os.environ.get("PHASEWATCH_MQTT_CA"),
        help="CA certificate for mqtts:// (env PHASEWATCH_MQTT_CA)",
    )
    ap.add_argument(
        "--fleet", metavar="URL", help="serve the deck for every node on this broker (no models needed)"
    )
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a fatal error")
    return ap


# The directories main checks before anything starts, and what to do when one is unusable.
_DIR_FIXES: Final = {
    "--models": "point it at the directory `phasewatch export` wrote",
    "--store": "point it at the receiver store (<store>/<host>/*.tar.zst)",
    "--replay": "point it at a receiver store (<store>/<host>/*.tar.zst)",
    "--live": "point it at the live episodes root (<live>/<host>/<episode>/)",
}


def _unusable_dir(flag: str, path: Path) -> str | None:
    """Why ``path`` cannot be listed (one line with the fix), or None when it can."""
    try:
        with os.scandir(path):
            return None
    except FileNotFoundError:
        why = "no such directory"
    except NotADirectoryError:
        why = "not a directory"
    except PermissionError:
        why = f"not readable by this user (uid {os.getuid()}); fix its permissions or the unit's User="
    except OSError as e:
        why = e.strerror or str(e)
    return f"{flag} {path}: {why}; {_DIR_FIXES[flag]}"


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (trio's nurseries)."""
    while (inner := getattr(exc, "exceptions", None)) and len(inner) == 1:
        exc = inner[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.models is None and not args.demo and not args.fleet:
        ap.error("--models DIR is required (or --demo for demo events, --fleet URL for a fleet deck)")
    if not args.trust_loopback and not args.publish_token:
        ap.error("--no-trust-loopback leaves nobody able to publish: give --publish-token too")
    from edge.mqtt import cli_settings

    try:
        mqtt_settings = cli_settings(args.mqtt, args.node_id, args.mqtt_ca, args.fleet)
    except ValueError as e:
        ap.error(str(e))
    if args.speed <= 0:
        ap.error("--speed must be > 0")
    dirs = [("--models", args.models), ("--store", args.store), ("--replay", args.replay)]
    for flag, path in [*dirs, *(("--live", d) for d in args.live)]:
        if path is not None and (why := _unusable_dir(flag, path)):
            print(f"edge-daemon: {why}", file=sys.stderr)
            return 2
    state = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    daemon = Daemon(
        args.models,
        live=args.live,
        store=args.store,
        replay=args.replay,
        speed=args.speed,
        replay_concurrency=args.replay_concurrency,
        bind=args.bind,
        port=args.port,
        publish_token=args.publish_token,
        allowed_hosts=args.allowed_host,
        trust_loopback=args.trust_loopback,
        demo=args.demo,
        poll_s=args.poll_ms / 1000.0,
        tail=TailConfig(idle_s=args.idle_timeout, backend=args.tail_backend, defer_s=args.defer_ms / 1000.0),
        all_predictions=args.all_predictions,
        run=args.run,
        state_dir=Path(state.split(":")[0]) if state else None,
    )
    mqtt_settings.install(daemon)
    if args.models is not None:
        t = time.perf_counter()
        try:
            daemon.load()
        except (ModelSetError, OSError) as e:
            if args.debug:
                raise
            print(f"edge-daemon: refusing to start: {e}", file=sys.stderr)
            return 2
        log.info("models ready in %.2f s", time.perf_counter() - t)
    try:
        trio.run(daemon.run)
    except BaseException as group:  # trio hands errors back inside exception groups
        if _interrupted(group):  # Ctrl-C: a clean stop (the MQTT bridge has said offline), no traceback
            return 0
        err = _leaf(group)
        if not isinstance(err, Exception):
            raise
        if args.debug:
            raise err from group  # its own traceback, the group as its cause
        if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
            why = f"{args.bind}:{args.port}: {err.strerror}; stop the other server or pick another --port"
        elif isinstance(err, OSError):
            why = str(err)
        else:
            why = f"{type(err).__name__}: {err} (--debug shows the traceback)"
        print(f"edge-daemon: {why}", file=sys.stderr)
        return 1
    return 0


def _interrupted(e: BaseException) -> bool:
    """KeyboardInterrupt, alone or inside the nursery's exception group."""
    inner: Sequence[BaseException] = getattr(e, "exceptions", None) or ()
    return isinstance(e, KeyboardInterrupt) or (bool(inner) and all(_interrupted(x) for x in inner))


if __name__ == "__main__":
    raise SystemExit(main())
