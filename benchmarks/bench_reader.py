"""The streaming reader against the naive way, on the same episodes, in one run.

    python benchmarks/bench_reader.py [--store DIR] [--episodes N] [--repeats R]

naive:  read the whole file, decompress the whole archive into memory, open it as a tar,
        ``json.loads`` every line of every JSONL member into dicts (bad lines skipped).
reader: ``schema.reader.read_episode`` (streaming, sha256 + sidecar check, typed
        msgspec rows -> numpy columns, caps and reason codes).

Each approach runs in a fresh subprocess per repeat, so its memory is its own. Memory
is peak RSS of that subprocess (VmHWM from /proc/self/status; ru_maxrss elsewhere),
shown as the whole peak and as the growth over the same process right after imports
(both workers import the same modules, so their baselines match). Rows are telemetry
rows (proc, guest, qmp, netflow); throughput is shown per wall second and per CPU
second of the worker (the second is steadier on a shared machine). Without --store, episodes come from
``trainer.synth.generate_store`` when it exists, otherwise from tests/archive_kit.py.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import msgspec  # noqa: F401 - same imports in both workers, so the RSS baselines match
import numpy  # noqa: F401
import zstandard

from schema.reader import read_episode
from schema.vocab import SOURCE_MEMBER

HERE = Path(__file__).resolve()
TELEMETRY = set(SOURCE_MEMBER.values())


def _rss_kb() -> int:
    """Peak RSS of this process in kB. VmHWM belongs to this address space; ru_maxrss
    would also carry the parent's high-water mark across fork+exec on Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def naive(path: Path) -> int:
    raw = path.read_bytes()
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    rows = 0
    episode: dict[str, list[dict]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for ti in tf.getmembers():
            if not (ti.isfile() and ti.name.endswith(".jsonl")):
                continue
            text = tf.extractfile(ti).read()  # type: ignore[union-attr]
            records = []
            for line in text.splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        pass
            episode[ti.name] = records
            if ti.name.rsplit("/", 1)[-1] in TELEMETRY:
                rows += len(records)
    return rows


def streaming(path: Path) -> int:
    ep = read_episode(path)
    return sum(ep.rows.values())


def worker(approach: str, paths_file: Path) -> None:
    paths = [Path(p) for p in paths_file.read_text().splitlines()]
    fn = {"naive": naive, "reader": streaming}[approach]
    base = _rss_kb()
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for p in paths:
        try:
            rows += fn(p)
        except Exception:
            pass
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps({"rows": rows, "seconds": dt, "cpu_seconds": cpu, "peak_kb": _rss_kb(), "base_kb": base})
    )


def make_episodes(out: Path, episodes: int) -> tuple[Path, str]:
    try:
        from trainer.synth import generate_store  # type: ignore[attr-defined]
    except ImportError:
        generate_store = None
    if generate_store is not None:
        generate_store(out, episodes=episodes, hosts=3, seed=1)
        return out, "trainer.synth.generate_store"
    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from archive_kit import episode_members, write_archive

    for i in range(episodes):
        write_archive(
            out / f"host-{i % 3}" / f"ep-{i:04d}.tar.zst",
            episode_members(f"ep-{i:04d}", f"host-{i % 3}", duration_s=900, seed=i),
        )
    return out, "tests/archive_kit.py (900 s episodes)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="an existing store; default: generate one in a temp dir")
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["naive", "reader"], help=argparse.SUPPRESS)
    ap.add_argument("--paths", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.paths)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        if args.store:
            store, origin = args.store, str(args.store)
        else:
            store, origin = make_episodes(Path(tmp) / "store", args.episodes)
        paths = sorted(store.glob("*/*.tar.zst"))[: args.episodes]
        if not paths:
            raise SystemExit(f"no archives under {store}")
        plist = Path(tmp) / "paths.txt"
        plist.write_text("\n".join(map(str, paths)))
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{len(paths)} archives, {mb:.1f} MiB compressed, from {origin}; {args.repeats} repeats, "
            "each approach in a fresh subprocess; memory = peak RSS (VmHWM)"
        )
        runs: dict[str, list[dict]] = {"naive": [], "reader": []}
        for _ in range(args.repeats):
            for approach in runs:  # interleaved, so load on the machine hits both alike
                out = subprocess.run(
                    [sys.executable, str(HERE), "--worker", approach, "--paths", str(plist)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs[approach].append(json.loads(out))
        med: dict[str, dict[str, float]] = {}
        for approach, rs in runs.items():
            rows = rs[0]["rows"]
            med[approach] = {
                "rows": rows,
                "rows_per_s": statistics.median(r["rows"] / r["seconds"] for r in rs),
                "seconds": statistics.median(r["seconds"] for r in rs),
                "rows_per_cpu_s": statistics.median(r["rows"] / r["cpu_seconds"] for r in rs),
                "peak_mib": statistics.median(r["peak_kb"] for r in rs) / 1024,
                "growth_mib": statistics.median(r["peak_kb"] - r["base_kb"] for r in rs) / 1024,
            }
        print(
            f"{'approach':<8} {'rows':>9} {'median s':>9} {'rows/s':>11} {'rows/CPU-s':>11} "
            f"{'peak RSS MiB':>13} {'growth MiB':>11}"
        )
        for a, m in med.items():
            print(
                f"{a:<8} {m['rows']:>9,} {m['seconds']:>9.3f} {m['rows_per_s']:>11,.0f} "
                f"{m['rows_per_cpu_s']:>11,.0f} {m['peak_mib']:>13.1f} {m['growth_mib']:>11.1f}"
            )
        speed = med["reader"]["rows_per_s"] / med["naive"]["rows_per_s"]
        cpu_speed = med["reader"]["rows_per_cpu_s"] / med["naive"]["rows_per_cpu_s"]
        mem = med["reader"]["growth_mib"] / max(med["naive"]["growth_mib"], 1e-9)
        print(
            f"reader / naive: {speed:.1f}x rows/s (wall), {cpu_speed:.1f}x rows per CPU second, "
            f"{mem:.2f}x memory growth (target: >= 5x throughput at <= 1x memory)"
        )
        if med["reader"]["rows"] != med["naive"]["rows"]:
            print(
                f"note: row counts differ (reader {med['reader']['rows']}, naive {med['naive']['rows']}): "
                "the reader drops rows that fail the typed schema, the naive way keeps any JSON"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
