"""The daemon under faults (issue 14; docs/FAULTS.md lists what each test covers): real files,
real ONNX Runtime, real sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import trio
from test_infer import build_models_dir

from edge import daemon as daemon_mod
from edge.daemon import Daemon
from edge.modelset import load_models

BODY = b'{"type":"phase","phase":"clean"}'


def _post(port: int, host: str, token: str | None = None) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": host, "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    c.request("POST", "/publish", BODY, headers)
    status = c.getresponse().status
    c.close()
    return status


def _get(port: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    body = json.loads(c.getresponse().read())
    c.close()
    return body


# --- item 4: Host names and the reverse-proxy flag ------------------------------------------------


def test_allowed_host_and_no_trust_loopback_flags_reach_the_server() -> None:
    args = daemon_mod._parser().parse_args(
        ["--demo", "--allowed-host", "deck.lab", "--no-trust-loopback", "--publish-token", "tok"]
    )
    assert args.allowed_host == ["deck.lab"] and args.trust_loopback is False
    d = Daemon(
        None,
        demo=True,
        bind="127.0.0.1",
        port=0,
        publish_token="tok",
        allowed_hosts=args.allowed_host,
        trust_loopback=args.trust_loopback,
    )

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            post = lambda host, token=None: trio.to_thread.run_sync(_post, port, host, token)
            assert await post("localhost") == 401  # loopback is not enough behind a proxy
            assert await post("deck.lab", "tok") == 200  # the proxy's name, with the token
            assert await post("evil.example", "tok") == 403  # rebinding: even with a token
            assert await post(f"127.0.0.1:{port}", "tok") == 200
            n.cancel_scope.cancel()

    trio.run(main)


def test_no_trust_loopback_without_a_token_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        daemon_mod.main(["--demo", "--no-trust-loopback"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "edge-daemon: --no-trust-loopback leaves nobody able to publish: give --publish-token too "
        "(see edge-daemon --help)\n"
    )


# --- item 2: a reload that fails in any way keeps the old set -----------------------------------


def test_any_failed_reload_keeps_the_old_set_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mdir = build_models_dir(tmp_path / "models")
    d = Daemon(mdir, bind="127.0.0.1", port=0, modelset=load_models(mdir))
    first = d.engine
    sums = mdir / "SHA256SUMS"
    good = sums.read_bytes()

    async def hup_and_wait(failures: int) -> dict:
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(10):
            while d.reload_failures.value(reason=reason) < failures:
                await trio.sleep(0.02)
        return await trio.to_thread.run_sync(_get, port, "/healthz")

    async def main() -> None:
        nonlocal port, reason
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            # SHA256SUMS replaced by a directory
            sums.unlink()
            sums.mkdir()
            reason = "IsADirectoryError"
            health = await hup_and_wait(1)
            assert "SHA256SUMS" in health["reload_error"] and "Is a directory" in health["reload_error"]
            assert d.engine is first and health["models"]["models"] and health["ok"]
            sums.rmdir()
            sums.write_bytes(good)
            # files copied with mode 600 under the unit's DynamicUser: EACCES on read. These tests
            # run as root, for whom mode bits do not deny reads, so the read itself is made to fail.
            real_open = open

            def no_read(path, *a, **kw):  # type: ignore[no-untyped-def]
                if str(path).endswith(".onnx"):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(path, *a, **kw)

            monkeypatch.setattr("builtins.open", no_read)
            reason = "PermissionError"
            health = await hup_and_wait(1)
            monkeypatch.undo()
            assert "Permission denied" in health["reload_error"] and ".onnx" in health["reload_error"]
            assert d.engine is first
            # a broken manifest (startup_events on a set that loaded) is a failure too, not a crash
            reason = "RuntimeError"

            def boom(ms):  # type: ignore[no-untyped-def]
                raise RuntimeError("manifest has no threat models")

            monkeypatch.setattr(daemon_mod, "startup_events", boom)
            health = await hup_and_wait(1)
            monkeypatch.undo()
            assert "RuntimeError: manifest has no threat models" in health["reload_error"]
            assert d.engine is first
            # and once the directory is good again, the next SIGHUP loads it
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while d.reloads == 0:
                    await trio.sleep(0.02)
            assert d.reload_error is None and d.engine is not first
            metrics = await trio.to_thread.run_sync(_text, port, "/metrics")
            assert 'phasewatch_reload_failures_total{reason="IsADirectoryError"} 1' in metrics
            n.cancel_scope.cancel()

    port, reason = 0, ""
    trio.run(main)


def _text(port: int, path: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    body = c.getresponse().read().decode()
    c.close()
    return body


# --- item 7: edge-daemon's refusals are one line with the fix -------------------------------------


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--models", "{tmp}/nope"], "--models {tmp}/nope: no such directory; point it at the directory"),
        (["--models", "{tmp}/file"], "--models {tmp}/file: not a directory; point it at the directory"),
        (
            ["--demo", "--store", "{tmp}/nope"],
            "--store {tmp}/nope: no such directory; point it at the receiver",
        ),
        (["--demo", "--replay", "{tmp}/file"], "--replay {tmp}/file: not a directory"),
        (["--demo", "--live", "{tmp}/nope"], "--live {tmp}/nope: no such directory; point it at the live"),
        (["--models", "{tmp}/empty"], "refusing to start: {tmp}/empty/SHA256SUMS: missing"),
    ],
)
def test_edge_daemon_refusals_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expect: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    rc = daemon_mod.main([a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    line = _one_line(capsys)
    assert line.startswith("edge-daemon: ") and expect.format(tmp=tmp_path) in line, line


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (
            ["--demo", "--port", "eighty"],
            "argument --port: invalid int value: 'eighty' (see edge-daemon --help)",
        ),
        (["--demo", "--bogus"], "unrecognized arguments: --bogus (see edge-daemon --help)"),
        (
            [],
            "--models DIR is required (or --demo for demo events, --fleet URL for a fleet deck)"
            " (see edge-daemon --help)",
        ),
    ],
)
def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], expect: str) -> None:
    with pytest.raises(SystemExit) as info:
        daemon_mod.main(argv)
    assert info.value.code == 2
    assert _one_line(capsys) == f"edge-daemon: {expect}"


def test_unreadable_store_and_busy_port_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    real_scandir = os.scandir

    def denied(path):  # type: ignore[no-untyped-def]
        if Path(path) == store:  # root reads mode-000 directories: make the listing itself fail
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert daemon_mod.main(["--demo", "--store", str(store)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"edge-daemon: --store {store}: not readable by this user (uid ")
    assert "fix its permissions" in line
    monkeypatch.undo()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert daemon_mod.main(["--demo", "--bind", "127.0.0.1", "--port", str(port)]) == 1
        line = _one_line(capsys)
        assert line == (
            f"edge-daemon: 127.0.0.1:{port}: Address already in use; "
            "stop the other server or pick another --port"
        )
        with pytest.raises(OSError):  # --debug: the real exception, traceback and all
            daemon_mod.main(["--demo", "--bind", "127.0.0.1", "--port", str(port), "--debug"])


# --- item 6: windows that cannot be scored are counted and shown, not dropped ---------------------


def test_windows_without_qmp_are_counted_and_sent_as_unscored_cells(tmp_path: Path) -> None:
    """qmp appears 30 s into a 60 s episode: the early windows cannot be scored by either
    threat model (both need qmp). They reach the deck as prediction-less cells saying why,
    and are counted by reason in /metrics and /healthz; the later windows are scored."""
    import trio_websocket
    from archive_kit import STARTED_NS, episode_members

    from edge.tail import TailConfig

    mdir = build_models_dir(tmp_path / "models")
    live = tmp_path / "live"
    d = live / "host-a" / "ep-late"
    d.mkdir(parents=True)
    members = episode_members("ep-late", "host-a", duration_s=60, seed=4)
    late = 30 * 10**9
    qmp = [
        ln
        for ln in members["telemetry-qmp.jsonl"].splitlines(keepends=True)
        if json.loads(ln)["t_wall_ns"] >= STARTED_NS + late
    ]
    members["telemetry-qmp.jsonl"] = b"".join(qmp)
    daemon = Daemon(
        mdir, live=[live], bind="127.0.0.1", port=0, modelset=load_models(mdir), tail=TailConfig(idle_s=30)
    )
    preds: list[dict] = []

    async def main() -> None:
        nonlocal health, metrics
        async with trio.open_nursery() as n:
            listeners = await n.start(daemon.run)
            port = listeners[0].socket.getsockname()[1]
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                for name, data in members.items():
                    if name != "done.marker":
                        (d / name).write_bytes(data)
                (d / "done.marker").touch()
                with trio.fail_after(30):
                    while not any(p.get("predicted") and p["window_no"] >= 5 for p in preds):
                        ev = json.loads(await ws.get_message())
                        if ev["type"] == "prediction":
                            preds.append(ev)
            health = await trio.to_thread.run_sync(_get, port, "/healthz")
            metrics = await trio.to_thread.run_sync(_text, port, "/metrics")
            n.cancel_scope.cancel()

    health: dict = {}
    metrics = ""
    trio.run(main)
    unscored = [p for p in preds if "unscored" in p]
    assert unscored and unscored[0]["window_no"] == 0
    assert all(p.get("predicted") is None and p["model"] == "gru-realistic" for p in unscored)
    assert {p["unscored"] for p in unscored} <= {"no qmp", "sparse qmp"} and "no qmp" in {
        p["unscored"] for p in unscored
    }
    scored = [p for p in preds if p.get("predicted")]
    assert scored and min(p["window_no"] for p in scored) > max(p["window_no"] for p in unscored)
    n_no = health["windows_unscored"]["realistic/no_qmp"]
    assert n_no == sum(p["unscored"] == "no qmp" for p in unscored)
    assert health["windows_unscored"]["oracle/no_qmp"] == n_no  # counted for each threat model
    assert f'phasewatch_windows_unscored_total{{threat_model="realistic",reason="no_qmp"}} {n_no}' in metrics
