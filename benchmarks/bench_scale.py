"""Trainer at scale: peak memory per phase must not grow with the store.

    python benchmarks/bench_scale.py --episodes 600,4800 --work out/bench-scale

For each store size: synth, validate, extract (``phasewatch cache build``), train
``--profile demo``, export; the peak RSS of the whole process tree of each phase (train
and evaluate told apart by the phase lines ``phasewatch train`` writes to
$PHASEWATCH_PHASE_LOG), extraction rows/s, the time a cached re-run takes to reach its
first training step, and how many archives one added archive makes the next run extract.
Prints the figures side by side and RSS(largest) / RSS(smallest) per phase; writes JSON.
Targets (issue 11): every phase <= 2.5 GB at 4,800 episodes, the ratio <= 1.3, first step
of a cached run within 10 s, one added archive extracts one archive.

A synthesised store is kept (``store-N/.done``) and never synthesised again. After a change
to training, ``--reuse <work>/bench-scale.json`` keeps the window stores too and measures
train onward only, carrying the validate and extract figures over from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("validate", "extract", "train", "evaluate", "export")
TARGET_GB, TARGET_RATIO, TARGET_FIRST_STEP_S = 2.5, 1.3, 10.0


@dataclass
class Measured:
    rc: int
    seconds: float
    peak_mb: float
    samples: list[tuple[float, float]] = field(default_factory=list)  # (unix time, tree RSS MB)
    out: str = ""


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def measure(
    cmd: list[str], env: dict[str, str] | None = None, stop_when=None, every: float = 0.1
) -> Measured:
    """Run ``cmd``, sampling the RSS of its process tree; ``stop_when(output_so_far)`` may end it early."""
    t0 = time.time()
    popen = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    proc = psutil.Process(popen.pid)
    samples: list[tuple[float, float]] = []
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(popen.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while popen.poll() is None:
        try:
            samples.append((time.time(), tree_rss_mb(proc)))
        except psutil.Error:
            break
        if stop_when is not None and stop_when():
            os.killpg(popen.pid, signal.SIGTERM)
            break
        time.sleep(every)
    popen.wait()
    reader.join(timeout=5)
    return Measured(
        popen.returncode,
        time.time() - t0,
        max((s for _, s in samples), default=0.0),
        samples,
        "".join(chunks),
    )


def phasewatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


def phase_peaks(samples: list[tuple[float, float]], log: Path) -> dict[str, float]:
    """Peak RSS within the train process's phases: fit* -> train, evaluate*/heldout*/report -> evaluate."""
    marks = []
    for line in log.read_text().splitlines():
        t, name = line.split(" ", 1)
        marks.append((float(t), name))
    peaks = {"extract": 0.0, "train": 0.0, "evaluate": 0.0}
    for t, rss in samples:
        current = None
        for mt, name in marks:
            if mt <= t:
                current = name
        if current is None or current in ("extract", "split"):
            key = "extract"
        elif current.startswith("fit"):
            key = "train"
        else:
            key = "evaluate"
        peaks[key] = max(peaks[key], rss)
    return peaks


def mark_peaks(samples: list[tuple[float, float]], log: Path) -> dict[str, float]:
    """Peak RSS between each phase line and the next ("fit cnn-oracle": 1104.0): which step it was."""
    marks = [(float(t), name) for t, name in (line.split(" ", 1) for line in log.read_text().splitlines())]
    out = {}
    for i, (t, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        out[name] = round(max((r for s, r in samples if t <= s < end), default=0.0))
    return out


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.glob("*/*.tar.zst"))


def bench_one(n: int, work: Path, models: str, env: dict[str, str], reuse: dict | None = None) -> dict:
    """One store size. ``reuse``: this size's figures of an earlier run over the same work dir;
    its store, index and window store are kept and only train, evaluate, export, the cached
    re-run and the added archive are measured again (validate and extract figures carried over)."""
    store, run, out = work / f"store-{n}", work / f"run-{n}", work / f"models-{n}"
    if reuse is not None:
        if not (store / ".done").exists() or not (store / "cache").is_dir():
            raise SystemExit(f"--reuse: {store} has no synthesised store and window store to reuse")
        keep = ("episodes", "synth_s", "store_gb", "validate", "windows", "extract", "window_store_gb")
        return _train_onward(n, store, run, out, work, models, env, {k: reuse[k] for k in keep if k in reuse})
    res: dict = {"episodes": n}
    if not (store / ".done").exists():
        shutil.rmtree(store, ignore_errors=True)
        m = measure(
            phasewatch("synth", "--out", str(store), "--episodes", str(n), "--hosts", "6", "--seed", "7"), env
        )
        if m.rc:
            raise SystemExit(f"synth {n} failed:\n{m.out[-2000:]}")
        (store / ".done").touch()
        res["synth_s"] = round(m.seconds, 1)
    res["store_gb"] = round(store_bytes(store) / 1e9, 3)
    shutil.rmtree(store / "cache", ignore_errors=True)
    (store / "index.jsonl").unlink(missing_ok=True)

    m = measure(phasewatch("validate", str(store), "--json"), env)
    res["validate"] = {"peak_mb": round(m.peak_mb), "seconds": round(m.seconds, 1)}
    index_rows = sum(
        sum(json.loads(line)["rows"].values())
        for line in (store / "index.jsonl").read_text().splitlines()
        if '"accepted"' in line or '"degraded"' in line
    )

    m = measure(phasewatch("cache", "build", "--store", str(store)), env)
    if m.rc:
        raise SystemExit(f"cache build {n} failed:\n{m.out[-2000:]}")
    windows = int(re.search(r"cache: (\d+) windows", m.out).group(1))
    res["windows"] = windows
    res["extract"] = {
        "peak_mb": round(m.peak_mb),
        "seconds": round(m.seconds, 1),
        "rows_per_s": round(index_rows / m.seconds),
        "windows_per_s": round(windows / m.seconds),
        "episodes_per_s": round(n / m.seconds, 1),
    }
    res["window_store_gb"] = round(
        sum(f.stat().st_size for f in (store / "cache").rglob("*") if f.is_file()) / 1e9, 3
    )
    return _train_onward(n, store, run, out, work, models, env, res)


def _train_onward(
    n: int, store: Path, run: Path, out: Path, work: Path, models: str, env: dict[str, str], res: dict
) -> dict:
    log = work / f"phases-{n}.log"
    log.unlink(missing_ok=True)
    m = measure(
        phasewatch(
            "train", "--store", str(store), "--out", str(run), "--profile", "demo", "--models", models
        ),
        env | {"PHASEWATCH_PHASE_LOG": str(log)},
    )
    if m.rc:
        raise SystemExit(f"train {n} failed:\n{m.out[-3000:]}")
    peaks = phase_peaks(m.samples, log)
    plan = json.loads((run / "report.json").read_text()).get("plan", {})  # run.json (RunDoc) has none
    res["train"] = {
        "peak_mb": round(peaks["train"]),
        "seconds": round(m.seconds, 1),
        "plan_peak_mb": plan.get("expected_peak_mb"),
    }
    res["evaluate"] = {"peak_mb": round(peaks["evaluate"])}
    res["train_steps_peak_mb"] = mark_peaks(m.samples, log)
    res["train_cached_table_mb"] = round(peaks["extract"])

    m = measure(phasewatch("export", "--run", str(run), "--out", str(out), "--quiet"), env)
    if m.rc:
        raise SystemExit(f"export {n} failed:\n{m.out[-3000:]}")
    res["export"] = {"peak_mb": round(m.peak_mb), "seconds": round(m.seconds, 1)}

    # A cached re-run: seconds from start to its first training step.
    log2 = work / f"phases-{n}-cached.log"
    log2.unlink(missing_ok=True)
    started = time.time()
    measure(
        phasewatch(
            "train",
            "--store",
            str(store),
            "--out",
            str(work / f"run-{n}-cached"),
            "--profile",
            "demo",
            "--models",
            "gbt",
            "--threat",
            "realistic",
        ),
        env | {"PHASEWATCH_PHASE_LOG": str(log2)},
        stop_when=lambda: log2.exists() and " fit " in f" {log2.read_text()}",
    )
    first = next((float(l.split()[0]) for l in log2.read_text().splitlines() if l.split()[1] == "fit"), None)
    res["cached_first_step_s"] = round(first - started, 1) if first else None

    # One added archive: the next run extracts that one alone.
    extra = work / f"extra-{n}"
    shutil.rmtree(extra, ignore_errors=True)
    measure(phasewatch("synth", "--out", str(extra), "--episodes", "3", "--hosts", "1", "--seed", "99"), env)
    donor = sorted(extra.glob("*/*.tar.zst"))[0]
    host_dir = store / donor.parent.name
    host_dir.mkdir(exist_ok=True)
    for p in (donor, donor.with_name(donor.name + ".sha256")):
        shutil.copy(p, host_dir / p.name)
    measure(phasewatch("validate", str(store), "--json"), env)
    m = measure(phasewatch("cache", "build", "--store", str(store)), env)
    found = re.search(r"\((\d+) extracted now", m.out)
    res["added_archive_extracted"] = int(found.group(1)) if found else None
    for p in (host_dir / donor.name, host_dir / (donor.name + ".sha256")):
        p.unlink(missing_ok=True)
    shutil.rmtree(extra, ignore_errors=True)
    # Back to the store as synthesised: its index without the extra archive, its shard gone
    # (so a --reuse run starts from the same store and sees the added archive extract again).
    measure(phasewatch("validate", str(store), "--json"), env)
    measure(phasewatch("cache", "gc", "--store", str(store)), env)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", default="600,4800", help="comma-separated store sizes (default 600,4800)")
    ap.add_argument("--work", type=Path, default=Path("out/bench-scale"), help="stores and runs go here")
    ap.add_argument("--models", default="gbt,mlp,cnn,gru,lstm,transformer", help="models to train")
    ap.add_argument(
        "--json", type=Path, default=None, help="write the figures here (default <work>/bench-scale.json)"
    )
    ap.add_argument(
        "--results", type=Path, nargs="+", default=None, help="no run: print the table of earlier JSON files"
    )
    ap.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier run's JSON over the same --work: keep its stores and window stores, carry over"
        " their validate/extract figures, measure train onward again",
    )
    args = ap.parse_args(argv)
    if args.results:
        results = sorted(
            (r for f in args.results for r in json.loads(f.read_text())["results"]),
            key=lambda r: r["episodes"],
        )
        return report(results, args.json)
    sizes = sorted(int(s) for s in args.episodes.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    earlier = {}
    if args.reuse:
        earlier = {r["episodes"]: r for r in json.loads(args.reuse.read_text())["results"]}
        if missing := [n for n in sizes if n not in earlier]:
            raise SystemExit(f"--reuse {args.reuse}: no figures for {missing} episodes")
    results = []
    for n in sizes:
        print(f"--- {n} episodes", flush=True)
        r = bench_one(n, args.work, args.models, env, earlier.get(n) if args.reuse else None)
        print(json.dumps(r), flush=True)
        results.append(r)
    return report(results, args.json or args.work / "bench-scale.json")


def report(results: list[dict], path: Path | None) -> int:
    """The figures side by side, RSS(largest) / RSS(smallest) per phase, and the targets."""
    print(f"\n{'':<30}" + "".join(f"{r['episodes']:>12,}" for r in results) + f"{'ratio':>9}")

    def row(label: str, vals: list, ratio: bool = False) -> None:
        txt = "".join(f"{v:>12,}" if isinstance(v, int | float) else f"{v!s:>12}" for v in vals)
        if ratio and vals[0]:
            txt += f"{vals[-1] / vals[0]:>9.2f}"
        print(f"{label:<30}{txt}")

    row("store GB (.tar.zst)", [r["store_gb"] for r in results])
    row("windows", [r["windows"] for r in results])
    row("window store GB", [r["window_store_gb"] for r in results])
    row("extract rows/s", [r["extract"]["rows_per_s"] for r in results])
    row("extract episodes/s", [r["extract"]["episodes_per_s"] for r in results])
    for ph in PHASES:
        row(f"peak RSS {ph} MB", [r[ph]["peak_mb"] for r in results], ratio=True)
    row("plan's expected peak MB", [r["train"]["plan_peak_mb"] for r in results])
    row("train wall s", [r["train"]["seconds"] for r in results])
    row("cached run: first step s", [r["cached_first_step_s"] for r in results])
    row("added archive: extracted", [r["added_archive_extracted"] for r in results])
    big, small = results[-1], results[0]
    verdict = {
        "every_phase_under_2_5_gb": all(big[p]["peak_mb"] <= TARGET_GB * 1024 for p in PHASES),
        "ratio_under_1_3": all(big[p]["peak_mb"] <= TARGET_RATIO * small[p]["peak_mb"] for p in PHASES),
        "cached_first_step_under_10_s": all(
            (r["cached_first_step_s"] or 1e9) <= TARGET_FIRST_STEP_S for r in results
        ),
        "one_added_archive_extracts_one": all(r["added_archive_extracted"] == 1 for r in results),
    }
    print("\n" + "\n".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()))
    if path is not None:
        path.write_text(json.dumps({"results": results, "verdict": verdict}, indent=2) + "\n")
        print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
