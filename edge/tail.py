"""Follow live episode directories (SPEC section 3) and cut them into windows.

    <live>/<host_id>/<episode_id>/meta.json, labels.jsonl, telemetry-*.jsonl, netflow.jsonl, done.marker

One episode is an :class:`EpisodeTail`; the tree of them, and what inotify says about it, is
``edge.livetree.LiveTailer``. Everything here is synchronous and clock-agnostic: the daemon
calls ``LiveTailer.poll(now)`` from its trio loop every tick and passes
``trio.current_time()``; tests pass plain numbers.

Changes are noticed through ``edge.watch`` (inotify on the directories, or ``stat``
polling where inotify is missing: the tree listed once a second, a host directory re-listed
only when its mtime moved, each open file ``fstat``ed every tick). With inotify, the files
an event names are read when the episode's next window can complete (``edge.schedule``),
not on every event; a full pass every ``safety_s`` covers a lost event.

A followed file keeps an open descriptor, its offset, the bytes of a partial last line and
the last bytes it read (to notice a truncate-and-rewrite that grew past the old offset
between two ticks). Because the descriptor stays open, a rotated file (renamed to
``<member>.1``) or a deleted one is read to its end through it before the new file is
followed from offset 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np

from edge.follow import FD_ERRNOS, FdPressure, FileFollower, TailCounters
from edge.schedule import ReadSchedule
from schema.channels import LOOKBACK_NS, STEP_NS, STRIDE_STEPS
from schema.columns import ColumnBuilder, StreamColumns
from schema.extract import window_centre_ns, window_last_step_ns, window_start_ns
from schema.reader import MEMBER_SOURCE, Problem, ReasonCode, decode_labels, decode_lines, decode_meta
from schema.rows import ROW_TYPES, EpisodeMeta, Label
from schema.vocab import DONE_MEMBER, LABELS_MEMBER, META_MEMBER, PHASES, SOURCE_MEMBER, SOURCES

log = logging.getLogger("edge.tail")

_SIG_BYTES = 64  # how much of what was read last is compared to spot a rewrite
_STRIDE_NS = STRIDE_STEPS * STEP_NS


# --- one stream's rows ------------------------------------------------------------------


class ColumnBuffer(ColumnBuilder):
    """The rows of one stream that the next windows still need, in arrival order: the
    reader's :class:`~schema.columns.ColumnBuilder` (amortised O(1) appends, trims that move
    an index), bounded by ``max_rows``, remembering when rows last came."""

    def __init__(self, source: str, max_rows: int) -> None:
        super().__init__(source)
        self.max_rows = max_rows
        self.last_append = -1e18  # tailer clock of the last rows added

    def append_rows(self, rows: list[Any], malformed: int, now: float) -> tuple[int, int]:
        """Add typed rows; returns (rows that stepped back in time, rows dropped for space)."""
        self.malformed += malformed
        if not rows:
            return 0, 0
        self.last_append = now
        back, _ = self.add_rows(rows)
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
    backend: str = "auto"  # "inotify", "poll" (stat every tick: the fallback) or "auto"
    safety_s: float = 5.0  # with inotify: a full stat pass this often, in case an event was lost
    park_s: float = 10.0  # a file that has not grown for this long is closed until it changes
    # With inotify, a file that changed is read when the next window can complete, and at
    # least this often (under grace_s, by 0.5 s); 0 reads on every event as polling does. Half a
    # stride: at 300 live episodes 2.5 s cost 22 % less tailer CPU than 1 s and 5 s no less
    # (bench_daemon.py --tail-cost 300 --backends inotify@1000,inotify@2500,inotify@5000).
    defer_s: float = 2.5


# An episode whose next window is at least this far off stops hearing its files' writes
# until then (two inotify_add_watch calls a window, instead of ~150 events).
QUIET_MIN_S: Final = 0.5


class EpisodeTail:
    """One live episode: its followers, its bounded row buffers, its labels and next window."""

    def __init__(
        self,
        path: Path,
        host: str,
        episode_id: str,
        counters: TailCounters,
        cfg: TailConfig,
        now: float,
        pressure: FdPressure | None = None,
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
        self.due = -1e18  # when a timer (grace, idle, parking) next needs a look without any event
        self.pressure = pressure or FdPressure(counters)
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
                pressure=self.pressure,
            )
        self._grew_at = {m: now for m in self.followers}
        self._member_source = MEMBER_SOURCE
        self.schedule = ReadSchedule(self.followers, cfg.defer_s)  # inotify: when named files are read
        self.quiet_end: float | None = None  # inotify reports no writes here until then (LiveTailer)

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.episode_id)

    def close(self) -> None:
        for f in self.followers.values():
            f.close()

    def poll(self, now: float, changed: set[str] | None = None) -> EpisodeUpdate:
        """One look. ``changed`` None: stat everything (polling, or inotify's safety net);
        a set: the entries inotify named since the last look (empty: timers only). Named
        files are read when the next window can complete (:meth:`_to_read`), not on every
        event: a file appended to at 10 Hz is read a few times a second, not fifty."""
        up = EpisodeUpdate()
        if self.finished:
            return up
        if changed is None:
            check = now - self._last_path_check >= self.cfg.path_check_s
            if check:
                self._last_path_check = now
            done = check and (self.path / DONE_MEMBER).exists()
            gone = check and not self.path.exists()
            members: list[str] = list(self.followers)
            self.schedule.done(members, now, everything=True)
        else:
            dir_event = self.schedule.note(changed, now)
            retry = [m for m, f in self.followers.items() if f.refused or f.behind]
            members = self.schedule.to_read(now, self._reached)
            everything = bool(members) and self.schedule.all_due(now)
            if not (members or retry or dir_event) and now < self.due:
                return up  # written to, but nothing a window needs yet: read later, in one go
            check = bool(changed) or bool(retry) or bool(members)
            done = DONE_MEMBER in changed and (self.path / DONE_MEMBER).exists()
            gone = "" in changed and not self.path.exists()
            if done:
                members = list(self.followers)
            else:
                members += [m for m in retry if m not in members]
            self.schedule.done(members, now, everything or done)
        if self.meta is None and (check or done):
            self._read_meta(now)
        grew = False
        for member in members:
            f = self.followers[member]
            for first, data in f.poll(check, final=done):
                self._ingest(member, first, data, up, now)
            if f.last_growth:
                grew = True
                self._grew_at[member] = now
        for member, f in self.followers.items():
            if f.is_open and now - self._grew_at[member] >= self.cfg.park_s:
                f.park()  # idle: its descriptor goes back until the file changes
        if grew:
            self.last_activity = now
        idle = now - self.last_activity >= self.cfg.idle_s or gone  # a gone directory sends nothing more
        final = done or idle
        self._windows(now, up, final)
        if changed is not None:  # inotify (polling reads every tick: no schedule to keep)
            self._update_schedule(now)
        self.due = self._next_due(now)
        if final:
            self.finished = True
            up.finished = True
            self.counters.episodes_finished += 1
            self.close()
            log.info("%s/%s finished (%s)", self.host, self.episode_id, "done.marker" if done else "idle")
        return up

    def quiet_until(self, now: float) -> float | None:
        """Until when this episode can do without hearing its files' writes: the time its next
        window's rows are due (``ReadSchedule.eta``, at least ``QUIET_MIN_S`` away); None while
        it needs every event (no meta or timing yet, a refused or unfinished read, reads on
        every change with ``defer_s`` 0)."""
        eta = self.schedule.eta
        if (
            self.finished
            or self.meta is None
            or eta is None
            or self.cfg.defer_s <= 0
            or eta - now < QUIET_MIN_S
        ):
            return None
        if any(f.refused or f.behind for f in self.followers.values()):
            return None
        return eta

    def note(self, changed: set[str], now: float) -> bool:
        """Remember what inotify named; True when that needs a look before :attr:`due`
        (a directory event, or a stream the next window waits for, once its time has come)."""
        if self.schedule.note(changed, now):
            return True
        return bool(self.schedule.to_read(now, self._reached))

    def _reached(self, member: str, t_ns: int) -> bool:
        src = self._member_source.get(member)
        if src is None:
            return False  # the labels: read with the window's rows
        mx = self.buffers[src].max_t
        return mx is not None and mx >= t_ns

    def _last_sign(self, source: str) -> float:
        """When the stream last showed life: rows read, or (inotify) its file named, unread yet."""
        return max(self.buffers[source].last_append, self.schedule.heard.get(SOURCE_MEMBER[source], -1e18))

    def _update_schedule(self, now: float) -> None:
        t0 = self.meta.started_ns if self.meta is not None else None
        held = [b for b in self.buffers.values() if b.max_t is not None]
        latest = max((b.max_t for b in held if b.max_t is not None), default=None)
        appended = any(b.last_append == now for b in held)
        step = window_last_step_ns(t0, self.next_w) if t0 is not None else 0
        self.schedule.update(now, t0, latest, appended, step)

    def _next_due(self, now: float) -> float:
        """The earliest time a look without new data could change something: a stream's grace
        running out, the idle timeout, an idle file to park, a refused open to retry, a named
        file to read (its window's time, or ``defer_s`` after the last full read)."""
        cfg = self.cfg
        due = [self.last_activity + cfg.idle_s]
        signs = [self._last_sign(s) + cfg.grace_s for s in self.buffers]
        due += [t for t in signs if t > now]
        if (read_at := self.schedule.due()) is not None:
            due.append(read_at)
        due += [self._grew_at[m] + cfg.park_s for m, f in self.followers.items() if f.is_open]
        if self.meta is None:
            due.append(now + cfg.path_check_s)
        if any(f.refused for f in self.followers.values()):
            due.append(now + FdPressure.RETRY_S)  # descriptors come back as idle files are parked
        if any(f.behind for f in self.followers.values()):
            due.append(now)  # a backlog: read on at the next tick
        return min(due)

    def _read_meta(self, now: float) -> None:
        try:
            raw = (self.path / META_MEMBER).read_bytes()
            self.meta = decode_meta(raw)
        except FileNotFoundError:
            return
        except (msgspec.DecodeError, OSError) as e:
            if isinstance(e, OSError) and e.errno in FD_ERRNOS:
                self.pressure.hit()  # tried again on the next look
                return
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
        rows, problems = decode_lines(ROW_TYPES[source], data, first, member)  # the reader's decoder
        if problems:
            self.counters.parse_errors += len(problems)
            up.problems.extend(problems)
        back, over = self.buffers[source].append_rows(rows, len(problems), now)
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
            alive = [s for s in held if now - self._last_sign(s) < self.cfg.grace_s]
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
