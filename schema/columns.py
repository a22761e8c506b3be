"""One telemetry stream as columns, and the one builder both the reader and the tailer append to.

:class:`ColumnBuilder` is a growable buffer: rows are written at the end, dropped at the
front by moving an index, and the storage doubles (or is compacted in place) only when it
is full, so an append costs amortised O(rows appended), never a copy of what is already
held. What leaves the builder is a copy (:meth:`ColumnBuilder.build` for a whole stream,
:meth:`ColumnBuilder.window` for the rows one window reads), so a
:class:`StreamColumns` handed to another thread never changes under it.

Pi-safe: numpy only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final

import numpy as np

from .rows import row_fields

_CLOCKS: Final = operator.attrgetter("t_wall_ns", "t_mono_ns")
_MIN_CAPACITY: Final = 64
_INT64_MIN: Final = int(np.iinfo(np.int64).min)


@dataclass
class StreamColumns:
    """One telemetry stream as columns (what the extractor reads)."""

    source: str
    t_wall_ns: np.ndarray  # int64 (n,)
    t_mono_ns: np.ndarray  # int64 (n,)
    values: np.ndarray  # float64 (n, len(rows.row_fields(source)))
    malformed: int = 0

    def __len__(self) -> int:
        return int(self.t_wall_ns.shape[0])

    @property
    def fields(self) -> tuple[str, ...]:
        return row_fields(self.source)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.fields.index(name)]


class ColumnBuilder:
    """Rows of one stream in arrival order: ``[lo, hi)`` of three growable arrays."""

    def __init__(self, source: str, capacity: int = 0) -> None:
        self.source = source
        self.width = len(row_fields(source))
        self._values_of = operator.attrgetter(*row_fields(source))
        self._tw = np.empty(capacity, np.int64)
        self._tm = np.empty(capacity, np.int64)
        self._v = np.empty((capacity, self.width), np.float64)
        self._lo = 0
        self._hi = 0
        self.malformed = 0
        self.max_t: int | None = None  # latest t_wall_ns ever appended (survives trims)

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def capacity(self) -> int:
        return int(self._tw.shape[0])

    @property
    def t_wall_ns(self) -> np.ndarray:
        """A view of the held clocks (valid until the next append or trim)."""
        return self._tw[self._lo : self._hi]

    # -- appending --

    def add_rows(self, rows: Sequence[Any]) -> tuple[int, int]:
        """Typed rows (``schema.rows``) -> columns; returns what :meth:`append` returns."""
        n = len(rows)
        if not n:
            return 0, 0
        # One flat fromiter over every row's fields: no nested-list shape inference as
        # in np.array(list_of_tuples), and already in rows x fields order.
        t = np.fromiter(chain.from_iterable(map(_CLOCKS, rows)), np.int64, 2 * n).reshape(n, 2)
        v = np.fromiter(chain.from_iterable(map(self._values_of, rows)), np.float64, self.width * n)
        return self.append(t[:, 0], t[:, 1], v.reshape(n, self.width))

    def append(self, t_wall: np.ndarray, t_mono: np.ndarray, values: np.ndarray) -> tuple[int, int]:
        """Add rows at the end; returns (rows whose t_wall_ns went back, 0)."""
        n = int(t_wall.shape[0])
        if not n:
            return 0, 0
        prev = _INT64_MIN if self.max_t is None else self.max_t
        first, last = int(t_wall[0]), int(t_wall[n - 1])
        if n == 1:  # the live case: a row or two per tick; no numpy for one scalar comparison
            back, self.max_t = int(first < prev), max(prev, first)
        elif first >= prev and bool((t_wall[1:] >= t_wall[:-1]).all()):
            back, self.max_t = 0, last
        else:
            running = np.maximum.accumulate(np.concatenate(([prev], t_wall[:-1])))
            back = int(np.count_nonzero(t_wall < running))
            self.max_t = max(prev, int(t_wall.max()))
        if self._hi == self._lo == 0 and self.capacity == 0 and values.flags.c_contiguous:
            # The first chunk is adopted as it is (the reader's common case: one chunk).
            self._tw = np.ascontiguousarray(t_wall)
            self._tm = np.ascontiguousarray(t_mono)
            self._v = values
            self._hi = n
            return back, 0
        self._reserve(n)
        hi = self._hi
        self._tw[hi : hi + n] = t_wall
        self._tm[hi : hi + n] = t_mono
        self._v[hi : hi + n] = values
        self._hi = hi + n
        return back, 0

    def _reserve(self, n: int) -> None:
        size = len(self)
        if self._hi + n <= self.capacity:
            return
        cap = self.capacity
        if size + n <= cap - cap // 4:  # room once the trimmed front is reclaimed: compact in place
            new_cap = cap
        else:
            # x1.5, not x2: a live stream holds a window's rows for good (300 live episodes:
            # 1,200 buffers), and growth by any constant factor keeps appends amortised O(1).
            new_cap = max(cap + cap // 2, size + n, _MIN_CAPACITY)
        self._move(new_cap)

    def _move(self, new_cap: int) -> None:
        size, lo = len(self), self._lo
        if new_cap == self.capacity:  # compact in place (slices may overlap: numpy copies safely)
            self._tw[:size] = self._tw[lo : self._hi].copy()
            self._tm[:size] = self._tm[lo : self._hi].copy()
            self._v[:size] = self._v[lo : self._hi].copy()
        else:
            tw = np.empty(new_cap, np.int64)
            tm = np.empty(new_cap, np.int64)
            v = np.empty((new_cap, self.width), np.float64)
            tw[:size] = self._tw[lo : self._hi]
            tm[:size] = self._tm[lo : self._hi]
            v[:size] = self._v[lo : self._hi]
            self._tw, self._tm, self._v = tw, tm, v
        self._lo, self._hi = 0, size

    # -- forgetting --

    def keep_last(self, max_rows: int) -> int:
        """Drop the oldest rows beyond ``max_rows``; returns how many were dropped."""
        over = len(self) - max_rows
        if over <= 0:
            return 0
        self._lo += over
        return over

    def trim_before(self, t_ns: int) -> None:
        """Forget rows older than ``t_ns`` (by time, not position: a clock step keeps order)."""
        t = self.t_wall_ns
        if not t.size or int(t.min()) >= t_ns:
            return
        keep = t >= t_ns
        idx = np.flatnonzero(keep)
        if not idx.size:
            self._lo = self._hi
        elif idx[-1] - idx[0] + 1 == idx.size and idx[-1] == t.size - 1:
            self._lo += int(idx[0])  # the usual case: only a prefix goes
        else:
            lo, k = self._lo, idx.size
            sel = idx + lo
            self._tw[lo : lo + k] = self._tw[sel]
            self._tm[lo : lo + k] = self._tm[sel]
            self._v[lo : lo + k] = self._v[sel]
            self._hi = lo + k
        if self.capacity > 4 * max(len(self), _MIN_CAPACITY):  # a backlog has passed: give it back
            self._move(max(2 * len(self), _MIN_CAPACITY))

    # -- reading --

    def build(self) -> StreamColumns:
        """Every held row, as a stream of its own (exact-size copies unless they already are)."""
        lo, hi = self._lo, self._hi
        if lo == 0 and hi == self.capacity:
            return StreamColumns(self.source, self._tw, self._tm, self._v, self.malformed)
        return StreamColumns(
            self.source,
            self._tw[lo:hi].copy(),
            self._tm[lo:hi].copy(),
            self._v[lo:hi].copy(),
            self.malformed,
        )

    def window(self, lo_ns: int, hi_ns: int) -> StreamColumns:
        """A copy of the rows with ``lo_ns <= t_wall_ns <= hi_ns``, in arrival order: all that
        ``schema.extract.extract_window`` reads of a window spanning those times."""
        t = self.t_wall_ns
        sel = np.flatnonzero((t >= lo_ns) & (t <= hi_ns))
        if sel.size and sel[-1] - sel[0] + 1 == sel.size:
            a, b = self._lo + int(sel[0]), self._lo + int(sel[-1]) + 1
            return StreamColumns(
                self.source, self._tw[a:b].copy(), self._tm[a:b].copy(), self._v[a:b].copy(), self.malformed
            )
        sel += self._lo
        return StreamColumns(self.source, self._tw[sel], self._tm[sel], self._v[sel], self.malformed)
