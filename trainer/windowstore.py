"""The window store: one shard of extracted windows per archive, keyed by (archive sha256, schema hash).

    <cache>/windows/<schema hash[:16]>/shards/<sha[:2]>/<sha256>/
        tensor.npy   float32 (n, 46, 100)   read with numpy.load(mmap_mode="r")
        summary.npy  float32 (n, 46 * k)
        meta.npz     y, window, coverage, finite (per threat model), skipped counts, error
    <cache>/windows/<schema hash[:16]>/tables/<key>.npz   the window table of one set of archives

A shard is written in a directory of its own beside its final place and renamed into it,
so it is whole or absent: a run killed mid-extraction loses only the shards in flight and
the next run extracts only what is missing. Workers write their shards themselves and send
the parent a few numbers; the parent never holds an episode. A new archive extracts only
itself, a removed one drops out of the table, a changed one (new sha256) or a new schema
hash extracts again; ``phasewatch cache gc`` deletes what no current archive uses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schema import extract
from schema.channels import N_CHANNELS, SUMMARY_STATS, WINDOW_STEPS, view_channels
from schema.hashing import schema_hash
from schema.vocab import INDEX_NAME, THREAT_MODELS
from trainer.workers import worker_pool

LAYOUT = "windows"  # <cache>/windows/<schema>/...
ARRAYS = ("tensor", "summary")
META = "meta.npz"
TMP_MARK = ".tmp-"  # <sha>.tmp-<pid>-<random>: a shard being written
KEEP_TABLES = 4  # window tables kept per schema hash (the newest)
K_STATS = len(SUMMARY_STATS)


def schema_root(cache: Path, schema: str | None = None) -> Path:
    return Path(cache) / LAYOUT / (schema or schema_hash())[:16]


def shard_dir(root: Path, sha: str) -> Path:
    return root / "shards" / sha[:2] / sha


def is_complete(d: Path) -> bool:
    return (d / META).is_file()


# --- writing one shard (runs in a worker) --------------------------------------------------


@dataclass(frozen=True)
class ShardStat:
    windows: int
    telemetry_rows: int
    error: str = ""


def _write_atomic_dir(final: Path, files: dict[str, dict[str, np.ndarray] | np.ndarray]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP_MARK}{os.getpid()}-", dir=final.parent))
    try:
        for name, value in files.items():
            if isinstance(value, dict):
                np.savez(tmp / name, **value)
            else:
                np.save(tmp / name, value, allow_pickle=False)
        try:
            os.rename(tmp, final)
        except OSError:  # another run wrote it first; theirs is the same windows
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def extract_shard(path: str, sha: str, root: str) -> ShardStat:
    """Read one archive, extract its labelled windows and write its shard. Never raises for a
    bad archive: the shard then holds no windows and the error, so it is not retried until
    the archive changes."""
    from schema.reader import read_episode

    final = shard_dir(Path(root), sha)
    skipped: dict[str, int] = {}
    rows = 0
    error = ""
    try:
        ep = read_episode(Path(path))
        rows = sum(len(c.t_wall_ns) for c in ep.streams.values())
        ew = extract.extract_episode(ep)
        keep = ew.labels >= 0
        skipped = dict(ew.skipped)
        skipped["unlabelled"] = int((~keep).sum())
        tensor = np.ascontiguousarray(ew.tensor[keep], np.float32)
        labels, windows, coverage = ew.labels[keep], ew.windows[keep], ew.coverage[keep]
    except Exception as exc:  # one bad archive never stops the sweep
        error = f"{type(exc).__name__}: {exc}"
        tensor = np.zeros((0, N_CHANNELS, WINDOW_STEPS), np.float32)
        labels, windows, coverage = np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, 4), np.float32)
        skipped = {"extract_error": 1}
    summary = extract.summarize(tensor) if len(tensor) else np.zeros((0, N_CHANNELS * K_STATS), np.float32)
    finite = np.stack(
        [np.isfinite(tensor[:, list(view_channels(t)), :]).all(axis=(1, 2)) for t in THREAT_MODELS], axis=1
    )
    meta = {
        "y": labels.astype(np.int8),
        "window": windows.astype(np.int32),
        "coverage": coverage.astype(np.float32),
        "finite": finite.reshape(len(tensor), len(THREAT_MODELS)),
        "skipped_names": np.array(sorted(skipped), dtype=str),
        "skipped_counts": np.array([skipped[k] for k in sorted(skipped)], np.int64),
        "error": np.array(error),
        "telemetry_rows": np.array(rows, np.int64),
    }
    _write_atomic_dir(final, {"tensor.npy": tensor, "summary.npy": summary, META: meta})
    return ShardStat(len(tensor), rows, error)


# --- the sweep ----------------------------------------------------------------------------


@dataclass
class BuildResult:
    archives: int
    extracted: int  # shards written this run
    reused: int  # shards already on disk
    failed: list[str] = field(default_factory=list)  # "path: error"
    telemetry_rows: int = 0
    windows: int = 0
    seconds: float = 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partial(root: Path) -> int:
    """Remove shards half-written by runs that died (their pid is gone); returns how many."""
    n = 0
    for d in (root / "shards").glob(f"*/*{TMP_MARK}*"):
        try:
            pid = int(d.name.split(TMP_MARK, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            pid = -1
        if pid < 0 or not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def build_shards(
    store: Path,
    items: Sequence[tuple[str, str]],
    root: Path,
    jobs: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Make sure every (archive path relative to the store, sha256) has its shard under ``root``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    clean_partial(root)
    todo = [(p, s) for p, s in items if not is_complete(shard_dir(root, s))]
    res = BuildResult(len(items), 0, len(items) - len(todo))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(
        total=len(items),
        initial=res.reused,
        desc="extract",
        unit="ep",
        file=sys.stderr,
        disable=not progress or not todo,
        dynamic_ncols=True,
        smoothing=0.05,
    )

    def done(rel: str, st: ShardStat) -> None:
        res.extracted += 1
        res.telemetry_rows += st.telemetry_rows
        res.windows += st.windows
        if st.error:
            res.failed.append(f"{rel}: {st.error}")
            bar.write(f"extract: {store / rel}: skipped ({st.error})", file=sys.stderr)
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix_str(
            f"{res.telemetry_rows / dt:,.0f} rows/s, {res.windows / dt:,.0f} windows/s", refresh=False
        )

    try:
        if jobs == 1:  # in this process: no pool to start, and tests can watch it
            for rel, sha in todo:
                done(rel, extract_shard(str(store / rel), sha, str(root)))
        elif todo:
            with worker_pool(jobs) as ex:
                pending: dict[Future[ShardStat], str] = {}
                it = iter(todo)
                while True:
                    while len(pending) < 2 * jobs and (item := next(it, None)) is not None:
                        pending[ex.submit(extract_shard, str(store / item[0]), item[1], str(root))] = item[0]
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        rel = pending.pop(fut)
                        try:
                            done(rel, fut.result())
                        except BrokenProcessPool:
                            from trainer.errors import DatasetError

                            raise DatasetError(
                                f"{store / rel}: an extraction worker died (out of memory?); the shards "
                                f"written so far are kept and the next run resumes (or use --jobs 1)"
                            ) from None
    finally:
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res


# --- reading ------------------------------------------------------------------------------


def read_meta(d: Path) -> dict[str, np.ndarray]:
    with np.load(d / META, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def open_array(d: Path, kind: str) -> np.ndarray:
    """A shard's array, memory-mapped: only the pages of the rows read come in."""
    return np.load(d / f"{kind}.npy", mmap_mode="r", allow_pickle=False)


class StoreRows:
    """Rows of the window store (global window ids ``ids``) in a threat model's view (None: all channels)."""

    def __init__(
        self,
        dirs: Sequence[Path],
        shard: np.ndarray,
        row: np.ndarray,
        ids: np.ndarray,
        threat: str | None,
        kind: str,
    ) -> None:
        if kind not in ARRAYS:
            raise ValueError(f"unknown input kind {kind!r}: use tensor or summary")
        ids = np.asarray(ids, np.int64)
        self.dirs, self.kind, self.threat = dirs, kind, threat
        self._shard, self._row = shard[ids], row[ids]
        self.groups = self._shard
        self.chans = list(view_channels(threat)) if threat is not None else list(range(N_CHANNELS))
        self.row_shape = (len(self.chans), WINDOW_STEPS) if kind == "tensor" else (len(self.chans) * K_STATS,)

    def __len__(self) -> int:
        return len(self._shard)

    def take(self, pos: np.ndarray) -> np.ndarray:
        """Rows ``pos`` (positions in this set), read shard after shard; each map is closed after use."""
        pos = np.asarray(pos, np.int64)
        out = np.empty((len(pos), *self.row_shape), np.float32)
        if not len(pos):
            return out
        sh = self._shard[pos]
        order = np.argsort(sh, kind="stable")
        cuts = np.flatnonzero(np.diff(sh[order])) + 1
        for part in np.split(order, cuts):
            mm = open_array(self.dirs[int(sh[part[0]])], self.kind)
            block = mm[self._row[pos[part]]]  # (k, 46, 100) or (k, 46 * K): a copy
            del mm
            if self.threat is None:
                out[part] = block
            elif self.kind == "tensor":
                out[part] = block[:, self.chans, :]
            else:
                out[part] = extract.view(block, self.threat, "summary")
        return out


# --- gc -----------------------------------------------------------------------------------


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def gc(cache: Path, keep_shas: Iterable[str], dry_run: bool = False) -> tuple[int, int]:
    """Delete shards of other schema hashes, of archives not in ``keep_shas``, half-written
    shards of dead runs and old tables. Returns (entries removed, bytes freed)."""
    keep = set(keep_shas)
    base = Path(cache) / LAYOUT
    current = schema_root(cache).name
    n = freed = 0

    def drop(p: Path) -> None:
        nonlocal n, freed
        freed += dir_bytes(p) if p.is_dir() else p.stat().st_size
        n += 1
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    for sdir in sorted(base.glob("*")) if base.is_dir() else []:
        if sdir.name != current:
            drop(sdir)
            continue
        for d in sorted(sdir.glob("shards/*/*")):
            if TMP_MARK in d.name:
                pid = d.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
                if not (pid.isdigit() and _pid_alive(int(pid))):
                    drop(d)
            elif d.name not in keep:
                drop(d)
        tables = sorted((sdir / "tables").glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for t in tables[KEEP_TABLES:]:
            drop(t)
    return n, freed


# --- CLI: phasewatch cache gc | build ------------------------------------------------------


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("gc", "build"), help="gc: delete stale shards; build: extract now")
    p.add_argument(
        "--store", type=Path, default=Path("data/store"), help="receiver store (default data/store)"
    )
    p.add_argument("--index", type=Path, default=None, help="acceptance index (default <store>/index.jsonl)")
    p.add_argument("--cache", type=Path, default=None, help="window store (default: next to the index)")
    p.add_argument("--jobs", type=int, default=None, help="extraction workers (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="gc: say what would go, delete nothing")


def cli_cache(args: argparse.Namespace) -> int:
    from trainer.dataset import default_cache, load_windows, usable_records

    index = args.index or args.store / INDEX_NAME
    cache = args.cache or default_cache(index)
    if not Path(index).is_file():
        from trainer.errors import DatasetError

        raise DatasetError(f"{index}: no acceptance index; run `phasewatch validate {args.store}` first")
    if args.action == "build":
        ws = load_windows(args.store, index, cache_dir=cache, jobs=args.jobs)
        print(f"cache: {len(ws)} windows of {ws.n_episodes} episodes in {schema_root(cache)}")
        return 0
    records = usable_records(index)
    n, freed = gc(cache, (r["sha256"] for r in records), dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    print(f"cache gc: {n} stale entries, {verb} {freed / 1e6:.1f} MB under {Path(cache) / LAYOUT}")
    return 0
