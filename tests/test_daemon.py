"""The daemon end to end: real files, real ONNX Runtime, real sockets; plus replay and the store."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import trio
import trio_websocket
from archive_kit import episode_members, write_archive
from test_infer import build_models_dir

from edge import daemon as daemon_mod
from edge.daemon import Daemon
from edge.modelset import load_models
from edge.replay import load_episode, replay_store
from edge.storewatch import StoreWatcher
from edge.tail import TailConfig
from schema.hashing import schema_hash
from schema.reader import iter_members, read_episode
from schema.validation import index_record, write_index_atomic
from schema.vocab import MODELS


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def _write_live(live: Path, members: dict[str, bytes], host: str = "host-a", eid: str = "ep-live") -> Path:
    d = live / host / eid
    d.mkdir(parents=True)
    (d / "meta.json").write_bytes(members["meta.json"])
    for name, data in members.items():
        if name.endswith(".jsonl"):
            (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models_dir(tmp_path_factory.mktemp("models"))


def test_schema_hash_mismatch_is_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = build_models_dir(tmp_path / "m", schema="0" * 64, bench=False)
    rc = daemon_mod.main(["--models", str(bad), "--port", "0", "--bind", "127.0.0.1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to start" in err and "schema hash mismatch" in err and schema_hash() in err


def test_live_episode_to_websocket_client(tmp_path: Path, models_dir: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    members = episode_members("ep-live", "host-a", duration_s=40, seed=4)
    d = Daemon(
        models_dir,
        live=[live],
        bind="127.0.0.1",
        port=0,
        modelset=load_models(models_dir),
        tail=TailConfig(idle_s=30),
    )
    got: list[dict] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                _write_live(live, members)
                (live / "host-a" / "ep-live" / "done.marker").touch()
                with trio.fail_after(20):
                    while sum(e["type"] == "embedding" for e in got) < 7:  # the last event of a window
                        got.append(json.loads(await ws.get_message()))
                health = await trio.to_thread.run_sync(_get, port, "/healthz")
                metrics = await trio.to_thread.run_sync(
                    lambda: (
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                    )
                )
            n.cancel_scope.cancel()
        assert health["primary_model"] == "gru-realistic" and health["reload_error"] is None
        assert health["tail"]["windows_ready"] == 7 and health["tail"]["episodes_finished"] == 1
        assert 'phasewatch_tail_total{kind="lines"}' in metrics
        assert 'phasewatch_windows_inferred_total{model="transformer-oracle"} 7' in metrics
        assert "phasewatch_window_latency_seconds_count 7" in metrics

    trio.run(main)
    types = [e["type"] for e in got]
    # the sticky state (what the models directory knows) comes first; the deck keys bars by
    # model name, and the realistic figure (published last) is the one that stays
    # (model_metric is kept per (model, threat_model): the oracle twin replays first, then the
    # realistic one, so "latest wins" per name still ends on the realistic figure)
    n = len(MODELS)  # one model_metric per model and threat model, one model_perf per model
    sticky = got[: 1 + 3 * n]
    assert [e["type"] for e in sticky] == ["attack_profile"] + ["model_metric"] * 2 * n + ["model_perf"] * n
    last = {e["model"]: e["threat_model"] for e in sticky[1:]}
    assert len(last) == n and set(last.values()) == {"realistic"}
    assert {e["threat_model"] for e in sticky[1 : 1 + 2 * n]} == {"realistic", "oracle"}
    assert {e["threat_model"] for e in sticky[1 + 2 * n :]} == {"realistic"}
    preds = [e for e in got if e["type"] == "prediction"]
    assert [p["window_no"] for p in preds] == list(range(7))  # 40 s: windows 0..6
    assert all(p["model"] == "gru-realistic" and p["window_idx"] == p["window_no"] % 6 for p in preds)
    assert {p["actual"] for p in preds} <= {"clean", "armed", "infecting", "infected_running"}
    assert types.count("embedding") == 7 and types.count("phase") == 7


def test_failed_reload_keeps_the_old_models_and_says_why(tmp_path: Path) -> None:
    mdir = build_models_dir(tmp_path / "models")
    d = Daemon(mdir, bind="127.0.0.1", port=0, modelset=load_models(mdir))
    first = d.engine

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            # a half-copied model: SHA256SUMS no longer matches -> refused, old set kept
            with open(mdir / "gru-realistic.onnx", "ab") as fh:
                fh.write(b"junk")
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while d.reload_error is None:
                    await trio.sleep(0.05)
            health = await trio.to_thread.run_sync(_get, port, "/healthz")
            assert (
                "sha256 mismatch" in health["reload_error"] and "gru-realistic.onnx" in health["reload_error"]
            )
            assert d.engine is first and health["models"]["models"]
            # a fresh export lands: picked up without a signal once the directory holds still
            build_models_dir(mdir)
            os.utime(mdir / "SHA256SUMS", ns=(time.time_ns() + 10**9,) * 2)
            with trio.fail_after(15):
                while d.reloads == 0:
                    await trio.sleep(0.1)
            assert d.reload_error is None and d.engine is not first
            n.cancel_scope.cancel()

    trio.run(main)


# --- replay ----------------------------------------------------------------------------


def test_replay_writes_a_live_episode_line_for_line(tmp_path: Path) -> None:
    members = episode_members("ep-r", "host-r", duration_s=20, seed=9)
    members["telemetry-proc.jsonl"] += b"not json\n"  # replayed as is: the tailer must cope
    store = tmp_path / "store"
    write_archive(store / "host-r" / "ep-r.tar.zst", members)
    out = tmp_path / "live"
    t0 = time.time_ns()
    seen_meta_first: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as n:

            async def watch() -> None:  # meta.json is there before any stream line
                d = out / "host-r" / "ep-r"
                while not d.exists():
                    await trio.sleep(0.001)
                seen_meta_first.append((d / "meta.json").exists() or not any(d.glob("*.jsonl")))

            n.start_soon(watch)
            count = await replay_store(store, out, speed=40.0, concurrency=1)
            assert count == 1

    trio.run(main)
    d = out / "host-r" / "ep-r"
    assert seen_meta_first == [True]
    assert (d / "done.marker").exists()
    meta = json.loads((d / "meta.json").read_text())
    shift = meta["started_ns"] - json.loads(members["meta.json"])["started_ns"]
    assert abs(meta["started_ns"] - t0) < 5 * 10**9
    for name in ("telemetry-proc.jsonl", "telemetry-qmp.jsonl", "labels.jsonl"):
        orig = members[name].splitlines()
        got = (d / name).read_bytes().splitlines()
        assert len(got) == len(orig), name
        for a, b in zip(orig, got):
            if a.startswith(b"{"):
                ja, jb = json.loads(a), json.loads(b)
                assert jb["t_wall_ns"] == ja["t_wall_ns"] + shift
                assert {k: v for k, v in ja.items() if k != "t_wall_ns"} == {
                    k: v for k, v in jb.items() if k != "t_wall_ns"
                }
            else:
                assert a == b


def test_replay_refuses_unsafe_members_without_touching_disk(tmp_path: Path) -> None:
    import tarfile

    from archive_kit import special

    members = episode_members("ep-u", "host-u", duration_s=12)
    path = write_archive(
        tmp_path / "s" / "host-u" / "ep-u.tar.zst",
        members,
        extra=[special("ep-u/evil", tarfile.SYMTYPE, "/etc/passwd")],
    )
    names = [n for n, _ in iter_members(path)]
    assert "evil" not in names and "meta.json" in names
    ep = load_episode(path)
    assert ep.done and set(ep.members) >= {"labels.jsonl", "telemetry-proc.jsonl"}


# --- the store -------------------------------------------------------------------------


def test_storewatch_snapshot_and_new_archives(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = write_archive(store / "h1" / "e1.tar.zst", episode_members("e1", "h1", duration_s=30))
    nodone = episode_members("e2", "h1", duration_s=30)
    del nodone["done.marker"]
    write_archive(store / "h1" / "e2.tar.zst", nodone)
    # an index that knows e1 only
    st = good.stat()
    write_index_atomic(
        store / "index.jsonl", [index_record(read_episode(good), "h1/e1.tar.zst", mtime_ns=st.st_mtime_ns)]
    )
    w = StoreWatcher(store)
    up = w.poll()
    assert up.snapshot is not None and up.episodes == []
    (h,) = up.snapshot.hosts
    assert (h.host, h.accepted, h.degraded) == ("h1", 1, 0)  # e2 is not settled yet
    up = w.poll()  # e2 held still for a poll: classified by the validator's rules
    (h,) = up.snapshot.hosts  # type: ignore[union-attr]
    assert (h.accepted, h.degraded) == (1, 1)
    assert up.episodes == []  # it was there before the watcher started
    # a newly shipped archive
    write_archive(
        store / "h2" / "e3.tar.zst", episode_members("e3", "h2", duration_s=30, profile="bursty-c2")
    )
    w.poll()
    up = w.poll()
    (ev,) = up.episodes
    assert (ev.episode_id, ev.host, ev.profile, ev.status) == ("e3", "h2", "bursty-c2", "accepted")
    assert ev.bytes and ev.bytes > 0 and up.snapshot is not None
    assert up.snapshot.totals is not None and up.snapshot.totals.accepted == 2
    assert up.snapshot.total_bytes == sum(p.stat().st_size for p in store.glob("*/*.tar.zst"))
    assert w.poll().snapshot is None  # nothing changed: no new snapshot


def test_demo_mode_needs_no_models(tmp_path: Path) -> None:
    d = Daemon(None, demo=True, bind="127.0.0.1", port=0)
    got: list[dict] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                with trio.fail_after(10):
                    while len({e["type"] for e in got}) < 3:
                        got.append(json.loads(await ws.get_message()))
            health = await trio.to_thread.run_sync(_get, port, "/healthz")
            assert health["ok"] and health["models"] is None
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_slow_model_stalls_neither_tailing_nor_the_server(tmp_path: Path, models_dir: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    d = Daemon(models_dir, live=[live], bind="127.0.0.1", port=0, modelset=load_models(models_dir))
    assert d.engine is not None
    real_score = d.engine.score_primary
    in_model = threading.Event()

    def slow_score(jobs):  # a model that takes 2 s per batch, in the worker thread
        in_model.set()
        time.sleep(2.0)
        return real_score(jobs)

    d.engine.score_primary = slow_score  # type: ignore[method-assign]
    members = episode_members("ep-slow", "host-a", duration_s=40, seed=4)

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            _write_live(
                live, {k: v for k, v in members.items() if k != "telemetry-guest.jsonl"}, eid="ep-slow"
            )
            with trio.fail_after(10):
                while not in_model.is_set():
                    await trio.sleep(0.01)
            lines = d.counters.lines
            # the model is busy for 2 s: the server answers and the tailer keeps reading meanwhile
            t = time.perf_counter()
            health = await trio.to_thread.run_sync(_get, port, "/healthz")
            assert time.perf_counter() - t < 0.5 and health["ok"]
            (live / "host-a" / "ep-slow" / "telemetry-guest.jsonl").write_bytes(
                members["telemetry-guest.jsonl"]
            )
            with trio.fail_after(1.5):
                while d.counters.lines == lines:
                    await trio.sleep(0.01)
            assert in_model.is_set()
            n.cancel_scope.cancel()

    trio.run(main)


def test_daemon_replays_a_store_into_live_predictions(tmp_path: Path, models_dir: Path) -> None:
    store = tmp_path / "store"
    write_archive(store / "host-s" / "ep-s.tar.zst", episode_members("ep-s", "host-s", duration_s=30, seed=6))
    d = Daemon(
        models_dir,
        replay=store,
        speed=15.0,
        bind="127.0.0.1",
        port=0,
        modelset=load_models(models_dir),
        state_dir=tmp_path,
    )
    preds: list[dict] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                with trio.fail_after(20):
                    while len(preds) < 4:
                        ev = json.loads(await ws.get_message())
                        if ev["type"] == "prediction":
                            preds.append(ev)
            assert d.replay_dir is not None and d.replay_dir.parent == tmp_path
            n.cancel_scope.cancel()

    trio.run(main)
    assert [p["window_no"] for p in preds] == [0, 1, 2, 3]
    assert {p["episode_id"] for p in preds} == {"ep-s"}
    assert not any(tmp_path.glob("phasewatch-replay-*"))  # the private live directory is cleaned up
