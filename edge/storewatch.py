"""Watch a receiver store: a ``snapshot`` of it, and an ``episode`` event per new archive.

The acceptance index (``<store>/index.jsonl``, written by ``phasewatch validate``) is the
cheap source of statuses: it is read at start and again whenever its mtime moves. An
archive the index does not know is read and classified here with the validator's own
``schema.validation.classify`` (the same verdict ``phasewatch validate`` would give),
once its size and mtime held still over two polls (a collector may still be copying it),
and at most ``classify_per_poll`` per poll, newly shipped ones first, so a big store with
no index costs a Pi a steady trickle rather than a stall.

Stat polling every few seconds; synchronous ``poll()`` meant for a worker thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from schema.events import Episode, HostSummary, Snapshot, StatusCounts
from schema.reader import read_episode
from schema.validation import IndexRecord, index_record, read_index
from schema.vocab import INDEX_NAME, STATUSES, sidecar_path

log = logging.getLogger("edge.storewatch")


@dataclass
class _Archive:
    rel: str
    host: str
    bytes: int
    mtime_ns: int
    stable: int = 0  # polls with the same size and mtime
    record: IndexRecord | None = None


@dataclass
class StoreUpdate:
    snapshot: Snapshot | None = None  # set when anything changed (and on the first poll)
    episodes: list[Episode] = field(default_factory=list)


class StoreWatcher:
    def __init__(self, store: Path, *, index: Path | None = None, classify_per_poll: int = 8) -> None:
        self.store = Path(store)
        self.index_path = index or self.store / INDEX_NAME
        self.classify_per_poll = classify_per_poll
        self.archives: dict[str, _Archive] = {}
        self._index: dict[str, IndexRecord] = {}
        self._index_mtime: int | None = None
        self._first = True
        self.index_error: str | None = None
        self._t_start = time.time_ns()  # archives modified since then are "newly shipped"
        self._host_mtime: dict[str, int] = {}

    def poll(self) -> StoreUpdate:
        """One pass. A host directory is listed again only when its mtime moved (an archive
        was added, renamed in or removed); otherwise only its unsettled archives are stat'ed,
        so a quiet 76k-archive store costs one stat per host per poll."""
        up = StoreUpdate()
        changed = self._read_index()
        now_ns = time.time_ns()
        hosts = {d.name: d for d in _dirs(self.store)}
        for rel in [r for r, a in self.archives.items() if a.host not in hosts]:
            del self.archives[rel]
            changed = True
        for host, host_dir in hosts.items():
            try:
                m = os.stat(host_dir).st_mtime_ns
            except FileNotFoundError:
                continue
            if self._host_mtime.get(host) != m or now_ns - m < 2_000_000_000:
                self._host_mtime[host] = m
                names = [e.name for e in _files(host_dir) if e.name.endswith(".tar.zst")]
                listed = {f"{host}/{n}" for n in names}
                for rel in [r for r, a in self.archives.items() if a.host == host and r not in listed]:
                    del self.archives[rel]
                    changed = True
            else:
                names = [
                    a.rel.split("/", 1)[1]
                    for a in self.archives.values()
                    if a.host == host and a.record is None
                ]
            for name in names:
                rel = f"{host}/{name}"
                try:
                    st = os.stat(host_dir / name)
                except FileNotFoundError:
                    continue
                a = self.archives.get(rel)
                if a is None:
                    a = self.archives[rel] = _Archive(rel, host, st.st_size, st.st_mtime_ns)
                    changed = True
                elif (a.bytes, a.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    a.bytes, a.mtime_ns, a.stable, a.record = st.st_size, st.st_mtime_ns, 0, None
                    changed = True
                else:
                    a.stable += 1
                rec = self._index.get(rel)
                if (
                    a.record is None
                    and rec is not None
                    and (rec.bytes, rec.mtime_ns) in ((a.bytes, a.mtime_ns), (a.bytes, 0))
                ):
                    a.record = rec
        # Classify what the index does not cover: newly shipped first, then the backlog.
        todo = [a for a in self.archives.values() if a.record is None and a.stable >= 1]
        todo.sort(key=lambda a: (a.mtime_ns < self._t_start, -a.mtime_ns))
        for a in todo[: self.classify_per_poll]:
            a.record = self._classify(a)
            changed = True
            if a.mtime_ns >= self._t_start:
                up.episodes.append(_episode_event(a.record))
        if changed or self._first:
            up.snapshot = self.snapshot()
        self._first = False
        return up

    def _read_index(self) -> bool:
        try:
            m = os.stat(self.index_path).st_mtime_ns
        except FileNotFoundError:
            return False
        if m == self._index_mtime:
            return False
        self._index_mtime = m
        try:
            records = read_index(self.index_path)
        except (ValueError, OSError) as e:
            self.index_error = str(e)
            log.warning("%s", e)
            return False
        self.index_error = None
        self._index = {r.path: r for r in records}
        for a in self.archives.values():
            a.record = None  # re-match against the new index
        self._host_mtime.clear()
        return True

    def _classify(self, a: _Archive) -> IndexRecord:
        path = self.store / a.rel
        sidecar = sidecar_path(path)
        try:
            side_m: int | None = os.stat(sidecar).st_mtime_ns
        except FileNotFoundError:
            side_m = None
        ep = read_episode(path)
        return index_record(ep, a.rel, mtime_ns=a.mtime_ns, sidecar_mtime_ns=side_m)

    def snapshot(self) -> Snapshot:
        hosts: dict[str, HostSummary] = {}
        totals = {s: 0 for s in STATUSES}
        total_bytes = 0
        for a in self.archives.values():
            h = hosts.get(a.host)
            if h is None:
                h = hosts[a.host] = HostSummary(host=a.host)
            h.bytes += a.bytes
            total_bytes += a.bytes
            h.last_seen_ns = max(h.last_seen_ns or 0, a.mtime_ns)
            if a.record is not None and a.record.status in totals:
                setattr(h, a.record.status, getattr(h, a.record.status) + 1)
                totals[a.record.status] += 1
        return Snapshot(
            hosts=[hosts[k] for k in sorted(hosts)],
            totals=StatusCounts(**totals),
            total_bytes=total_bytes,
            t_ns=time.time_ns(),
        )


def _episode_event(r: IndexRecord) -> Episode:
    return Episode(
        episode_id=r.episode_id,
        host=r.host,
        profile=r.profile,
        status=r.status,
        duration_s=max(0.0, r.duration_s),
        bytes=max(0, r.bytes),
        reasons=list(r.reasons) or None,
    )


def _dirs(d: Path) -> list[Path]:
    try:
        return sorted(
            Path(e.path)
            for e in os.scandir(d)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )
    except FileNotFoundError:
        return []


def _files(d: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted((e for e in os.scandir(d) if e.is_file(follow_symlinks=False)), key=lambda e: e.name)
    except FileNotFoundError:
        return []
