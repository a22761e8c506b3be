"""Follow one append-only file by path across truncation, rotation and deletion.

A followed file keeps an open descriptor, its offset, the bytes of a partial last line and
the last bytes it read (to notice a truncate-and-rewrite that grew past the old offset
between two ticks). Because the descriptor stays open, a rotated file (renamed to
``<member>.1``) or a deleted one is read to its end through it before the new file is
followed from offset 0. An idle file can be *parked* (descriptor closed, place kept) and
resumes when its path changes; a parked file rotated meanwhile is finished through ``.1``.

Descriptors are a bounded resource: an open refused with EMFILE/ENFILE (trio's
``ACCEPT_CAPACITY_ERRNOS``) is counted and backs every follower off for a while
(:class:`FdPressure`); the file is simply tried again later, nothing is raised.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final

try:
    import resource
except ImportError:  # not on this platform: no limit to read
    resource = None  # type: ignore[assignment]

log = logging.getLogger("edge.tail")

_SIG_BYTES = 64  # how much of what was read last is compared to spot a rewrite
# What running out of descriptors looks like (trio: ACCEPT_CAPACITY_ERRNOS).
FD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class TailCounters:
    """Everything the tailer survived, by kind; exported as ``phasewatch_tail_<name>_total``."""

    lines: int = 0
    bytes: int = 0
    parse_errors: int = 0
    oversized_lines: int = 0
    truncations: int = 0
    rotations: int = 0
    deletions: int = 0
    late_files: int = 0
    clock_steps: int = 0  # rows whose t_wall_ns went backwards (the extractor drops them)
    rows_overflowed: int = 0  # rows dropped because a stream ran too far ahead of the windows
    meta_errors: int = 0
    episodes_started: int = 0
    episodes_finished: int = 0
    windows_ready: int = 0
    windows_forced: int = 0  # extracted after the grace period without every stream caught up
    windows_backlog_skipped: int = 0
    fd_exhausted: int = 0  # opens refused for want of descriptors (EMFILE/ENFILE): backed off, retried
    files_parked: int = 0  # idle files closed (reopened when they change)
    watch_errors: int = 0  # directories inotify could not watch (stat polling covers them)
    quiet_spells: int = 0  # times an episode stopped hearing its writes until its next window (inotify)
    inotify_events: int = 0  # events read from inotify (writes while an episode is not quiet, entries)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class FdPressure:
    """Shared back-off after EMFILE/ENFILE: no open is tried for a while, doubling from
    10 ms up to 1 s while refusals continue; one successful open resets it."""

    MIN_S: Final = 0.01
    MAX_S: Final = 1.0
    RETRY_S: Final = 0.05  # how soon a follower that was refused a descriptor asks again

    def __init__(self, counters: TailCounters, clock: Callable[[], float] = time.monotonic) -> None:
        self.counters = counters
        self._clock = clock
        self._until = 0.0
        self._backoff = self.MIN_S
        # Followers keep this many descriptors at most, so that the rest of the process (the
        # server's sockets, model files) never finds none left: a quarter of the soft limit.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else 1024
        self.budget = max(8, (soft if soft > 0 else 1 << 16) * 3 // 4)
        self.open = 0

    def allowed(self) -> bool:
        if self.open >= self.budget:
            self.counters.fd_exhausted += 1
            return False
        return self._until == 0.0 or self._clock() >= self._until

    def hit(self) -> None:
        self.counters.fd_exhausted += 1
        self._until = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self.MAX_S)

    def ok(self) -> None:
        self._until = 0.0
        self._backoff = self.MIN_S


# --- one file -------------------------------------------------------------------------


class FileFollower:
    """Follows one append-only file by path across truncation, rotation and deletion.

    ``poll()`` returns complete lines only, as ``(first_line_no, data)`` chunks whose data
    ends in a newline; line numbers count from 1 in each generation of the file (a new
    file after rotation or a truncation starts again at 1).
    """

    def __init__(
        self,
        path: Path,
        counters: TailCounters,
        *,
        max_line_bytes: int = 1 << 20,
        read_chunk: int = 1 << 20,
        seen_at_start: bool = True,
        pressure: FdPressure | None = None,
    ) -> None:
        self.path = path
        self.counters = counters
        self.pressure = pressure or FdPressure(counters)
        self.max_line_bytes = max_line_bytes
        self.read_chunk = read_chunk
        self._fd: int | None = None
        self._dev_ino: tuple[int, int] | None = None
        self._followed: deque[tuple[int, int]] = deque(maxlen=8)  # generations already read
        self.offset = 0
        self._partial = bytearray()
        self._sig = b""
        self._skip_to_newline = False
        self._line_no = 0
        # A file missing when the episode was first seen that shows up later is "late".
        self._expect_late = not seen_at_start
        self.last_growth = False
        self.refused = False  # the last open was refused for want of descriptors: retry
        self.behind = False  # a read stopped at read_chunk: more is there without a new event

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.pressure.open -= 1

    def park(self) -> None:
        """Close an idle file but keep its place (inode, offset, partial line): the next
        ``poll`` that checks the path resumes it, or finishes the old generation first."""
        if self._fd is not None:
            self.close()
            self.counters.files_parked += 1

    def poll(self, check_path: bool, *, final: bool = False) -> list[tuple[int, bytes]]:
        """New complete lines; ``check_path`` also looks for rotation, deletion and a late file."""
        out: list[tuple[int, bytes]] = []
        self.last_growth = False
        if self._fd is None:
            if check_path or final:
                if self._dev_ino is not None:
                    self._check_parked(out, final)
                else:
                    self._open_current(out, final)
            return out
        self._drain(out, final)
        if check_path or final:
            try:
                st = os.stat(self.path)
                now = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                now = None
            if now != self._dev_ino:
                self._retire(out, now)
                if now is not None:
                    self._open_current(out, final)
        return out

    # -- internals --

    def _open_current(self, out: list[tuple[int, bytes]], final: bool) -> None:
        fd = self._open(self.path)
        if fd is None:
            return
        st = os.fstat(fd)
        now = (st.st_dev, st.st_ino)
        if self._dev_ino is not None:  # parked: the same file resumes, another one follows ours
            if now == self._dev_ino:
                self._fd = fd
                self._drain(out, final)
                return
            self._finish_parked(out, now)
        if self._expect_late:
            self.counters.late_files += 1
            self._expect_late = False
        self._fd, self._dev_ino = fd, now
        self._followed.append(self._dev_ino)
        self._reset_generation()
        self._drain(out, final)

    def _open(self, path: Path) -> int | None:
        """A descriptor, or None: missing (late), unreadable (logged) or no descriptor left
        (counted; the pressure backs every follower off, as trio's accept loop does)."""
        if not self.pressure.allowed():
            self.refused = True
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if path == self.path:
                self._expect_late = True
            return None
        except OSError as e:
            if e.errno in FD_ERRNOS:
                self.pressure.hit()
                self.refused = True
                return None
            if e.errno in (errno.EACCES, errno.EISDIR):
                log.warning("%s: cannot follow: %s", path, e)
                return None
            raise
        self.pressure.ok()
        self.pressure.open += 1
        self.refused = False
        return fd

    def _finish_parked(self, out: list[tuple[int, bytes]], now: tuple[int, int] | None) -> None:
        """Our parked file is no longer at the path: read it to its end through ``.1`` when it
        was rotated there, then retire it as an open one would be."""
        rotated = self.path.with_name(self.path.name + ".1")
        try:
            st = os.stat(rotated)
            if (st.st_dev, st.st_ino) == self._dev_ino:
                self._fd = self._open(rotated)
        except FileNotFoundError:
            pass
        if self._fd is None:  # deleted while parked: nothing left to read
            if self._partial:
                self.counters.parse_errors += 1
            self.counters.deletions += 1
            self._dev_ino = None
            self._reset_generation()
            return
        self._retire(out, now)

    def _check_parked(self, out: list[tuple[int, bytes]], final: bool) -> None:
        """A parked file is reopened only when the path shows a change (size, inode)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._finish_parked(out, None)
            return
        if (st.st_dev, st.st_ino) == self._dev_ino and st.st_size == self.offset and not final:
            return
        self._open_current(out, final)

    def _reset_generation(self) -> None:
        self.offset = 0
        self._partial.clear()
        self._sig = b""
        self._skip_to_newline = False
        self._line_no = 0

    def _retire(self, out: list[tuple[int, bytes]], now: tuple[int, int] | None) -> None:
        """The path no longer names our file: finish it through the open descriptor."""
        old = self._dev_ino
        self._drain(out, final=True)
        if self._partial:  # a last line that never got its newline is lost, and counted
            self.counters.parse_errors += 1
        self.close()
        rotated = self.path.with_name(self.path.name + ".1")
        try:
            st1 = os.stat(rotated)
            r = (st1.st_dev, st1.st_ino)
        except FileNotFoundError:
            r = None
        if r == old:
            self.counters.rotations += 1
        elif r is not None and r != now and now is not None and r not in self._followed:
            # Rotated twice between two checks: the middle generation now sits at .1.
            self.counters.rotations += 2
            mid = FileFollower(
                rotated, self.counters, max_line_bytes=self.max_line_bytes, pressure=self.pressure
            )
            mid._open_current(out, final=True)
            mid._retire_quietly(out)
        else:  # deleted, or replaced by a new file (a stale .1 is one we read already)
            self.counters.deletions += 1
        self._dev_ino = None
        self._reset_generation()

    def _retire_quietly(self, out: list[tuple[int, bytes]]) -> None:
        self._drain(out, final=True)
        self.close()

    def _drain(self, out: list[tuple[int, bytes]], final: bool) -> None:
        self.behind = False
        while self._fd is not None:
            size = os.fstat(self._fd).st_size
            if size < self.offset:
                self._truncated()
            if size == self.offset:
                return
            # Re-read the last bytes we consumed: if they changed, the file was rewritten.
            back = len(self._sig)
            want = min(size - self.offset, self.read_chunk)
            data = os.pread(self._fd, want + back, self.offset - back)
            if back and data[:back] != self._sig:
                self._truncated()
                continue
            data = data[back:]
            if not data:
                return
            self.offset += len(data)
            self._sig = (self._sig + data)[-_SIG_BYTES:]
            self.counters.bytes += len(data)
            self.last_growth = True
            self._split(data, out)
            if not final and want == self.read_chunk:
                self.behind = True
                return  # bounded work per tick; the rest comes next tick

    def _truncated(self) -> None:
        self.counters.truncations += 1
        self._reset_generation()

    def _split(self, data: bytes, out: list[tuple[int, bytes]]) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial += data
            if len(self._partial) > self.max_line_bytes:
                # A runaway line: drop it, and the rest of it up to its newline.
                self.counters.oversized_lines += 1
                self._partial.clear()
                self._skip_to_newline = True
            return
        if self._partial:
            chunk = bytes(self._partial) + data[: cut + 1]
            self._partial.clear()
        else:
            chunk = data[: cut + 1]
        self._partial += data[cut + 1 :]
        if self._skip_to_newline:
            nl = chunk.index(b"\n")
            chunk = chunk[nl + 1 :]
            self._line_no += 1
            self._skip_to_newline = False
        if len(self._partial) > self.max_line_bytes:
            self.counters.oversized_lines += 1
            self._partial.clear()
            self._skip_to_newline = True
        if chunk:
            n = chunk.count(b"\n")
            out.append((self._line_no + 1, chunk))
            self._line_no += n
            self.counters.lines += n
