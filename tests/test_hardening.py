"""The daemon under faults (issue 14; docs/FAULTS.md lists what each test covers): real files,
real ONNX Runtime, real sockets."""

from __future__ import annotations

import http.client
import json

import pytest
import trio

from edge import daemon as daemon_mod
from edge.daemon import Daemon

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
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--no-trust-loopback leaves nobody able to publish: give --publish-token too")
