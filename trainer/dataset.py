"""Windows of the accepted episodes, the window store on disk, and the splits.

ws = load_windows(store, index)          # extracts what is missing, then a table of every window
split = make_split(ws, "host", seed=0)   # held-out host / sample / time
x = ws.rows("realistic", "tensor", split.train)   # trainer.rows.Rows: read in batches, not all at once

In RAM the trainer holds only the window table (about 80 bytes a window: episode, host,
profile, sample, label, window number, coverage, time rank, where its arrays live); the
arrays stay in the per-archive shards of trainer.windowstore, memory-mapped when read.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from schema import extract
from schema.channels import MIN_COVERAGE, N_CHANNELS, SUMMARY_STATS, WINDOW_STEPS
from schema.hashing import schema_hash
from schema.validation import read_index
from schema.vocab import INDEX_NAME, SOURCES, THREAT_MODELS, THREAT_SOURCES
from trainer import windowstore as wst
from trainer.errors import DatasetError
from trainer.rows import ArrayRows

# Episodes the trainer learns from; rejected and errored never reach it.
USABLE_STATUSES = ("accepted", "degraded")
CLEAN_ONLY = "none"  # profile and sample of an episode with no malware
# export's envelopes and projectors read a bounded, profile-stratified sample of episodes
CORPUS_SAMPLE_EPISODES = 300


def _coverage_mask(coverage: np.ndarray, threat_model: str) -> np.ndarray:
    need = [SOURCES.index(s) for s in THREAT_SOURCES[threat_model]]
    return (coverage[:, need] >= MIN_COVERAGE).all(axis=1)


@dataclass
class WindowSet:
    """Windows held in memory (tests, export's bounded corpus sample)."""

    tensor: np.ndarray  # float32 (N, 46, 100)
    summary: np.ndarray  # float32 (N, 46 * k)
    coverage: np.ndarray  # float32 (N, 4)
    y: np.ndarray  # int64 (N,) phase index
    episode: np.ndarray  # str (N,)
    host: np.ndarray  # str (N,)
    profile: np.ndarray  # str (N,), CLEAN_ONLY for clean-only episodes
    sample: np.ndarray  # str (N,)
    t_rank: np.ndarray  # float64 (N,), the episode's start time rank in the store, 0..1
    window: np.ndarray  # int32 (N,) window number inside its episode
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def mask(self, threat_model: str) -> np.ndarray:
        """Windows where every source the threat model needs has data."""
        return _coverage_mask(self.coverage, threat_model)

    def finite(self, threat_model: str) -> np.ndarray:
        """Windows whose threat-model view holds no NaN or inf (in either input kind)."""
        ok = np.isfinite(self.view(threat_model, "tensor").reshape(len(self), -1)).all(axis=1)
        return ok & np.isfinite(self.view(threat_model, "summary")).all(axis=1)

    def view(self, threat_model: str, kind: str) -> np.ndarray:
        return extract.view(self.tensor if kind == "tensor" else self.summary, threat_model, kind)

    def rows(self, threat_model: str | None, kind: str, idx: np.ndarray) -> ArrayRows:
        """Windows ``idx`` in a threat model's view (None: full width, all 46 channels)."""
        idx = np.asarray(idx, np.int64)
        full = self.tensor if kind == "tensor" else self.summary
        x = full[idx] if threat_model is None else self.view(threat_model, kind)[idx]
        return ArrayRows(x, groups=np.asarray(self.episode)[idx])

    def subset(self, idx: np.ndarray) -> WindowSet:
        arrays = {f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "skipped"}
        return WindowSet(**arrays, skipped=dict(self.skipped))


_TABLE = ("y", "window", "coverage", "finite")  # per-window columns read from the shards


@dataclass
class StoreWindows:
    """The window table of a store; the arrays stay on disk in trainer.windowstore shards."""

    y: np.ndarray  # int64 (N,)
    episode: np.ndarray  # object (N,): one shared str per episode
    host: np.ndarray
    profile: np.ndarray
    sample: np.ndarray
    t_rank: np.ndarray  # float64 (N,)
    window: np.ndarray  # int32 (N,)
    coverage: np.ndarray  # float32 (N, 4)
    finite_: np.ndarray  # bool (N, len(THREAT_MODELS)): the view has no NaN
    shard: np.ndarray  # int32 (N,): which of `dirs`
    row: np.ndarray  # int32 (N,): row inside the shard
    dirs: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_episodes(self) -> int:
        return len(np.unique(self.shard))

    def mask(self, threat_model: str) -> np.ndarray:
        return _coverage_mask(self.coverage, threat_model)

    def finite(self, threat_model: str) -> np.ndarray:
        return self.finite_[:, THREAT_MODELS.index(threat_model)]

    def rows(self, threat_model: str | None, kind: str, idx: np.ndarray) -> wst.StoreRows:
        """Windows ``idx`` in a threat model's view (None: full width), read from the shards on demand."""
        return wst.StoreRows(self.dirs, self.shard, self.row, idx, threat_model, kind)

    def disk_bytes(self) -> int:
        return sum(
            (d / f"{k}.npy").stat().st_size
            for d in set(self.dirs[i] for i in np.unique(self.shard))
            for k in wst.ARRAYS
        )

    def sample_episodes(self, max_episodes: int = CORPUS_SAMPLE_EPISODES, seed: int = 0) -> np.ndarray:
        """Window indices of at most ``max_episodes`` episodes, the same share of each profile."""
        eps, first = np.unique(self.shard, return_index=True)
        if len(eps) <= max_episodes:
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        prof = self.profile[first]
        chosen: list[np.ndarray] = []
        for p in sorted(set(prof)):
            group = eps[prof == p]
            k = max(1, round(len(group) * max_episodes / len(eps)))
            chosen.append(rng.choice(group, size=min(k, len(group)), replace=False))
        return np.flatnonzero(np.isin(self.shard, np.concatenate(chosen)))

    def materialize(self, idx: np.ndarray | None = None) -> WindowSet:
        """These windows (all of them by default) as an in-memory WindowSet, full width."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, np.int64)
        tensor = np.empty((len(idx), N_CHANNELS, WINDOW_STEPS), np.float32)
        summary = np.empty((len(idx), N_CHANNELS * len(SUMMARY_STATS)), np.float32)
        sh, rw = self.shard[idx], self.row[idx]
        for s in np.unique(sh):
            at = np.flatnonzero(sh == s)
            for name, out in (("tensor", tensor), ("summary", summary)):
                mm = wst.open_array(self.dirs[int(s)], name)
                out[at] = mm[rw[at]]
                del mm
        return WindowSet(
            tensor=tensor,
            summary=summary,
            coverage=self.coverage[idx],
            y=self.y[idx],
            episode=self.episode[idx].astype(str),
            host=self.host[idx].astype(str),
            profile=self.profile[idx].astype(str),
            sample=self.sample[idx].astype(str),
            t_rank=self.t_rank[idx],
            window=self.window[idx],
            skipped=dict(self.skipped),
        )


def _records(store: Path, index: Path) -> list[dict]:
    if not store.is_dir():
        raise DatasetError(f"{store}: not a store directory (<store>/<host>/*.tar.zst); check --store")
    try:
        raw = read_index(index)
    except FileNotFoundError:
        raise DatasetError(
            f"{index}: no acceptance index (run `phasewatch validate {store}` first)"
        ) from None
    except PermissionError as e:
        raise DatasetError(
            f"{index}: not readable by this user ({e.strerror}); fix its permissions"
        ) from None
    except ValueError as e:
        raise DatasetError(f"{e} (run `phasewatch validate {store}` again)") from None
    recs = [r if isinstance(r, dict) else _to_dict(r) for r in raw]
    return sorted((r for r in recs if r["status"] in USABLE_STATUSES), key=lambda r: r["path"])


def usable_records(index: Path) -> list[dict]:
    return _records(Path(index).parent, Path(index))


def _to_dict(rec) -> dict:
    import msgspec

    return msgspec.to_builtins(rec)


def cache_key(records: list[dict]) -> str:
    h = hashlib.sha256(schema_hash().encode())
    for r in records:
        h.update(f"{r['path']}\0{r['sha256']}\0{r['status']}\n".encode())
    return h.hexdigest()[:24]


def default_cache(index: Path) -> Path:
    return Path(index).parent / "cache"


def _table_from_shards(root: Path, records: list[dict]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _TABLE}
    n_per, names, counts = [], [], []
    for r in records:
        meta = wst.read_meta(wst.shard_dir(root, r["sha256"]))
        for k in _TABLE:
            parts[k].append(meta[k])
        n_per.append(len(meta["y"]))
        names.extend(meta["skipped_names"].tolist())
        counts.extend(meta["skipped_counts"].tolist())
    table = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    table["n_per"] = np.array(n_per, np.int64)
    skipped: Counter[str] = Counter()
    for name, c in zip(names, counts):
        skipped[name] += int(c)
    table["skipped_names"] = np.array(sorted(skipped), dtype=str)
    table["skipped_counts"] = np.array([skipped[k] for k in sorted(skipped)], np.int64)
    return table


def _load_table(root: Path, records: list[dict], reuse: bool = True) -> dict[str, np.ndarray]:
    """The window table of these records: one file when this set was seen before (and no shard
    was written since), else gathered from the shards' metadata."""
    path = root / "tables" / f"{cache_key(records)}.npz"
    try:
        if not reuse:
            raise FileNotFoundError(path)
        with np.load(path, allow_pickle=False) as z:
            table = {k: z[k] for k in z.files}
        if len(table["n_per"]) == len(records):
            os.utime(path)
            return table
    except (OSError, ValueError, KeyError):
        pass
    table = _table_from_shards(root, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + wst.TMP_MARK, suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, **table)
    os.replace(tmp, path)
    return table


def load_windows(
    store: Path,
    index: Path | None = None,
    cache_dir: Path | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> StoreWindows:
    """The window table of every labelled window of the store's accepted and degraded episodes;
    archives without a shard under the current schema hash are extracted first."""
    store = Path(store)
    index = Path(index) if index else store / INDEX_NAME
    records = _records(store, index)
    if not records:
        raise DatasetError(
            f"{index}: no accepted or degraded episodes to learn from (run `phasewatch validate` first)"
        )
    cache = Path(cache_dir) if cache_dir else default_cache(index)
    root = wst.schema_root(cache)
    built = wst.build_shards(store, [(r["path"], r["sha256"]) for r in records], root, jobs, progress)
    table = _load_table(root, records, reuse=built.extracted == 0)
    n_per = table["n_per"]
    starts = np.array([r.get("started_ns") or 0 for r in records], dtype=np.float64)
    rank = np.argsort(np.argsort(starts, kind="stable"), kind="stable") / max(len(records) - 1, 1)

    def per_episode(values: list) -> np.ndarray:
        arr = np.empty(len(values), dtype=object)
        arr[:] = [sys.intern(str(v)) for v in values]
        return np.repeat(arr, n_per)

    ws = StoreWindows(
        y=table["y"].astype(np.int64),
        episode=per_episode([r["episode_id"] for r in records]),
        host=per_episode([r["host"] for r in records]),
        profile=per_episode([r.get("profile") or CLEAN_ONLY for r in records]),
        sample=per_episode([r.get("sample") or CLEAN_ONLY for r in records]),
        t_rank=np.repeat(rank, n_per),
        window=table["window"].astype(np.int32),
        coverage=table["coverage"].astype(np.float32).reshape(-1, len(SOURCES)),
        finite_=table["finite"].astype(bool).reshape(-1, len(THREAT_MODELS)),
        shard=np.repeat(np.arange(len(records), dtype=np.int32), n_per),
        row=np.concatenate([np.arange(n, dtype=np.int32) for n in n_per])
        if len(n_per)
        else np.zeros(0, np.int32),
        dirs=[wst.shard_dir(root, r["sha256"]) for r in records],
        skipped=dict(zip(table["skipped_names"].tolist(), table["skipped_counts"].tolist())),
        root=root,
    )
    if progress:
        print(
            f"features: {len(ws)} windows from {len(records)} episodes "
            f"({built.extracted} extracted now, {built.reused} from the window store {root}); "
            f"skipped {ws.skipped}"
        )
    return ws


# --- splits ------------------------------------------------------------------------


@dataclass
class Split:
    kind: str
    train: np.ndarray  # window indices
    val: np.ndarray
    test: np.ndarray
    untested_profiles: list[str]
    description: str
    test_groups: list[str] = field(default_factory=list)  # hosts or samples held out

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "description": self.description,
            "test_groups": self.test_groups,
            "untested_profiles": self.untested_profiles,
            "windows": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


def _episodes_split(
    ws: _Episodes, eps: np.ndarray, share: float, rng: np.random.Generator
) -> tuple[set, set]:
    """Split episodes (not windows) into two groups, stratified by profile."""
    ep_profile = {e: p for e, p in zip(ws.episode, ws.profile)}
    a: set = set()
    by_profile: dict[str, list] = {}
    for e in sorted(set(eps)):
        by_profile.setdefault(ep_profile[e], []).append(e)
    for group in by_profile.values():
        rng.shuffle(group)
        k = max(1, round(len(group) * share)) if len(group) > 1 else 0
        a.update(group[:k])
    return a, set(eps) - a


def _finish(
    ws: _Episodes,
    kind: str,
    test_eps: set,
    rest_eps: np.ndarray,
    rng,
    desc: str,
    groups: list[str],
    val_eps: set | None = None,
) -> Split:
    if val_eps is None:
        val_eps, train_eps = _episodes_split(ws, rest_eps, 0.2, rng)
    else:
        train_eps = set(rest_eps) - val_eps
    test = np.flatnonzero(np.isin(ws.episode, list(test_eps)))
    val = np.flatnonzero(np.isin(ws.episode, list(val_eps)))
    train = np.flatnonzero(np.isin(ws.episode, list(train_eps)))
    assert not (set(ws.episode[test]) & set(ws.episode[train])), "an episode on both sides"
    assert not (set(ws.episode[test]) & set(ws.episode[val])), "an episode on both sides"
    untested = sorted(set(ws.profile[train]) - set(ws.profile[test]))
    return Split(kind, train, val, test, untested, desc, groups)


@dataclass
class _Episodes:
    """One row per episode, sorted by episode name: what a split decides on."""

    episode: np.ndarray
    host: np.ndarray
    profile: np.ndarray
    sample: np.ndarray
    t_rank: np.ndarray


def _episode_frame(ws: WindowSet | StoreWindows) -> tuple[_Episodes, np.ndarray]:
    """The episodes of ``ws`` and each window's row in that frame (integers, no string sort of
    millions of windows: a store-backed table already numbers its episodes by shard)."""
    if isinstance(ws, StoreWindows):
        _, first, pos = np.unique(ws.shard, return_index=True, return_inverse=True)
        names = ws.episode[first].astype(str)
        order = np.argsort(names, kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        code, first = rank[pos.ravel()], first[order]
    else:
        _, first, code = np.unique(np.asarray(ws.episode).astype(str), return_index=True, return_inverse=True)
        code = code.ravel()
    frame = _Episodes(
        *(np.asarray(getattr(ws, k))[first].astype(str) for k in ("episode", "host", "profile", "sample")),
        t_rank=np.asarray(ws.t_rank)[first],
    )
    return frame, code


def make_split(
    ws: WindowSet | StoreWindows, kind: str = "host", seed: int = 0, test_share: float = 0.3
) -> Split:
    """Held-out host / sample / time over episodes, then mapped to window indices (see _split)."""
    frame, code = _episode_frame(ws)
    sp = _split(frame, kind, seed, test_share)  # indices are rows of the frame: episodes

    def windows(eps: np.ndarray) -> np.ndarray:
        m = np.zeros(len(frame.episode), bool)
        m[eps] = True
        return np.flatnonzero(m[code])

    return Split(
        sp.kind,
        windows(sp.train),
        windows(sp.val),
        windows(sp.test),
        sp.untested_profiles,
        sp.description,
        sp.test_groups,
    )


def _split(ws: _Episodes, kind: str = "host", seed: int = 0, test_share: float = 0.3) -> Split:
    """Held-out host, held-out sample or held-out time; never an episode on both sides.

    host: the smallest set of hosts (~test_share of them) whose episodes cover every profile,
    chosen in a seeded order; a profile no such set covers is listed in untested_profiles.
    sample: one malware sample per profile held out, plus a share of clean-only episodes.
    time: the latest test_share of episodes by start time.
    Validation is a host of its own for the host split (when three or more hosts remain
    for training), else a profile-stratified 20 % of the remaining episodes."""
    rng = np.random.default_rng(seed)
    all_eps = np.unique(ws.episode)
    if kind == "host":
        hosts = sorted(set(ws.host))
        rng.shuffle(hosts)
        k = max(1, round(len(hosts) * test_share))
        profiles = set(ws.profile)
        best: tuple[int, tuple[str, ...]] = (-1, ())
        for combo in itertools.combinations(hosts, k):
            covered = len(set(ws.profile[np.isin(ws.host, combo)]))
            if covered > best[0]:
                best = (covered, combo)
            if covered == len(profiles):
                break
        test_hosts = list(best[1])
        test_eps = set(ws.episode[np.isin(ws.host, test_hosts)])
        rest = np.array(sorted(set(all_eps) - test_eps))
        # Early stopping on episodes of the training hosts rewards memorising those hosts;
        # a validation host of its own picks the checkpoint that travels to new hosts.
        others = [h for h in hosts if h not in test_hosts]
        val_eps = None
        desc = f"held-out hosts {', '.join(test_hosts)}"
        if len(others) >= 3:
            val_host = max(others, key=lambda h: len(set(ws.profile[ws.host == h])))
            val_eps = set(ws.episode[ws.host == val_host])
            desc += f"; validation host {val_host}"
        return _finish(ws, kind, test_eps, rest, rng, desc, test_hosts, val_eps)
    if kind == "sample":
        held: list[str] = []
        for prof in sorted(set(ws.profile) - {CLEAN_ONLY}):
            samples = sorted(set(ws.sample[ws.profile == prof]))
            if len(samples) > 1:  # a profile with one sample cannot be held out and still trained on
                held.append(samples[rng.integers(len(samples))])
        test_eps = set(ws.episode[np.isin(ws.sample, held)])
        clean_eps = np.array(sorted(set(ws.episode[ws.profile == CLEAN_ONLY])))
        clean_test, _ = _episodes_split(ws, clean_eps, test_share, rng) if len(clean_eps) else (set(), set())
        test_eps |= clean_test
        rest = np.array(sorted(set(all_eps) - test_eps))
        return _finish(ws, kind, test_eps, rest, rng, f"held-out samples {', '.join(held)}", held)
    if kind == "time":
        ep_rank = {e: r for e, r in zip(ws.episode, ws.t_rank)}
        order = sorted(all_eps, key=lambda e: ep_rank[e])
        cut = int(round(len(order) * (1 - test_share)))
        test_eps = set(order[cut:])
        rest = np.array(order[:cut])
        return _finish(ws, kind, test_eps, rest, rng, f"latest {len(test_eps)} episodes by start time", [])
    raise ValueError(f"unknown split {kind!r}: use host, sample or time")
