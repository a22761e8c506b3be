"""Issue 14 item 5: ``--replay`` loops forever, and its private live directory stays small."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
import trio_websocket
from archive_kit import episode_members, write_archive
from test_infer import build_models_dir

from edge.daemon import Daemon
from edge.modelset import load_models
from edge.replay import replay_store


def _usage(d: Path) -> tuple[int, int]:
    """(bytes, files) under ``d``, tolerating files deleted while walking."""
    size = files = 0
    for root, _, names in os.walk(d):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
            files += 1
    return size, files


def test_replay_loop_keeps_disk_flat_while_windows_are_served(tmp_path: Path) -> None:
    models_dir = build_models_dir(tmp_path / "models")
    store = tmp_path / "store"
    for k in range(3):
        members = episode_members(f"ep-{k}", "host-r", duration_s=12, seed=10 + k)
        write_archive(store / "host-r" / f"ep-{k}.tar.zst", members)
    one_size, one_files = _usage(store)  # compressed: a lower bound on one round's replayed bytes
    d = Daemon(
        models_dir,
        replay=store,
        speed=400.0,
        replay_concurrency=3,
        bind="127.0.0.1",
        port=0,
        modelset=load_models(models_dir),
        state_dir=tmp_path,
    )
    rounds = 100  # 300 episodes
    samples: list[tuple[int, int]] = []
    preds: list[int] = []  # predictions received, sampled with the disk

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(d.run)
            port = listeners[0].socket.getsockname()[1]
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:

                async def read() -> None:
                    count = 0
                    while True:
                        if json.loads(await ws.get_message())["type"] == "prediction":
                            count += 1
                            preds.append(count)

                n.start_soon(read)
                with trio.fail_after(18):
                    while d.counters.episodes_finished < 3 * rounds:
                        await trio.sleep(0.05)
                        assert d.replay_dir is not None
                        samples.append(_usage(d.replay_dir))
                        preds.append(-len(samples))  # a marker: where this sample fell
                n.cancel_scope.cancel()

    trio.run(main)
    assert d.counters.episodes_finished >= 3 * rounds
    served = sum(1 for p in preds if p > 0)
    assert served >= 2 * rounds  # windows were scored all along (the last few may still be in flight)
    # windows keep coming in the last quarter of the run, not just at the start
    markers = [i for i, p in enumerate(preds) if p < 0]
    assert any(p > 0 for p in preds[markers[3 * len(markers) // 4] :])
    max_size = max(s for s, _ in samples)
    max_files = max(f for _, f in samples)
    # at most a few episodes at once (3 being written, a few waiting for the tailer), never 300
    assert max_files <= 12 * 7, (max_files, samples[-5:])
    assert max_size <= 40 * one_size, (max_size, one_size)
    final_size, final_files = samples[-1]
    _, first_files = max(samples[: max(1, len(samples) // 4)])
    assert final_files <= max(first_files, one_files) * 3 + 7 * 3
    print(
        f"replay disk: {len(samples)} samples, max {max_size} B / {max_files} files, "
        f"final {final_size} B / {final_files} files, {served} predictions, "
        f"{d.replay_retention.deleted} episodes deleted"
    )


def test_edge_replay_keeps_everything_unless_told(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for k in range(2):
        write_archive(store / "h" / f"e{k}.tar.zst", episode_members(f"e{k}", "h", duration_s=3, seed=k))

    from edge.replay import Retention  # imported here: the daemon test runs on any version

    def run(out: Path, retention: Retention | None, limit_rounds: int) -> None:
        async def main() -> None:
            with trio.move_on_after(limit_rounds):
                await replay_store(store, out, speed=200.0, loop=True, concurrency=1, retention=retention)

        trio.run(main)

    run(tmp_path / "all", Retention(tmp_path / "all"), 1)
    assert len(list((tmp_path / "all" / "h").iterdir())) > 4  # today's behaviour: every episode stays
    run(tmp_path / "two", Retention(tmp_path / "two", keep=2), 1)
    left = list((tmp_path / "two" / "h").iterdir())
    assert 1 <= len(left) <= 3  # the newest two finished, maybe one being written


@pytest.mark.parametrize("flag", [["--keep", "-1"]])
def test_edge_replay_refuses_a_negative_keep(tmp_path: Path, flag: list[str]) -> None:
    from edge.replay import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path / "out"), *flag])
    assert e.value.code == 2
