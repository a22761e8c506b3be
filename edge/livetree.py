"""The live tree: every episode directory under the ``<live>`` roots, found, followed and let go.

``LiveTailer.poll(now)`` drains what ``edge.watch`` saw change (inotify, or "everything may
have" when stat polling), lists the roots and hosts when they changed, starts an
``edge.tail.EpisodeTail`` per new episode directory and looks at the episodes that were named
or whose timer is due; between windows it stops an episode hearing its writes (``_hush``).
Synchronous and clock-agnostic, as ``edge.tail`` is.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from edge.follow import FD_ERRNOS, FdPressure, TailCounters
from edge.tail import EpisodeTail, TailConfig, WindowJob
from edge.watch import Changes, PollWatch, Watch, open_watch
from schema.reader import Problem
from schema.rows import Label
from schema.vocab import DONE_MEMBER, LABELS_MEMBER, SOURCE_MEMBER

log = logging.getLogger("edge.tail")

# What inotify's safety pass treats as changed in every episode: the directory (gone?), its
# done.marker and every followed file (then read when the next window needs them).
_SWEEP: Final = frozenset({"", DONE_MEMBER, LABELS_MEMBER, *SOURCE_MEMBER.values()})


@dataclass
class TailBatch:
    jobs: list[WindowJob] = field(default_factory=list)
    labels: list[tuple[EpisodeTail, Label]] = field(default_factory=list)
    problems: list[tuple[EpisodeTail, Problem]] = field(default_factory=list)
    started: list[EpisodeTail] = field(default_factory=list)
    finished: list[EpisodeTail] = field(default_factory=list)


class LiveTailer:
    """All live episodes under one or more ``<live>`` roots."""

    def __init__(
        self,
        roots: list[Path],
        cfg: TailConfig | None = None,
        counters: TailCounters | None = None,
        watch: Watch | None = None,
    ) -> None:
        self.roots = list(roots)
        self.cfg = cfg if cfg is not None else TailConfig()
        self.counters = counters or TailCounters()
        self.pressure = FdPressure(self.counters)
        self.watch: Watch = watch if watch is not None else open_watch(self.cfg.backend)
        self._last_full = -1e18
        self.episodes: dict[tuple[str, str], EpisodeTail] = {}
        self._done: set[Path] = set()  # finished episode dirs: never reopened
        self._mtimes: dict[Path, int] = {}
        self._last_scan = -1e18
        self._first_scan = True

    def add_root(self, root: Path) -> None:
        self.roots.append(root)
        self._last_scan = -1e18  # list the new root on the next pass

    @property
    def backend(self) -> str:
        return "poll" if self.watch.fileno() is None else "inotify"

    def fileno(self) -> int | None:
        """The inotify descriptor to wait on (``trio.lowlevel.wait_readable``); None when polling."""
        return self.watch.fileno()

    async def wait(self, tick_s: float) -> None:
        """Until the next pass is due: one tick (so a burst of writes is read in one pass),
        then, with inotify, until something changes or the timers (grace, idle) need a look."""
        await trio.sleep(tick_s)
        fd = self.fileno()
        if fd is None:
            return
        # Quiet episodes send no events before their windows are due: their timers wake us.
        now = trio.current_time()
        due = min((ep.due for ep in self.episodes.values()), default=now + self.cfg.path_check_s)
        with trio.move_on_after(max(min(self.cfg.path_check_s - tick_s, due - now), 0.0)):
            await trio.lowlevel.wait_readable(fd)

    def poll(self, now: float) -> TailBatch:
        batch = TailBatch()
        ch = self.watch.drain()
        self.counters.inotify_events += ch.events
        full = ch.everything or now - self._last_full >= self.cfg.safety_s
        if full:
            self._last_full = now
        listed = bool(ch.listed & ({*self.roots} | set(self._mtimes)))
        if (full or listed) and now - self._last_scan >= (0.0 if listed else self.cfg.scan_s):
            self._last_scan = now
            self._scan(now, batch)
        everything = isinstance(self.watch, PollWatch)
        named = {} if everything else self._named(ch)
        if everything or full:
            todo = list(self.episodes.items())
        else:  # only episodes inotify named or whose timer is due (a quiet one's included)
            hit = {(p.parent.name, p.name) for p in named}
            todo = [
                (k, ep) for k, ep in self.episodes.items() if ep.due <= now or (k in hit and ep.path in named)
            ]
        for key, ep in todo:
            if ep.quiet_end is not None and now >= ep.quiet_end:
                self._hear(ep)  # before anything is read: no write from here on goes unreported
            if everything:
                up = ep.poll(now)  # stat everything: the polling backend
            elif full:  # inotify's safety net: every file as if named (read on the usual schedule)
                up = ep.poll(now, named.get(ep.path, set()) | _SWEEP)
            else:
                names = named.get(ep.path)
                if now < ep.due and (names is None or not ep.note(names, now)):
                    continue  # nothing a window needs yet, no timer due: named files are read later
                up = ep.poll(now, names or set())
            batch.jobs.extend(up.jobs)
            batch.labels.extend((ep, lab) for lab in up.labels)
            batch.problems.extend((ep, p) for p in up.problems)
            if up.finished:
                batch.finished.append(ep)
                self._done.add(ep.path)
                self.watch.forget(ep.path)
                del self.episodes[key]
            elif not everything:
                self._hush(ep, now)
        return batch

    def _hush(self, ep: EpisodeTail, now: float) -> None:
        """After a look: stop hearing the episode's writes until its next window is due, or
        hear them again now if it needs them."""
        end = ep.quiet_until(now)
        if end is None:
            if ep.quiet_end is not None:
                self._hear(ep)
            return
        ep.schedule.presume_all()  # what inotify will not say is taken as written
        if ep.quiet_end is None:
            self.watch.quiet(ep.path, True)
            self.counters.quiet_spells += 1
        ep.quiet_end = end
        # No event will wake the episode: its timer must (the read cap, then the window's time).
        if (read_at := ep.schedule.due()) is not None:
            ep.due = min(ep.due, read_at)

    def _hear(self, ep: EpisodeTail) -> None:
        self.watch.quiet(ep.path, False)
        ep.quiet_end = None

    def close(self) -> None:
        for ep in self.episodes.values():
            ep.close()
        self.episodes.clear()
        self.watch.close()

    def _named(self, ch: Changes) -> dict[Path, set[str]]:
        """Episode directory -> the names inotify reported in it ("" when it may be gone)."""
        named = dict(ch.names)
        for d in ch.listed:  # an episode directory (or its host) whose entries changed
            named[d] = named.get(d, set()) | {""}
        if ch.listed & set(self._mtimes):  # a host directory changed: its episodes check theirs
            for ep in self.episodes.values():
                if ep.path.parent in ch.listed:
                    named[ep.path] = named.get(ep.path, set()) | {""}
        return named

    def _changed(self, d: Path, now_ns: int) -> bool:
        """Re-list a directory only when its mtime moved (or moved very recently: coarse clocks)."""
        try:
            m = os.stat(d).st_mtime_ns
        except FileNotFoundError:
            self._mtimes.pop(d, None)
            return False
        old = self._mtimes.get(d)
        self._mtimes[d] = m
        return old != m or now_ns - m < 2_000_000_000

    def _scan(self, now: float, batch: TailBatch) -> None:
        now_ns = time.time_ns()
        for root in self.roots:
            self.watch.watch(root)
            if not self._changed(root, now_ns) and not self._first_scan:
                hosts = [Path(p) for p in self._mtimes if Path(p).parent == root]
            else:
                hosts = [Path(e.path) for e in self._scandir(root) if e.is_dir(follow_symlinks=False)]
            for host in hosts:
                self.watch.watch(host)
                if not self._changed(host, now_ns):
                    continue
                entries = [e for e in self._scandir(host) if e.is_dir(follow_symlinks=False)]
                # forget finished episodes whose directories are gone (bounded over months)
                present = {Path(e.path) for e in entries}
                self._done -= {p for p in self._done if p.parent == host and p not in present}
                for e in entries:
                    path = Path(e.path)
                    key = (host.name, e.name)
                    if path in self._done or key in self.episodes:
                        continue
                    if self._first_scan and (path / DONE_MEMBER).exists():
                        self._done.add(path)  # finished before we started: not live
                        continue
                    self.watch.watch(path)  # before its files are first read: no write is missed
                    ep = EpisodeTail(path, host.name, e.name, self.counters, self.cfg, now, self.pressure)
                    self.episodes[key] = ep
                    self.counters.episodes_started += 1
                    batch.started.append(ep)
                    log.info("following %s", path)
        self._first_scan = False

    def _scandir(self, d: Path) -> list[os.DirEntry[str]]:
        if not self.pressure.allowed():
            return []
        try:
            with os.scandir(d) as it:
                return sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            if e.errno in FD_ERRNOS:
                self.pressure.hit()  # listed again on a later scan
                return []
            raise
