"""The growable column buffer (schema.columns.ColumnBuilder) under the tailer's pattern: a few
rows appended at the end, the front trimmed as windows are cut. What it holds is exactly what
was appended and not trimmed, its storage stays near what it holds, and the rows it copies
while growing or compacting stay a constant multiple of the rows appended (amortised O(1))."""

from __future__ import annotations

import numpy as np

from schema.columns import ColumnBuilder
from schema.rows import row_fields


class _Counting(ColumnBuilder):
    moved = 0

    def _move(self, new_cap: int) -> None:
        self.moved += len(self)
        super()._move(new_cap)


def test_live_appends_and_trims_hold_the_right_rows_in_bounded_storage() -> None:
    rng = np.random.default_rng(0)
    width = len(row_fields("proc"))
    b = _Counting("proc")
    held_t: list[int] = []
    appended = peak_held = 0
    t = 0
    for tick in range(4000):
        n = int(rng.integers(0, 4))  # 0-3 rows a tick (a 10 Hz stream read at 20-50 ms ticks)
        ts = np.arange(t, t + n, dtype=np.int64)
        t += n
        b.append(ts, ts + 7, np.repeat(ts[:, None].astype(np.float64), width, axis=1))
        held_t += ts.tolist()
        appended += n
        if tick % 100 == 99:  # a window cut: forget all but the newest ~150 rows
            cutoff = t - 150
            b.trim_before(cutoff)
            held_t = [x for x in held_t if x >= cutoff]
        peak_held = max(peak_held, len(b))
        assert b.t_wall_ns.tolist() == held_t
    assert np.array_equal(b._v[b._lo : b._hi, 0], np.asarray(held_t, np.float64))
    assert b.capacity <= 2 * peak_held + 64, (b.capacity, peak_held)  # near what it ever held
    assert b.moved <= 4 * appended, (b.moved, appended)  # amortised O(1) per appended row
