"""Windows of the accepted episodes, a feature cache keyed by the schema hash, and splits.

ws = load_windows(store, index)          # extracts in parallel, or loads the cache at once
split = make_split(ws, "host", seed=0)   # held-out host / sample / time
X = ws.view("realistic", "tensor")[split.train]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from schema import extract
from schema.channels import MIN_COVERAGE, N_CHANNELS, SUMMARY_STATS, WINDOW_STEPS
from schema.hashing import schema_hash
from schema.reader import read_episode
from schema.validation import read_index
from schema.vocab import INDEX_NAME, SOURCES, THREAT_SOURCES
from trainer.errors import DatasetError

# Episodes the trainer learns from; rejected and errored never reach it.
USABLE_STATUSES = ("accepted", "degraded")
CLEAN_ONLY = "none"  # profile and sample of an episode with no malware


@dataclass
class WindowSet:
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
        need = [SOURCES.index(s) for s in THREAT_SOURCES[threat_model]]
        return (self.coverage[:, need] >= MIN_COVERAGE).all(axis=1)

    def view(self, threat_model: str, kind: str) -> np.ndarray:
        return extract.view(self.tensor if kind == "tensor" else self.summary, threat_model, kind)

    def subset(self, idx: np.ndarray) -> WindowSet:
        arrays = {f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "skipped"}
        return WindowSet(**arrays, skipped=dict(self.skipped))


_ARRAYS = tuple(f.name for f in fields(WindowSet) if f.name != "skipped")


def _episode_windows(args: tuple[str, dict]) -> dict:
    path, rec = args
    ep = read_episode(Path(path))
    ew = extract.extract_episode(ep)
    keep = ew.labels >= 0
    n = int(keep.sum())
    skipped = dict(ew.skipped)
    skipped["unlabelled"] = int((~keep).sum())
    return {
        "tensor": ew.tensor[keep],
        "coverage": ew.coverage[keep],
        "y": ew.labels[keep],
        "window": ew.windows[keep],
        "episode": np.full(n, rec["episode_id"]),
        "host": np.full(n, rec["host"]),
        "profile": np.full(n, rec.get("profile") or CLEAN_ONLY),
        "sample": np.full(n, rec.get("sample") or CLEAN_ONLY),
        "started_ns": rec.get("started_ns") or 0,
        "skipped": skipped,
    }


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


def _to_dict(rec) -> dict:
    import msgspec

    return msgspec.to_builtins(rec)


def cache_key(records: list[dict]) -> str:
    h = hashlib.sha256(schema_hash().encode())
    for r in records:
        h.update(f"{r['path']}\0{r['sha256']}\0{r['status']}\n".encode())
    return h.hexdigest()[:24]


def _load_cache(d: Path) -> WindowSet | None:
    try:
        arrays = {name: np.load(d / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        skipped = json.loads((d / "skipped.json").read_text())
    except (OSError, ValueError):
        return None
    return WindowSet(**arrays, skipped=skipped)


def _save_cache(ws: WindowSet, d: Path) -> None:
    """Written beside its final place, then renamed: a cache is whole or absent."""
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".tmp-", dir=d.parent))
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(ws, name), allow_pickle=False)
    (tmp / "skipped.json").write_text(json.dumps(ws.skipped))
    try:
        os.replace(tmp, d)
    except OSError:  # another run won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def load_windows(
    store: Path,
    index: Path | None = None,
    cache_dir: Path | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> WindowSet:
    """Every labelled window of the store's accepted and degraded episodes."""
    store = Path(store)
    index = Path(index) if index else store / INDEX_NAME
    records = _records(store, index)
    if not records:
        raise DatasetError(
            f"{index}: no accepted or degraded episodes to learn from (run `phasewatch validate` first)"
        )
    cache = (Path(cache_dir) if cache_dir else index.parent / "cache") / f"windows-{cache_key(records)}"
    if (cached := _load_cache(cache)) is not None:
        if progress:
            print(f"features: {len(cached)} windows from cache {cache}")
        return cached

    jobs = jobs or os.cpu_count() or 1
    work = [(str(store / r["path"]), r) for r in records]
    parts: list[dict] = []
    with ProcessPoolExecutor(jobs) as pool:
        it = pool.map(_episode_windows, work, chunksize=4)
        for part in tqdm(it, total=len(work), desc="extract", unit="ep", disable=not progress):
            parts.append(part)
    ws = _concat(parts)
    _save_cache(ws, cache)
    if progress:
        print(
            f"features: {len(ws)} windows from {len(parts)} episodes; skipped {ws.skipped}; cached in {cache}"
        )
    return ws


def _concat(parts: list[dict]) -> WindowSet:
    starts = np.array([p["started_ns"] for p in parts], dtype=np.float64)
    rank = np.argsort(np.argsort(starts, kind="stable"), kind="stable") / max(len(parts) - 1, 1)
    skipped: Counter[str] = Counter()
    for p in parts:
        skipped.update(p["skipped"])
    n_per = [len(p["y"]) for p in parts]
    arrays = {
        name: np.concatenate([p[name] for p in parts])
        for name in _ARRAYS
        if name not in ("summary", "t_rank")
    }
    if not len(arrays["y"]):
        arrays["tensor"] = np.zeros((0, N_CHANNELS, WINDOW_STEPS), np.float32)
    arrays["t_rank"] = np.repeat(rank, n_per)
    arrays["summary"] = (
        extract.summarize(arrays["tensor"])
        if len(arrays["y"])
        else np.zeros((0, N_CHANNELS * len(SUMMARY_STATS)), np.float32)
    )
    return WindowSet(**arrays, skipped=dict(skipped))


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
    ws: WindowSet, eps: np.ndarray, share: float, rng: np.random.Generator
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
    ws: WindowSet,
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


def make_split(ws: WindowSet, kind: str = "host", seed: int = 0, test_share: float = 0.3) -> Split:
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
