"""What changed in the live tree since the last look: inotify, or "anything may have" (stat polling).

The tailer asks a :class:`Watch` once per tick. :class:`InotifyWatch` (Linux, through
``inotify_simple``) watches every root, host and episode *directory* (one watch per
directory, never per file) and reports which entries changed; its descriptor is what the
daemon waits on with ``trio.lowlevel.wait_readable``. :class:`PollWatch` knows nothing and
says so (``everything=True``): the tailer then stats as it always did. A queue overflow, a
directory that cannot be watched (watch limit, a file system without inotify events such
as NFS) or an unexpected error make the inotify watch report ``everything`` too, so polling
is the fallback at every level; the tailer also does a full stat pass every ``safety_s``.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

log = logging.getLogger("edge.tail")


@dataclass
class Changes:
    """Since the last drain: directories whose entry list changed, and changed names per directory."""

    everything: bool = False  # no detail: treat every known path as changed
    listed: set[Path] = field(default_factory=set)  # entries created, moved or deleted in these dirs
    names: dict[Path, set[str]] = field(default_factory=dict)  # dir -> names written/created/moved/deleted
    events: int = 0  # inotify events read


class Watch(Protocol):
    def fileno(self) -> int | None: ...
    def watch(self, directory: Path) -> None: ...
    def forget(self, directory: Path) -> None: ...
    def quiet(self, directory: Path, on: bool) -> None: ...
    def drain(self) -> Changes: ...
    def close(self) -> None: ...


class PollWatch:
    """No notifications: every tick may have changed everything (the stat-polling backend)."""

    name: Final = "poll"

    def fileno(self) -> int | None:
        return None

    def watch(self, directory: Path) -> None:
        pass

    def forget(self, directory: Path) -> None:
        pass

    def quiet(self, directory: Path, on: bool) -> None:
        pass

    def drain(self) -> Changes:
        return Changes(everything=True)

    def close(self) -> None:
        pass


class InotifyWatch:
    """Directory watches through ``inotify_simple``; non-blocking reads."""

    name: Final = "inotify"

    def __init__(self) -> None:
        import inotify_simple  # Linux only: declared with a platform marker

        self._lib: Any = inotify_simple
        self._fl: Any = inotify_simple.flags
        self._ino: Any = inotify_simple.INotify(nonblocking=True)
        self._mask = (
            self._fl.CREATE
            | self._fl.MOVED_TO
            | self._fl.MOVED_FROM
            | self._fl.DELETE
            | self._fl.MODIFY
            | self._fl.CLOSE_WRITE
            | self._fl.ATTRIB
            | self._fl.DELETE_SELF
            | self._fl.MOVE_SELF
            | self._fl.ONLYDIR
        )
        self._listing = self._fl.CREATE | self._fl.MOVED_TO | self._fl.MOVED_FROM | self._fl.DELETE
        # What a quiet directory no longer reports: writes to its files (the tailer then reads
        # them on its own schedule); entries created, moved or deleted still come.
        self._writes = self._fl.MODIFY | self._fl.CLOSE_WRITE
        self._wd: dict[int, Path] = {}
        self._path: dict[Path, int] = {}
        self._failed = False  # a directory we could not watch: report everything
        self._replaced: set[Path] = set()  # parents of directories found replaced: listed next drain

    def fileno(self) -> int | None:
        return int(self._ino.fileno())

    def watch(self, directory: Path) -> None:
        if directory in self._path:
            return
        try:
            wd = self._ino.add_watch(os.fsencode(directory), self._mask)
        except FileNotFoundError:
            return
        except OSError as e:  # ENOSPC: the watch limit; others: a file system without events
            if e.errno != errno.ENOTDIR:
                log.warning("%s: not watched (%s); stat polling covers it", directory, e)
                self._failed = True
            return
        self._wd[wd] = directory
        self._path[directory] = wd

    def forget(self, directory: Path) -> None:
        wd = self._path.pop(directory, None)
        if wd is None:
            return
        self._wd.pop(wd, None)
        try:
            self._ino.rm_watch(wd)
        except OSError:  # already gone with its directory
            pass

    def quiet(self, directory: Path, on: bool) -> None:
        """Stop (``on``) or resume reporting writes to the files in a watched ``directory``.

        At 10 Hz per stream, writes are nearly all of inotify's events, and an episode whose
        next window is seconds away has no use for them (``EpisodeTail.quiet_until``). The
        same ``inotify_add_watch`` replaces the mask of the watch in place."""
        wd = self._path.get(directory)
        if wd is None:
            return
        try:
            new = self._ino.add_watch(
                os.fsencode(directory), self._mask & ~self._writes if on else self._mask
            )
        except OSError:  # gone, or no longer a directory: its IGNORED event says so
            return
        if new != wd:  # another directory now has this path: hear all of it, and say so
            self._wd.pop(wd, None)
            try:
                self._ino.rm_watch(wd)
            except OSError:  # the old directory is gone with its watch
                pass
            if on:
                self._ino.add_watch(os.fsencode(directory), self._mask)
            self._wd[new] = directory
            self._path[directory] = new
            self._replaced.add(directory.parent)

    def drain(self) -> Changes:
        ch = Changes(everything=self._failed, listed=self._replaced)
        self._failed = False
        self._replaced = set()
        try:
            events = self._ino.read(timeout=0)
        except BlockingIOError:
            return ch
        except OSError as e:
            log.warning("inotify read failed (%s); polling this tick", e)
            return Changes(everything=True)
        ch.events = len(events)
        for ev in events:
            if ev.mask & self._fl.Q_OVERFLOW:
                ch.everything = True
                continue
            d = self._wd.get(ev.wd)
            if d is None:
                continue
            if ev.mask & self._fl.IGNORED:  # the directory went away
                self._wd.pop(ev.wd, None)
                self._path.pop(d, None)
                ch.listed.add(d.parent)
                continue
            if ev.mask & (self._fl.DELETE_SELF | self._fl.MOVE_SELF):
                ch.listed.add(d.parent)
                continue
            if ev.mask & self._listing:
                ch.listed.add(d)
            if ev.name:
                ch.names.setdefault(d, set()).add(ev.name)
        return ch

    def close(self) -> None:
        self._ino.close()


def open_watch(backend: str) -> PollWatch | InotifyWatch:
    """``inotify``, ``poll`` or ``auto`` (inotify where it works, else polling)."""
    if backend == "poll":
        return PollWatch()
    try:
        return InotifyWatch()
    except (ImportError, OSError) as e:
        if backend == "inotify":
            raise
        log.info("inotify unavailable (%s): stat polling", e)
        return PollWatch()
