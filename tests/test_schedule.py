"""Deferred reads with inotify (edge.schedule): files appended to every tick are read a few
times a second, yet each window is cut on the tick its last row is on disk."""

from __future__ import annotations

import select
from pathlib import Path

import pytest
from archive_kit import STARTED_NS
from test_tail import LiveWriter

from edge.follow import TailCounters
from edge.livetree import LiveTailer
from edge.schedule import ReadSchedule
from edge.tail import TailConfig

OFFSET_S = 1000.0  # the tailer's clock is not the collector's


def _run(
    root: Path,
    defer_s: float,
    seconds: float = 22.0,
    counters: TailCounters | None = None,
    as_daemon: bool = False,
) -> tuple[int, int, dict[int, float]]:
    """Ticks of 20 ms; ``as_daemon``: a tick polls only when ``LiveTailer.wait`` would have
    woken (an inotify event, an episode's timer, or its ``path_check_s`` cap), with no safety
    pass to paper over a missed wake-up."""
    w = LiveWriter(root, sources=("proc", "qmp", "netflow"))
    cfg = TailConfig(backend="inotify", idle_s=1e9, defer_s=defer_s, safety_s=1e9 if as_daemon else 5.0)
    tailer = LiveTailer([root], cfg, counters)
    ticks = reads = 0
    ready: dict[int, float] = {}
    t = last_poll = 0.0
    while t < seconds:
        t = round(t + 0.02, 2)
        w.write_until(STARTED_NS + int(t * 1e9))
        if as_daemon and tailer.episodes:
            due = min(ep.due for ep in tailer.episodes.values()) - OFFSET_S
            event = bool(select.select([tailer.fileno()], [], [], 0)[0])
            if not (event or t >= due - 1e-9 or t - last_poll >= cfg.path_check_s - 1e-9):
                continue  # LiveTailer.wait would still be asleep
        last_poll = t
        lines = tailer.counters.lines
        for j in tailer.poll(t + OFFSET_S).jobs:
            ready[j.w] = j.ready_at - OFFSET_S
        ticks += 1
        reads += tailer.counters.lines != lines
    tailer.poll(t + OFFSET_S + defer_s + 0.1)  # past the cap: whatever is still unread comes in
    tailer.close()
    return ticks, reads, ready


def test_deferred_reads_cut_windows_on_time_with_a_fraction_of_the_reads(tmp_path: Path) -> None:
    ticks, eager_reads, eager = _run(tmp_path / "eager", 0.0)
    _, reads, deferred = _run(tmp_path / "deferred", 1.0)
    # window w's last row on disk: qmp's (1 Hz) at 10 + 5w s, after proc's 9.9 + 5w s
    assert sorted(deferred) == sorted(eager) == list(range(3))
    for w, at in deferred.items():
        assert 10 + 5 * w <= at + 1e-9 <= 10 + 5 * w + 0.04, (w, at)  # within two ticks
        assert at <= eager[w] + 0.02
    assert eager_reads >= 0.19 * ticks  # every 10 Hz row is read on the tick it came (every 5th)
    assert reads < 0.4 * eager_reads, (reads, eager_reads)  # deferred: well under half as many reads


def test_between_windows_an_episode_hears_no_writes_yet_misses_no_row(tmp_path: Path) -> None:
    """Deferred reads stop inotify reporting an episode's writes until its next window is due
    (EpisodeTail.quiet_until): a fraction of the events, every window on the same tick."""
    eager, quiet = TailCounters(), TailCounters()
    _, _, at_once = _run(tmp_path / "eager", 0.0, counters=eager, as_daemon=True)
    _, _, deferred = _run(tmp_path / "quiet", 1.0, counters=quiet, as_daemon=True)
    assert eager.quiet_spells == 0 and quiet.quiet_spells >= 3  # once a window at least
    assert quiet.inotify_events < 0.5 * eager.inotify_events, (quiet.inotify_events, eager.inotify_events)
    assert sorted(deferred) == sorted(at_once) == list(range(3))
    for w, t in deferred.items():
        assert 10 + 5 * w <= t + 1e-9 <= 10 + 5 * w + 0.02 + 1e-6, (w, t)  # on the next tick, every window
    assert quiet.lines == eager.lines  # every row read, though no write was heard between windows


def test_schedule_reads_lagging_streams_first_and_everything_at_the_cap() -> None:
    s = ReadSchedule(["a", "b"], defer_s=10.0)
    assert sorted(s.to_read(0.0, lambda m, t: False)) == ["a", "b"]  # timing unknown: all
    s.done(["a", "b"], 0.0, everything=True)
    s.update(0.0, 0, 5 * 10**9, True, 9_900_000_000)  # rows to 5 s read at 0.0: next step at 4.9
    assert s.eta == pytest.approx(4.9) and s.due() is None
    assert s.note(["a", "b"], 1.0) is False and s.note(["done.marker"], 1.0) is True
    assert s.to_read(1.0, lambda m, t: False) == [] and s.due() == pytest.approx(4.9)
    assert s.to_read(4.95, lambda m, t: m == "a") == ["b"]  # only the stream the window waits for
    assert sorted(s.to_read(10.0, lambda m, t: True)) == ["a", "b"]  # the cap: all
    # a clock step of over a minute is taken at once; a small rise creeps
    s.update(5.0, 0, 5 * 10**9, True, 9_900_000_000)
    assert s.offset == pytest.approx(-5.0 + 0.02)  # the offset was 0 - 5 s of rows
    s.update(500.0, 0, 5 * 10**9, True, 9_900_000_000)
    assert s.offset == pytest.approx(495.0)
