"""Rows of a split as the learners read them: in RAM or gathered from the window store's memmaps.

x = ws.rows("realistic", "tensor", split.train)   # a Rows: len(x), x.row_shape, x.take(pos)
for chunk in x.chunks(8192): ...                 # sequential, bounded
plan = epoch_plan(len(x), x.groups, 256, buffer_rows, rng)   # the sampler: blocks of shuffled batches

The sampler is what makes training stream. When the split's rows fit in the shuffle buffer
it is one global permutation per epoch (the in-RAM loop's order, draw for draw); otherwise
episodes are shuffled, packed into blocks of at most ``buffer_rows`` rows, each block is
read once (shard after shard, sequentially) and its rows are shuffled into batches. With
``world > 1`` (torch DDP) rank r trains on every world-th episode of the epoch's shuffled
order (or every world-th batch of the global permutation), and every rank runs the same
number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Rows(Protocol):
    """A fixed, ordered set of float32 rows of one input kind (summary (F,) or tensor (C, T))."""

    row_shape: tuple[int, ...]
    groups: np.ndarray  # (N,) episode of each row (any hashable codes): the sampler's shuffle unit

    def __len__(self) -> int: ...
    def take(self, pos: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    """Rows held in memory (an ndarray, or any array-like that fancy-indexes)."""

    def __init__(self, x: np.ndarray, groups: np.ndarray | None = None) -> None:
        self.x = x
        self.row_shape = tuple(int(d) for d in x.shape[1:])
        self.groups = np.arange(len(x)) if groups is None else np.asarray(groups)

    def __len__(self) -> int:
        return len(self.x)

    def take(self, pos: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.x[np.asarray(pos, np.int64)], np.float32)


class Gather:
    """Array-like over Rows for code written against arrays: ``g[idx]`` (int or bool array,
    slice) reads just those rows; ``len``, ``shape`` and ``ndim`` as an array's."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.shape = (len(rows), *rows.row_shape)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            pos = np.arange(len(self.rows))[key]
        else:
            pos = np.asarray(key)
            pos = np.flatnonzero(pos) if pos.dtype == bool else pos.astype(np.int64)
        return self.rows.take(pos)


def as_rows(x: np.ndarray | Rows) -> Rows:
    return x if isinstance(x, Rows) and not isinstance(x, np.ndarray) else ArrayRows(np.asarray(x))


def row_bytes(rows: Rows) -> int:
    return 4 * math.prod(rows.row_shape)


def chunks(rows: Rows, size: int) -> Iterator[np.ndarray]:
    """The rows in order, ``size`` at a time (size >= 1)."""
    for lo in range(0, len(rows), max(1, size)):
        yield rows.take(np.arange(lo, min(lo + size, len(rows))))


def chunk_rows(rows: Rows, budget_bytes: float) -> int:
    """How many rows one chunk of ``budget_bytes`` holds (at least 256)."""
    return max(256, int(budget_bytes // max(1, row_bytes(rows))))


def materialize(rows: Rows, budget_bytes: float) -> np.ndarray | None:
    """All rows in one array when they fit in ``budget_bytes``, else None."""
    if len(rows) * row_bytes(rows) > budget_bytes:
        return None
    if isinstance(rows, ArrayRows):
        return np.ascontiguousarray(rows.x, np.float32)
    return rows.take(np.arange(len(rows)))


def sample_positions(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All positions, or a seeded uniform sample of ``max_rows`` of them, sorted."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def canonical_groups(groups: np.ndarray) -> np.ndarray:
    """Group codes 0..G-1 numbered by first appearance: the same rows give the same codes,
    whatever the group labels were (episode names in RAM, shard numbers on disk)."""
    _, first, inv = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.ravel()]


@dataclass(frozen=True)
class Block:
    positions: np.ndarray  # sorted positions to read (one sequential pass over the shards)
    batches: list[np.ndarray]  # each an index array into the block's rows


def epoch_plan(
    n: int,
    groups: np.ndarray,
    batch_size: int,
    buffer_rows: int,
    rng: np.random.Generator,
    rank: int = 0,
    world: int = 1,
) -> list[Block]:
    """One epoch's blocks and batches for ``rank`` of ``world`` (see the module docstring).

    Every rank computes every rank's plan from the same ``rng`` state (no communication)
    and keeps its own: the ranks' rows are disjoint, each runs the same number of steps,
    and with ``world > 1`` no batch has fewer than two rows (BatchNorm; and a rank that
    skipped a step would leave the others waiting at the all-reduce).
    """
    if n <= buffer_rows:
        order = rng.permutation(n)
        steps = max(1, math.ceil(n / batch_size))
        batches = [order[b * batch_size : (b + 1) * batch_size] for b in range(steps)]
        if world > 1:  # batch b goes to rank b % world; the last < world batches are left out
            batches = [b for b in batches if len(b) >= 2]
            batches = batches[rank::world][: len(batches) // world]
        return [Block(np.arange(n), batches)]
    codes = canonical_groups(groups)
    by_group = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[by_group], np.arange(codes.max() + 2))
    episodes = rng.permutation(len(bounds) - 1)
    # Episode e of the shuffled order goes to rank e % world; each rank packs its own
    # episodes into blocks, so a rank reads only its own shards.
    packed = [_pack(episodes[r::world], by_group, bounds, buffer_rows) for r in range(world)]
    plans: list[list[Block]] = []
    for blocks in packed:  # every rank draws every block's permutation: the rng stays in step
        plan = []
        for pos in blocks:
            pos = np.sort(pos)
            perm = rng.permutation(len(pos))
            batches = [perm[i : i + batch_size] for i in range(0, len(pos), batch_size)]
            plan.append(Block(pos, [b for b in batches if len(b) >= 2] if world > 1 else batches))
        plans.append(plan)
    if world == 1:
        return plans[0]
    steps = min(sum(len(b.batches) for b in p) for p in plans)  # the same step count on every rank
    kept: list[Block] = []
    for b in plans[rank]:
        if steps <= 0:
            break
        kept.append(Block(b.positions, b.batches[:steps]))
        steps -= len(kept[-1].batches)
    return kept


def _pack(
    episodes: np.ndarray, by_group: np.ndarray, bounds: np.ndarray, buffer_rows: int
) -> list[np.ndarray]:
    """Whole episodes, in the given order, packed into blocks of at most ``buffer_rows`` rows
    (an episode larger than the buffer is a block of its own)."""
    blocks: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for g in episodes:
        part = by_group[bounds[g] : bounds[g + 1]]
        if size and size + len(part) > buffer_rows:
            blocks.append(np.concatenate(current))
            current, size = [], 0
        current.append(part)
        size += len(part)
    if current:
        blocks.append(np.concatenate(current))
    return blocks
