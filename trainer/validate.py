"""`phasewatch validate STORE [--index PATH] [--json] [--jobs N]`: the validation sweep.

Every archive under `<store>/<host>/*.tar.zst` gets one status and its reason codes
(schema.validation), the per-episode acceptance index is written atomically, and a
summary goes to stdout (a table, or with --json one JSON object and nothing else; the
progress bar is on stderr). Archives are read in a process pool over all cores; an
archive whose size, mtime and sidecar match its record in the old index is not re-read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from schema.reader import read_episode
from schema.validation import (
    VALIDATOR_VERSION,
    IndexRecord,
    crash_record,
    index_record,
    read_index,
    write_index_atomic,
)
from schema.vocab import INDEX_NAME, STATUSES, sidecar_path
from trainer.workers import worker_pool


@dataclass
class SweepResult:
    records: list[IndexRecord]
    index_path: Path
    elapsed_s: float
    read: int = 0  # archives read this run
    reused: int = 0  # archives whose old record was kept
    rows_read: int = 0  # telemetry rows decoded this run
    counts: dict[str, int] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self, top: int = 10) -> dict[str, object]:
        total = len(self.records)
        return {
            "store_index": str(self.index_path),
            "archives": total,
            "counts": {s: self.counts.get(s, 0) for s in STATUSES},
            "share": {s: round(self.counts.get(s, 0) / total, 4) if total else 0.0 for s in STATUSES},
            "reasons": dict(self.reasons.most_common(top)),
            "read": self.read,
            "reused": self.reused,
            "rows_read": self.rows_read,
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s": round(self.rows_read / self.elapsed_s) if self.elapsed_s > 0 else 0,
            "bytes": sum(r.bytes for r in self.records),
        }


def find_archives(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("*/*.tar.zst") if p.is_file())


def _stat(path: Path) -> tuple[int, int, int | None]:
    st = path.stat()
    try:
        side: int | None = sidecar_path(path).stat().st_mtime_ns
    except FileNotFoundError:
        side = None
    return st.st_size, st.st_mtime_ns, side


def validate_one(path: Path, rel: str) -> IndexRecord:
    """Read and classify one archive; whatever goes wrong becomes an errored record."""
    size = mtime = 0
    side: int | None = None
    try:
        size, mtime, side = _stat(path)
        ep = read_episode(path)
        return index_record(ep, rel, mtime_ns=mtime, sidecar_mtime_ns=side)
    except Exception as exc:
        return crash_record(path, rel, exc, mtime_ns=mtime, nbytes=size, sidecar_mtime_ns=side)


def _reusable(old: IndexRecord | None, size: int, mtime: int, side: int | None) -> bool:
    return (
        old is not None
        and old.validator_version == VALIDATOR_VERSION
        and old.bytes == size
        and old.mtime_ns == mtime
        and old.sidecar_mtime_ns == side
        and "reader_crash" not in old.reasons
    )


def _load_old(index_path: Path) -> dict[str, IndexRecord]:
    try:
        return {r.path: r for r in read_index(index_path)}
    except (FileNotFoundError, ValueError):
        return {}  # no usable old index: everything is read again


def _run_isolated(path: Path, rel: str) -> IndexRecord:
    """Retry of an archive whose pool died under it, alone in a fresh process: if the
    process dies again the archive itself is the culprit."""
    with worker_pool(1) as ex:
        try:
            return ex.submit(validate_one, path, rel).result()
        except BrokenProcessPool as exc:
            return crash_record(path, rel, RuntimeError(f"worker process died: {exc}"))


def validate_store(
    store: Path | str,
    index_path: Path | str | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> SweepResult:
    store = Path(store)
    if not store.is_dir():
        raise FileNotFoundError(f"store {store} is not a directory")
    index = Path(index_path) if index_path is not None else store / INDEX_NAME
    t0 = time.perf_counter()
    old = _load_old(index)
    archives = find_archives(store)
    records: dict[str, IndexRecord] = {}
    todo: list[tuple[Path, str]] = []
    for p in archives:
        rel = p.relative_to(store).as_posix()
        try:
            size, mtime, side = _stat(p)
        except OSError:
            todo.append((p, rel))
            continue
        prev = old.get(rel)
        if prev is not None and _reusable(prev, size, mtime, side):
            records[rel] = prev
        else:
            todo.append((p, rel))
    reused = len(records)

    jobs = jobs or os.cpu_count() or 1
    bar = tqdm(
        total=len(archives),
        initial=reused,
        unit="ep",
        desc="validate",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    retry: list[tuple[Path, str]] = []
    rows_read = 0
    if todo:
        with worker_pool(min(jobs, len(todo))) as ex:
            # A bounded number in flight: 76k futures at once would hold 76k results.
            pending: dict[Future[IndexRecord], tuple[Path, str]] = {}
            it = iter(todo)
            broken = False

            def submit_more() -> None:
                nonlocal broken
                while not broken and len(pending) < jobs * 4:
                    item = next(it, None)
                    if item is None:
                        return
                    try:
                        pending[ex.submit(validate_one, *item)] = item
                    except BrokenProcessPool:
                        broken = True
                        retry.append(item)

            submit_more()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    item = pending.pop(fut)
                    try:
                        rec = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        retry.append(item)
                        continue
                    records[item[1]] = rec
                    rows_read += sum(rec.rows.values())
                    bar.update(1)
                    bar.set_postfix_str(
                        f"{rows_read / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s", refresh=False
                    )
                submit_more()
            if broken:
                retry.extend(it)
    for p, rel in retry:  # after a worker died (OOM, segfault): one by one, in isolation
        rec = _run_isolated(p, rel)
        records[rel] = rec
        rows_read += sum(rec.rows.values())
        bar.update(1)
    bar.close()

    ordered = [records[k] for k in sorted(records)]
    write_index_atomic(index, ordered)
    counts = Counter(r.status for r in ordered)
    reasons = Counter(c for r in ordered for c in r.reasons)
    return SweepResult(
        records=ordered,
        index_path=index,
        elapsed_s=time.perf_counter() - t0,
        read=len(ordered) - reused,
        reused=reused,
        rows_read=rows_read,
        counts=dict(counts),
        reasons=reasons,
    )


def format_summary(res: SweepResult, top: int = 10) -> str:
    s = res.summary(top)
    total = len(res.records)
    lines = [f"{'status':<10} {'count':>8} {'share':>7}"]
    for st in STATUSES:
        n = res.counts.get(st, 0)
        lines.append(f"{st:<10} {n:>8} {n / total if total else 0:>7.1%}")
    lines.append(f"{'total':<10} {total:>8}")
    if res.reasons:
        lines += ["", f"{'reason':<22} {'archives':>8}"]
        lines += [f"{code:<22} {n:>8}" for code, n in res.reasons.most_common(top)]
    lines += [
        "",
        f"read {res.read}, reused {res.reused}, {s['rows_read']:,} rows in {res.elapsed_s:.1f} s "
        f"({s['rows_per_s']:,} rows/s); index {res.index_path}",
    ]
    return "\n".join(lines)


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="receiver store: <store>/<host>/<episode>.tar.zst")
    p.add_argument(
        "--index", type=Path, default=None, help=f"acceptance index (default <store>/{INDEX_NAME})"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cli_validate(args: argparse.Namespace) -> int:
    try:
        res = validate_store(args.store, args.index, jobs=args.jobs, progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"phasewatch validate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.summary(), sort_keys=True))
    else:
        print(format_summary(res))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="phasewatch validate", description=__doc__.splitlines()[0])
    add_validate_arguments(p)
    return cli_validate(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
