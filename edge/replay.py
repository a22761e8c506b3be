"""Replay archived episodes as live ones: store -> private live directory, real time x speed.

    python -m edge.replay STORE OUT [--speed 4] [--loop] [--concurrency 4] [--keep N]
    edge-daemon --models models --replay STORE --speed 4      # same thing, inside the daemon

Each archive is read straight from its ``.tar.zst`` (never unpacked to disk) and written
out the way a collector writes a live episode (SPEC section 3): the directory and
``meta.json`` first, then the lines of every stream appended in ``t_wall_ns`` order as
their time comes, a line now and then flushed in two writes, ``done.marker`` last.
Timestamps are shifted so the episode starts now, and an episode replayed again by
``--loop`` gets a new id (``<id>-r<n>``), so a deck sees fresh live data.

A looping replay would fill the disk, so what is kept is a :class:`Retention`: inside the
daemon an episode's directory is deleted as soon as it is written out *and* the tailer has
finished with it (``release``); ``edge-replay --keep N`` keeps the newest N written
episodes for whoever tails ``OUT`` (default: keep everything, as a collector's tree does).

Lines are kept as one bytes blob per member with an offsets array, not as Python
objects, so an hour-long episode costs about its decompressed size.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import trio

from schema.reader import NO_TIME, ArchiveError, Limits, decode_meta, iter_members, line_times
from schema.rows import EpisodeMeta
from schema.vocab import (
    DONE_MEMBER,
    EVENTS_MEMBER,
    LABELS_MEMBER,
    META_MEMBER,
    SOURCE_MEMBER,
    episode_id_from_path,
)

log = logging.getLogger("edge.replay")

# Members a collector appends to, in the order a new episode creates them.
STREAM_MEMBERS = (LABELS_MEMBER, EVENTS_MEMBER, *SOURCE_MEMBER.values())
# Only to rewrite a line's clock in place (its value is read with the reader's decoder).
_T_WALL = re.compile(rb'"t_wall_ns"\s*:\s*(-?\d+)')
_TICK_S = 0.01  # lines due within one tick are written together


class ReplayError(RuntimeError):
    """An archive that cannot be replayed; the message names it and says why."""


# Replay holds an episode in memory: tighter caps than the validator's.
REPLAY_LIMITS = Limits(max_member_bytes=64 << 20, max_total_bytes=256 << 20)


@dataclass
class Member:
    """One JSONL member: its bytes, line boundaries and each line's t_wall_ns."""

    name: str
    data: bytes
    starts: np.ndarray  # int64 (n,) offset of each line
    ends: np.ndarray  # int64 (n,) offset just past its newline
    t: np.ndarray  # int64 (n,); a line without a readable time inherits its predecessor's

    def line(self, i: int) -> bytes:
        return self.data[int(self.starts[i]) : int(self.ends[i])]


def _member(name: str, data: bytes) -> Member:
    if data and not data.endswith(b"\n"):
        data += b"\n"
    nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10).astype(np.int64)
    ends = nl + 1
    starts = np.concatenate(([0], ends[:-1])).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    t = line_times(data)
    # a line without a readable time inherits its predecessor's
    known = np.where(t != NO_TIME, np.arange(len(t)), -1)
    np.maximum.accumulate(known, out=known)
    t = np.where(known >= 0, t[np.maximum(known, 0)], NO_TIME)
    return Member(name, data, starts, ends, t)


@dataclass
class ReplayEpisode:
    host: str
    episode_id: str
    meta: EpisodeMeta
    members: dict[str, Member]
    done: bool

    @property
    def started_ns(self) -> int:
        return self.meta.started_ns


def load_episode(path: Path, limits: Limits = REPLAY_LIMITS) -> ReplayEpisode:
    """Read one archive into replayable form; raises ReplayError naming what is missing."""
    try:
        raw = dict(iter_members(path, limits=limits))
    except ArchiveError as e:
        raise ReplayError(str(e)) from None
    if META_MEMBER not in raw:
        raise ReplayError(f"{path}: no meta.json member")
    try:
        meta = decode_meta(raw[META_MEMBER])
    except msgspec.DecodeError as e:
        raise ReplayError(f"{path}: meta.json: {e}") from None
    members = {m: _member(m, raw[m]) for m in STREAM_MEMBERS if m in raw}
    host = meta.host_id or path.parent.name
    eid = meta.episode_id or episode_id_from_path(path)
    return ReplayEpisode(host, eid, meta, members, DONE_MEMBER in raw)


def _shift(line: bytes, offset: int) -> bytes:
    return _T_WALL.sub(lambda m: b'"t_wall_ns":' + str(int(m.group(1)) + offset).encode(), line, count=1)


async def replay_episode(
    ep: ReplayEpisode,
    out: Path,
    *,
    speed: float = 1.0,
    episode_id: str | None = None,
    shift_to_now: bool = True,
    split_share: float = 0.1,
    rng: random.Random | None = None,
) -> Path:
    """Write one episode into ``out/<host>/<id>/`` at real time x ``speed``; returns its dir."""
    rng = rng or random.Random()
    eid = episode_id or ep.episode_id
    d = out / ep.host / eid
    d.mkdir(parents=True, exist_ok=False)
    offset = time.time_ns() - ep.started_ns if shift_to_now else 0
    meta = msgspec.structs.replace(
        ep.meta,
        episode_id=eid,
        started_ns=ep.meta.started_ns + offset,
        ended_ns=ep.meta.ended_ns + offset,
    )
    # meta.json appears whole (written aside, then renamed), as a careful collector does.
    tmp = d / ".meta.json.tmp"
    tmp.write_bytes(msgspec.json.encode(meta))
    os.replace(tmp, d / META_MEMBER)

    # All lines of all members, merged by time (stable: file order within a member).
    names = list(ep.members)
    order_t = np.concatenate([ep.members[n].t for n in names]) if names else np.zeros(0, np.int64)
    order_m = (
        np.concatenate([np.full(len(ep.members[n].t), k) for k, n in enumerate(names)])
        if names
        else np.zeros(0, np.int64)
    )
    order_i = (
        np.concatenate([np.arange(len(ep.members[n].t)) for n in names]) if names else np.zeros(0, np.int64)
    )
    order = np.argsort(order_t, kind="stable")
    fds: dict[str, int] = {}
    t_first = int(order_t[order[0]]) if len(order) else ep.started_ns
    t_first = min(t_first, ep.started_ns) if t_first > np.iinfo(np.int64).min else ep.started_ns
    start = trio.current_time()
    try:
        k = 0
        while k < len(order):
            due = start + (int(order_t[order[k]]) - t_first) / 1e9 / speed
            await trio.sleep_until(due)
            horizon = trio.current_time() + _TICK_S
            split: dict[int, bytearray] = {}  # fd -> the rest of a half-written line, and what follows it
            while k < len(order) and start + (int(order_t[order[k]]) - t_first) / 1e9 / speed <= horizon:
                name = names[int(order_m[order[k]])]
                line = _shift(ep.members[name].line(int(order_i[order[k]])), offset)
                fd = fds.get(name)
                if fd is None:
                    fd = fds[name] = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                if fd in split:
                    split[fd] += line
                elif len(line) > 2 and rng.random() < split_share:
                    cut = rng.randrange(1, len(line) - 1)
                    os.write(fd, line[:cut])
                    split[fd] = bytearray(line[cut:])
                else:
                    os.write(fd, line)
                k += 1
            if split:
                await trio.sleep(0.002)  # the reader may well see the half line
                for fd, rest in split.items():
                    os.write(fd, rest)
        if ep.done:
            (d / DONE_MEMBER).touch()
    finally:
        for fd in fds.values():
            os.close(fd)
    return d


class Retention:
    """Which replayed episode directories stay on disk. An episode is *finished* once replay
    wrote its last line (and, with ``wait_for_reader``, once its reader called ``release``);
    finished episodes beyond the newest ``keep`` are deleted, oldest first. ``keep`` None
    deletes nothing."""

    def __init__(self, out: Path, *, keep: int | None = None, wait_for_reader: bool = False) -> None:
        self.out = out
        self.keep = keep
        self.wait_for_reader = wait_for_reader
        self._writing: set[Path] = set()
        self._half: set[Path] = set()  # one of the two (written, released) seen, waiting for the other
        self._finished: list[Path] = []  # oldest first
        self.deleted = 0

    def _ours(self, d: Path) -> bool:
        return d.parent.parent == self.out

    def writing(self, d: Path) -> None:
        self._writing.add(d)

    def written(self, d: Path) -> None:
        self._writing.discard(d)
        if not self.wait_for_reader or d in self._half:
            self._half.discard(d)
            self._finish(d)
        else:
            self._half.add(d)  # written: waiting for the reader

    def release(self, d: Path) -> None:
        """The reader is done with ``d`` (done.marker seen and its streams drained, or idle)."""
        if not self.wait_for_reader or not self._ours(d):
            return
        if d in self._writing:
            self._half.add(d)  # finished early (idle): deleted once replay is done with it
        elif d in self._half:
            self._half.discard(d)
            self._finish(d)

    def _finish(self, d: Path) -> None:
        if self.keep is None:
            return  # nothing is deleted, so nothing needs remembering
        self._finished.append(d)
        while len(self._finished) > self.keep:
            old = self._finished.pop(0)
            shutil.rmtree(old, ignore_errors=True)
            self.deleted += 1


def list_archives(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("*/*.tar.zst") if p.is_file())


async def replay_store(
    store: Path,
    out: Path,
    *,
    speed: float = 1.0,
    loop: bool = False,
    concurrency: int = 4,
    limit: int | None = None,
    seed: int = 0,
    stagger_s: float = 2.0,
    retention: Retention | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Replay every archive of ``store`` (``limit`` of them), ``concurrency`` at a time; returns how many."""
    archives = list_archives(store)
    if limit is not None:
        archives = archives[:limit]
    if not archives:
        raise ReplayError(f"{store}: no <host>/<episode>.tar.zst archives to replay")
    out.mkdir(parents=True, exist_ok=True)
    concurrency = min(max(1, concurrency), len(archives))  # never the same archive twice at once
    rng = random.Random(seed)
    rounds = itertools.count() if loop else iter([0])
    queue = ((r, a) for r in rounds for a in archives)
    replayed = 0
    task_status.started()

    async def worker(n: int) -> None:
        nonlocal replayed
        await trio.sleep(
            n * stagger_s / max(speed, 1e-9) / max(concurrency, 1)
        )  # episodes do not start in lockstep
        for r, archive in queue:
            try:
                ep = await trio.to_thread.run_sync(load_episode, archive)
            except ReplayError as e:
                log.warning("%s", e)
                continue
            eid = ep.episode_id if r == 0 else f"{ep.episode_id}-r{r}"
            if (out / ep.host / eid).exists():
                eid = f"{eid}-{time.time_ns() % 1_000_000}"
            d = out / ep.host / eid
            if retention is not None:
                retention.writing(d)
            try:
                await replay_episode(ep, out, speed=speed, episode_id=eid, rng=random.Random(rng.random()))
            finally:
                if retention is not None:
                    retention.written(d)
            replayed += 1

    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(worker, n)
    return replayed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-replay", description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="receiver store: <store>/<host>/<episode>.tar.zst")
    ap.add_argument("out", type=Path, help="live directory to write <out>/<host>/<episode>/ into")
    ap.add_argument("--speed", type=float, default=1.0, help="time multiplier (default 1: real time)")
    ap.add_argument("--loop", action="store_true", help="start over when the store is done, forever")
    ap.add_argument("--concurrency", type=int, default=4, help="episodes replayed at once")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N archives")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="delete finished episodes but the newest N (default: keep all; use with --loop)",
    )
    args = ap.parse_args(argv)
    if args.speed <= 0:
        ap.error("--speed must be > 0")
    if args.keep is not None and args.keep < 0:
        ap.error("--keep must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        n = trio.run(
            lambda: replay_store(
                args.store,
                args.out,
                speed=args.speed,
                loop=args.loop,
                concurrency=args.concurrency,
                limit=args.limit,
                seed=args.seed,
                retention=Retention(args.out, keep=args.keep),
            )
        )
    except ReplayError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"replayed {n} episodes into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
