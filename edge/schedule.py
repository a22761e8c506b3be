"""When an inotify-watched episode's files are read: when its next window can complete.

A collector appends to each stream at 10 Hz, so inotify names every file of every live
episode on nearly every 20 ms tick. Reading each named file at once (what stat polling
amounts to) costs a descriptor read, a decode and an append per file per tick, while a
window needs its rows only once every 5 s. :class:`ReadSchedule` remembers what was named
and says what to read now:

- everything named, while the episode's timing is unknown (no meta, no rows yet) and at
  least every ``defer_s`` (so nothing waits long and backlogs are read in pieces);
- from the time the next window's last step should be on disk (:attr:`eta`), the files of
  the streams that have not reached it yet, as soon as they are named (a 1 Hz stream is
  what a window usually waits for);
- before that, nothing.

The time a step reaches the disk comes from mapping the data clock onto the tailer's
clock: ``offset = now - latest row`` when rows come in; the smallest offset seen is the
tightest (a row is always read after it was written). It may creep up 20 ms a read (a
collector clock running slow) and is taken afresh after a step of over a minute. A wrong
estimate costs either CPU (too early: read every tick, as before) or at most ``defer_s``
of latency (too late), never a row.

Between windows the tailer may even stop hearing the writes (``EpisodeTail.quiet_until``:
inotify's mask without ``IN_MODIFY`` for the episode's directory until :attr:`eta`); every
file is then presumed written (:meth:`presume_all`), which is what the events would have said.

Pure bookkeeping on numbers; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

_NEVER: Final = -1e18
_CREEP_S: Final = 0.02  # how far the offset may rise per read
_STEP_S: Final = 60.0  # a rise beyond this is a clock step: take the new offset at once


class ReadSchedule:
    def __init__(self, members: Iterable[str], defer_s: float) -> None:
        self.members = frozenset(members)
        self.defer_s = defer_s
        self.pending: set[str] = set(self.members)  # a new episode reads everything at once
        self.heard: dict[str, float] = {}  # member -> when inotify last named it
        self.last_read = _NEVER  # last time everything pending was read
        self.offset: float | None = None  # tailer clock - data clock (s since started_ns)
        self.eta: float | None = None  # tailer clock when the next window's last step is due
        self.eta_step_ns = 0  # that last step (data clock, ns)

    def note(self, names: Iterable[str], now: float) -> bool:
        """Remember the followed files named; True when a name is not one of them (the
        directory, meta.json, done.marker, a rotated ``.1``: look now)."""
        other = False
        for m in names:
            if m in self.members:
                self.pending.add(m)
                self.heard[m] = now
            else:
                other = True
        return other

    def presume_all(self) -> None:
        """Take every file as written to (inotify is not reporting this episode's writes)."""
        self.pending.update(self.members)

    def all_due(self, now: float) -> bool:
        return self.eta is None or now - self.last_read >= self.defer_s

    def to_read(self, now: float, reached: Callable[[str, int], bool]) -> list[str]:
        """The pending files to read now; ``reached(member, t_ns)``: its stream holds a row at
        or after ``t_ns``. Reading them is the caller's (then :meth:`done`)."""
        if not self.pending:
            return []
        if self.all_due(now):
            return list(self.pending)
        assert self.eta is not None
        if now < self.eta:
            return []
        return [m for m in self.pending if not reached(m, self.eta_step_ns)]

    def done(self, members: Iterable[str], now: float, everything: bool) -> None:
        self.pending.difference_update(members)
        if everything:
            self.last_read = now

    def update(
        self, now: float, t0_ns: int | None, latest_ns: int | None, appended: bool, next_step_ns: int
    ) -> None:
        """After a look: ``t0_ns`` the episode's started_ns (None: no meta yet), ``latest_ns``
        the newest row held, ``appended`` whether rows came in now, ``next_step_ns`` the next
        window's last step."""
        if self.defer_s <= 0 or t0_ns is None or latest_ns is None:
            self.eta = None
            return
        if appended:
            sample = now - (latest_ns - t0_ns) / 1e9
            off = self.offset
            if off is None or sample < off or sample - off > _STEP_S:
                self.offset = sample
            else:
                self.offset = min(sample, off + _CREEP_S)
        if self.offset is None:
            self.eta = None
            return
        self.eta_step_ns = next_step_ns
        self.eta = (next_step_ns - t0_ns) / 1e9 + self.offset

    def due(self) -> float | None:
        """When pending files should be read without any new event (None: nothing pending)."""
        if not self.pending:
            return None
        t = self.last_read + self.defer_s
        return min(t, self.eta) if self.eta is not None else t
