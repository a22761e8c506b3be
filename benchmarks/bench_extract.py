"""The extractor before and after issue 13, side by side on the same windows, in one run.

    python benchmarks/bench_extract.py [--store DIR] [--episodes N] [--every K] [--repeats R] [--whole]

old: tests/extract_reference.py, the extractor as it was (extractor v1);
new: schema.extract, the same output to the bit with far fewer numpy calls per window.

Windows come from every K-th archive of the store (``read_episode``), each given only its
own rows, ``[start - LOOKBACK_NS, last step]`` in arrival order, as the edge tailer hands
them (``ColumnBuilder.window``); ``--whole`` gives every window the whole episode instead,
as ``phasewatch bench`` does. Each call is timed alone with ``perf_counter_ns``, the
garbage collector off, old and new interleaved window by window so drift on a shared
machine hits both alike; a figure is the median over windows, then the median over
repeats. Before timing, every window is checked bit for bit (tensor, coverage, summary).
Without --store (and no data/store), episodes come from ``trainer.synth.generate_store``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import extract_reference as ref  # noqa: E402

from schema import extract  # noqa: E402
from schema.channels import LOOKBACK_NS  # noqa: E402
from schema.reader import read_episode  # noqa: E402


@dataclass
class Cols:
    t_wall_ns: np.ndarray
    values: np.ndarray


Job = tuple[dict[str, Cols], int, int]


def windows(store: Path, episodes: int, every: int, whole: bool) -> list[Job]:
    jobs: list[Job] = []
    for path in sorted(store.glob("*/*.tar.zst"))[::every][:episodes]:
        ep = read_episode(path)
        proc = ep.streams.get("proc")
        if ep.meta is None or proc is None or len(proc.t_wall_ns) == 0:
            continue
        t0 = ep.meta.started_ns
        for w in range(extract.n_windows(t0, int(proc.t_wall_ns.max()))):
            lo, hi = extract.window_start_ns(t0, w) - LOOKBACK_NS, extract.window_last_step_ns(t0, w)
            streams = {}
            for s, c in ep.streams.items():
                k = slice(None) if whole else (c.t_wall_ns >= lo) & (c.t_wall_ns <= hi)
                streams[s] = Cols(c.t_wall_ns[k], c.values[k])
            jobs.append((streams, t0, w))
    return jobs


def check(jobs: list[Job]) -> None:
    for streams, t0, w in jobs:
        got = extract.extract_window(streams, t0, w)
        want_t, want_c = ref.extract_window(streams, t0, w)
        same = got.tensor.tobytes() == want_t.tobytes() and got.coverage.tobytes() == want_c.tobytes()
        same = same and extract.summarize(got.tensor).tobytes() == ref.summarize(want_t).tobytes()
        if not same:
            raise SystemExit(f"window {w} of the episode at {t0}: new output differs from the old")


def timed(fns: dict[str, Callable[[Job], object]], jobs: list[Job], repeats: int) -> dict[str, list[float]]:
    """Per name, the median µs per window of each repeat."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    gc.disable()
    try:
        for _ in range(repeats):
            per: dict[str, list[int]] = {k: [] for k in fns}
            for job in jobs:
                for name, fn in fns.items():
                    t = time.perf_counter_ns()
                    fn(job)
                    per[name].append(time.perf_counter_ns() - t)
            for k, v in per.items():
                out[k].append(statistics.median(v) / 1000)
    finally:
        gc.enable()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="default: data/store, else a generated one in a temp dir")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--every", type=int, default=40, help="take every K-th archive (spread over hosts)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--whole", action="store_true", help="give each window the whole episode")
    args = ap.parse_args(argv)
    store = args.store or ROOT / "data" / "store"
    tmp = None
    if not store.is_dir():
        from trainer.synth import generate_store

        tmp = tempfile.TemporaryDirectory()
        store = Path(tmp.name) / "store"
        generate_store(store, episodes=args.episodes, hosts=2, seed=7, jobs=1, progress=False)
        args.every = 1
    jobs = windows(store, args.episodes, args.every, args.whole)
    if not jobs:
        raise SystemExit(f"no windows in {store}")
    check(jobs)
    tensors = [ref.extract_window(*j)[0] for j in jobs]
    by_w = {id(j): t for j, t in zip(jobs, tensors)}
    t = timed(
        {
            "old extract": lambda j: ref.extract_window(*j),
            "new extract": lambda j: extract.extract_window(*j),
            "old summarize": lambda j: ref.summarize(by_w[id(j)]),
            "new summarize": lambda j: extract.summarize(by_w[id(j)]),
            "old both": lambda j: ref.summarize(ref.extract_window(*j)[0]),
            "new both": lambda j: extract.summarize(extract.extract_window(*j).tensor),
        },
        jobs,
        args.repeats,
    )
    mode = "whole episode per window" if args.whole else "own rows per window (as the tailer hands them)"
    n_eps = len({j[1] for j in jobs})
    print(f"{len(jobs)} windows of {n_eps} episodes from {store}, {mode}; {args.repeats} repeats")
    print("bit-identical: tensor, coverage and summary of every window")
    print(f"{'µs per window (median)':28s} {'old':>8s} {'new':>8s} {'old/new':>8s} {'spread new':>11s}")
    for what in ("extract", "summarize", "both"):
        old, new = statistics.median(t[f"old {what}"]), statistics.median(t[f"new {what}"])
        spread = max(t[f"new {what}"]) - min(t[f"new {what}"])
        label = {"both": "extract + summarize"}.get(what, what)
        print(f"{label:28s} {old:8.1f} {new:8.1f} {old / new:8.2f} {spread:11.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
