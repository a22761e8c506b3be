"""Follow live episode directories (SPEC section 3) and cut them into windows.

    <live>/<host_id>/<episode_id>/meta.json, labels.jsonl, telemetry-*.jsonl, netflow.jsonl, done.marker

Everything here is synchronous and clock-agnostic: the daemon calls ``LiveTailer.poll(now)``
from its trio loop every tick and passes ``trio.current_time()``; tests pass plain numbers.

Discovery is plain ``stat`` polling, chosen over inotify because it is portable, needs no
extra dependency on the Pi and copes with NFS/overlay mounts: the tree is listed once a
second, and a host directory is re-listed only when its mtime moved. Within a known episode
only the expected member files are touched: each open file costs one ``fstat`` per tick,
and the paths themselves (rotation, late files, ``done.marker``) are stat'ed every
``path_check_s``.

A followed file keeps an open descriptor, its offset, the bytes of a partial last line and
the last bytes it read (to notice a truncate-and-rewrite that grew past the old offset
between two ticks). Because the descriptor stays open, a rotated file (renamed to
``<member>.1``) or a deleted one is read to its end through it before the new file is
followed from offset 0.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import msgspec
import numpy as np

from schema.channels import LOOKBACK_NS, STEP_NS, STRIDE_STEPS
from schema.columns import ColumnBuilder, StreamColumns
from schema.extract import window_centre_ns, window_last_step_ns, window_start_ns
from schema.reader import MEMBER_SOURCE, Problem, ReasonCode, decode_labels, decode_meta, decode_rows
from schema.rows import EpisodeMeta, Label
from schema.vocab import DONE_MEMBER, LABELS_MEMBER, META_MEMBER, PHASES, SOURCE_MEMBER, SOURCES

log = logging.getLogger("edge.tail")

_SIG_BYTES = 64  # how much of what was read last is compared to spot a rewrite
_STRIDE_NS = STRIDE_STEPS * STEP_NS


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

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    ) -> None:
        self.path = path
        self.counters = counters
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

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def poll(self, check_path: bool, *, final: bool = False) -> list[tuple[int, bytes]]:
        """New complete lines; ``check_path`` also looks for rotation, deletion and a late file."""
        out: list[tuple[int, bytes]] = []
        self.last_growth = False
        if self._fd is None:
            if check_path or final:
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
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            self._expect_late = True
            return
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EISDIR):
                log.warning("%s: cannot follow: %s", self.path, e)
                return
            raise
        st = os.fstat(fd)
        if self._expect_late:
            self.counters.late_files += 1
            self._expect_late = False
        self._fd, self._dev_ino = fd, (st.st_dev, st.st_ino)
        self._followed.append(self._dev_ino)
        self._reset_generation()
        self._drain(out, final)

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
            mid = FileFollower(rotated, self.counters, max_line_bytes=self.max_line_bytes)
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


# --- one stream's rows ------------------------------------------------------------------


class ColumnBuffer(ColumnBuilder):
    """The rows of one stream that the next windows still need, in arrival order: the
    reader's :class:`~schema.columns.ColumnBuilder` (amortised O(1) appends, trims that move
    an index), bounded by ``max_rows``, remembering when rows last came."""

    def __init__(self, source: str, max_rows: int) -> None:
        super().__init__(source)
        self.max_rows = max_rows
        self.last_append = -1e18  # tailer clock of the last rows added

    def append_columns(self, cols: StreamColumns, now: float) -> tuple[int, int]:
        """Add decoded rows; returns (rows that stepped back in time, rows dropped for space)."""
        self.malformed += cols.malformed
        if not len(cols):
            return 0, 0
        self.last_append = now
        back, _ = self.append(cols.t_wall_ns, cols.t_mono_ns, cols.values)
        return back, self.keep_last(self.max_rows)

    def reaches(self, t_ns: int) -> bool:
        """A held row at or after ``t_ns`` (what ``window_complete`` asks of each stream)."""
        t = self.t_wall_ns
        return bool(t.size) and int(t.max()) >= t_ns


# --- one episode ------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowJob:
    """One window whose rows are all in: what the inference thread extracts and scores."""

    host: str
    episode_id: str
    w: int
    t0_ns: int
    streams: dict[str, StreamColumns]
    actual: str | None
    ready_at: float  # tailer clock when the window became ready (latency accounting)
    forced: bool = False


@dataclass
class EpisodeUpdate:
    jobs: list[WindowJob] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class TailConfig:
    grace_s: float = 3.0  # a stream that sent no rows for this long no longer holds a window back
    idle_s: float = 60.0  # no growth in any file for this long finalises an episode
    path_check_s: float = 0.5
    scan_s: float = 1.0
    backlog_windows: int = 12  # attaching mid-episode: only the latest windows are scored
    # Per stream: 150 rows cover a 10 Hz window plus its look-back; the slack is for catching
    # up on a backlog, where a 1 Hz stream read in one chunk runs far ahead of the others.
    max_rows: int = 8192
    max_line_bytes: int = 1 << 20
    read_chunk: int = 256 << 10  # per file per tick: a backlog is read over several ticks
    max_labels: int = 256


class EpisodeTail:
    """One live episode: its followers, its bounded row buffers, its labels and next window."""

    def __init__(
        self, path: Path, host: str, episode_id: str, counters: TailCounters, cfg: TailConfig, now: float
    ) -> None:
        self.path = path
        self.host = host
        self.episode_id = episode_id
        self.counters = counters
        self.cfg = cfg
        self.meta: EpisodeMeta | None = None
        self._meta_bad_since: float | None = None
        self.next_w = 0
        self.finished = False
        self.last_activity = now
        self._last_path_check = -1e18
        self.buffers = {s: ColumnBuffer(s, cfg.max_rows) for s in SOURCES}
        self.label_t: list[int] = []
        self.label_phase: list[str] = []
        self.followers: dict[str, FileFollower] = {}
        for m in (LABELS_MEMBER, *SOURCE_MEMBER.values()):
            p = path / m
            self.followers[m] = FileFollower(
                p,
                counters,
                max_line_bytes=cfg.max_line_bytes,
                read_chunk=cfg.read_chunk,
                seen_at_start=p.exists(),
            )
        self._member_source = MEMBER_SOURCE

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.episode_id)

    def close(self) -> None:
        for f in self.followers.values():
            f.close()

    def poll(self, now: float) -> EpisodeUpdate:
        up = EpisodeUpdate()
        if self.finished:
            return up
        check = now - self._last_path_check >= self.cfg.path_check_s
        if check:
            self._last_path_check = now
        done = check and (self.path / DONE_MEMBER).exists()
        if self.meta is None and (check or done):
            self._read_meta(now)
        grew = False
        for member, f in self.followers.items():
            for first, data in f.poll(check, final=done):
                self._ingest(member, first, data, up, now)
            grew |= f.last_growth
        if grew:
            self.last_activity = now
        idle = now - self.last_activity >= self.cfg.idle_s
        if check and not self.path.exists():
            idle = True  # the directory went away: nothing more will come
        final = done or idle
        self._windows(now, up, final)
        if final:
            self.finished = True
            up.finished = True
            self.counters.episodes_finished += 1
            self.close()
            log.info("%s/%s finished (%s)", self.host, self.episode_id, "done.marker" if done else "idle")
        return up

    def _read_meta(self, now: float) -> None:
        try:
            raw = (self.path / META_MEMBER).read_bytes()
            self.meta = decode_meta(raw)
        except FileNotFoundError:
            return
        except (msgspec.DecodeError, OSError) as e:
            # The collector may be mid-write: only a meta.json that stays bad is an error.
            if self._meta_bad_since is None:
                self._meta_bad_since = now
            elif now - self._meta_bad_since > 5.0 and self._meta_bad_since >= 0:
                self.counters.meta_errors += 1
                self._meta_bad_since = -1.0  # counted once
                log.warning("%s: %s", self.path / META_MEMBER, e)

    def _ingest(self, member: str, first: int, data: bytes, up: EpisodeUpdate, now: float) -> None:
        if member == LABELS_MEMBER:
            labels, problems = decode_labels(data, first)
            self.counters.parse_errors += len(problems)
            up.problems.extend(problems)
            one_to_one = not problems and len(labels) == data.count(b"\n")  # then label i is line first + i
            for i, lab in enumerate(labels):
                if lab.phase not in PHASES:
                    self.counters.parse_errors += 1
                    line = first + i if one_to_one else None
                    up.problems.append(Problem(ReasonCode.UNKNOWN_PHASE, member, line, "phase", lab.phase))
                    continue
                self._add_label(lab)
                up.labels.append(lab)
            return
        source = self._member_source[member]
        cols, problems = decode_rows(source, data, first, member)
        if problems:
            self.counters.parse_errors += len(problems)
            up.problems.extend(problems)
        back, over = self.buffers[source].append_columns(cols, now)
        self.counters.clock_steps += back
        self.counters.rows_overflowed += over

    def _add_label(self, lab: Label) -> None:
        # Labels arrive in order; a late one is inserted where it belongs.
        i = len(self.label_t)
        while i and self.label_t[i - 1] > lab.t_wall_ns:
            i -= 1
        self.label_t.insert(i, lab.t_wall_ns)
        self.label_phase.insert(i, lab.phase)
        if len(self.label_t) > self.cfg.max_labels:
            del self.label_t[0], self.label_phase[0]

    def phase_at(self, t_ns: int) -> str | None:
        i = int(np.searchsorted(np.asarray(self.label_t, np.int64), t_ns, side="right")) - 1
        return None if i < 0 else self.label_phase[i]

    def _windows(self, now: float, up: EpisodeUpdate, final: bool) -> None:
        if self.meta is None:
            return
        t0 = self.meta.started_ns
        present = {s: b for s, b in self.buffers.items() if b.max_t is not None}
        latest = max((b.max_t for b in present.values() if b.max_t is not None), default=None)
        if latest is None:
            return
        # Attached mid-episode (or the grid origin is far behind the data): jump ahead.
        horizon = latest - self.cfg.backlog_windows * _STRIDE_NS
        if window_last_step_ns(t0, self.next_w) < horizon:
            first = -(-(horizon - window_last_step_ns(t0, 0)) // _STRIDE_NS)
            if first > self.next_w:
                self.counters.windows_backlog_skipped += first - self.next_w
                self.next_w = first
        while True:
            w = self.next_w
            last = window_last_step_ns(t0, w)
            if latest < last:
                break
            held = [s for s, b in present.items() if len(b)]
            if not held:
                break
            # A stream that sent nothing for the grace period (stalled or died) no longer
            # holds windows back. Judged by the tailer's clock, not by data time: a stream
            # catching up on a backlog is far behind in data time but still growing.
            alive = [s for s in held if now - present[s].last_append < self.cfg.grace_s]
            complete = bool(alive) and all(present[s].reaches(last) for s in alive)
            forced = (complete and len(alive) < len(held)) or (not complete and final)
            if not (complete or forced):
                break
            # Only the rows this window reads are copied (extract_window's span).
            lo = window_start_ns(t0, w) - LOOKBACK_NS
            streams = {s: present[s].window(lo, last) for s in held}
            self.counters.windows_ready += 1
            self.counters.windows_forced += forced
            up.jobs.append(
                WindowJob(
                    self.host,
                    self.episode_id,
                    w,
                    t0,
                    streams,
                    self.phase_at(window_centre_ns(t0, w)),
                    now,
                    forced,
                )
            )
            self.next_w = w + 1
            cutoff = t0 + self.next_w * _STRIDE_NS - LOOKBACK_NS
            for b in present.values():
                b.trim_before(cutoff)

    def buffered_rows(self) -> int:
        return sum(len(b) for b in self.buffers.values())


# --- the live tree ----------------------------------------------------------------------


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
        self, roots: list[Path], cfg: TailConfig = TailConfig(), counters: TailCounters | None = None
    ) -> None:
        self.roots = list(roots)
        self.cfg = cfg
        self.counters = counters or TailCounters()
        self.episodes: dict[tuple[str, str], EpisodeTail] = {}
        self._done: set[Path] = set()  # finished episode dirs: never reopened
        self._mtimes: dict[Path, int] = {}
        self._last_scan = -1e18
        self._first_scan = True

    def add_root(self, root: Path) -> None:
        self.roots.append(root)

    def poll(self, now: float) -> TailBatch:
        batch = TailBatch()
        if now - self._last_scan >= self.cfg.scan_s:
            self._last_scan = now
            self._scan(now, batch)
        for key, ep in list(self.episodes.items()):
            up = ep.poll(now)
            batch.jobs.extend(up.jobs)
            batch.labels.extend((ep, lab) for lab in up.labels)
            batch.problems.extend((ep, p) for p in up.problems)
            if up.finished:
                batch.finished.append(ep)
                self._done.add(ep.path)
                del self.episodes[key]
        return batch

    def close(self) -> None:
        for ep in self.episodes.values():
            ep.close()
        self.episodes.clear()

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
            if not self._changed(root, now_ns) and not self._first_scan:
                hosts = [Path(p) for p in self._mtimes if Path(p).parent == root]
            else:
                hosts = [Path(e.path) for e in _scandir(root) if e.is_dir(follow_symlinks=False)]
            for host in hosts:
                if not self._changed(host, now_ns):
                    continue
                entries = [e for e in _scandir(host) if e.is_dir(follow_symlinks=False)]
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
                    ep = EpisodeTail(path, host.name, e.name, self.counters, self.cfg, now)
                    self.episodes[key] = ep
                    self.counters.episodes_started += 1
                    batch.started.append(ep)
                    log.info("following %s", path)
        self._first_scan = False


def _scandir(d: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(d) as it:
            yield from sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
