"""Packing, the store layout (SPEC section 3), archive-level defects, and the parallel driver."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from schema.vocab import STATUSES, sidecar_path
from trainer.workers import worker_pool

from .episode import build_episode
from .plan import EpisodeSpec, plan_store

ZSTD_LEVEL = 3
TAR_UID, TAR_USER = 1000, "collector"


def pack_archive(episode_id: str, members: dict[str, bytes], mtime: int = 0) -> bytes:
    """A zstd-compressed tar with every member under ``<episode_id>/``. Byte-identical for the same
    input: fixed owner, mode and mtime, GNU headers (no pax timestamps), one-shot zstd at a fixed level."""

    def info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        ti.size, ti.mode = size, 0o755 if directory else 0o644
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, TAR_UID, TAR_UID, TAR_USER, TAR_USER
        return ti

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info(episode_id, directory=True))
        for name, data in members.items():
            tar.addfile(info(f"{episode_id}/{name}", len(data)), io.BytesIO(data))
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=0)
    return cctx.compress(buf.getvalue())


def sidecar_line(episode_id: str, archive: bytes) -> str:
    return f"{hashlib.sha256(archive).hexdigest()}  {episode_id}.tar.zst\n"


@dataclass
class Shipped:
    """One episode as it lands in the store."""

    spec_index: int
    host_id: str
    episode_id: str
    archive: bytes
    sidecar: str | None
    truth: dict[str, Any]


def ship_episode(spec: EpisodeSpec) -> Shipped:
    """Build, pack, and upload one episode, including what goes wrong after packing."""
    members, truth = build_episode(spec)
    archive = pack_archive(spec.episode_id, members, mtime=spec.started_ns // 10**9)
    sidecar: str | None = sidecar_line(spec.episode_id, archive)  # the collector hashes before upload
    rng = np.random.default_rng([spec.seed, spec.index, 2])
    if spec.defect == "truncated_upload":  # the connection died; the sidecar already arrived
        archive = archive[: int(len(archive) * float(rng.uniform(0.3, 0.9)))]
    elif spec.defect == "bit_flip":  # bad RAM or bit rot after the hash was taken
        pos = int(rng.integers(64, len(archive)))
        archive = archive[:pos] + bytes([archive[pos] ^ (1 << int(rng.integers(0, 8)))]) + archive[pos + 1 :]
        truth["bit_flip_offset"] = pos
    elif spec.defect == "missing_sidecar":
        sidecar = None
    truth["archive_bytes"] = len(archive)
    return Shipped(spec.index, spec.host.host_id, spec.episode_id, archive, sidecar, truth)


@dataclass
class SynthSummary:
    out: Path
    episodes: int = 0
    bytes: int = 0
    seconds: float = 0.0
    by_host: dict[str, Counter] = field(default_factory=dict)  # host -> intended outcome counts
    profiles: Counter = field(default_factory=Counter)
    samples: Counter = field(default_factory=Counter)
    defects: Counter = field(default_factory=Counter)

    def add(self, s: Shipped) -> None:
        self.episodes += 1
        self.bytes += len(s.archive)
        self.by_host.setdefault(s.host_id, Counter())[s.truth["outcome"]] += 1
        self.profiles[s.truth["profile"] or "clean-only"] += 1
        if s.truth["sample"]:
            self.samples[s.truth["sample"]] += 1
        self.defects[s.truth["defect"]] += 1

    def table(self) -> str:
        head = f"{'host':<8}" + "".join(f"{k:>10}" for k in STATUSES) + f"{'total':>8}"
        rows = [head, "-" * len(head)]
        tot: Counter = Counter()
        for h in sorted(self.by_host):
            c = self.by_host[h]
            tot.update(c)
            rows.append(f"{h:<8}" + "".join(f"{c[k]:>10}" for k in STATUSES) + f"{sum(c.values()):>8}")
        rows.append(f"{'all':<8}" + "".join(f"{tot[k]:>10}" for k in STATUSES) + f"{sum(tot.values()):>8}")
        rows.append("(intended outcomes; `phasewatch validate` decides the real ones)")
        rows.append("profiles: " + ", ".join(f"{k} {v}" for k, v in sorted(self.profiles.items())))
        rows.append(
            f"{self.episodes} episodes, {len(self.samples)} samples, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s -> {self.out}"
        )
        return "\n".join(rows)


def _write(out: Path, s: Shipped) -> None:
    d = out / s.host_id
    d.mkdir(parents=True, exist_ok=True)
    arc = d / f"{s.episode_id}.tar.zst"
    tmp = arc.with_suffix(".zst.part")
    tmp.write_bytes(s.archive)
    os.replace(tmp, arc)
    side = sidecar_path(arc)
    if s.sidecar is None:
        side.unlink(missing_ok=True)
    else:
        side.write_text(s.sidecar)


def generate_store(
    out: Path,
    episodes: int = 240,
    hosts: int = 6,
    seed: int = 7,
    jobs: int | None = None,
    progress: bool = True,
) -> SynthSummary:
    """Write a whole store plus ``synth-truth.jsonl`` (one line per episode, in index order)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan_store(episodes, hosts, seed)
    jobs = max(1, min(jobs or os.cpu_count() or 1, episodes))
    summary = SynthSummary(out)
    t0 = time.perf_counter()
    from tqdm import tqdm

    truths: list[dict[str, Any]] = []
    with tqdm(total=episodes, unit="ep", desc="synth", disable=not progress, dynamic_ncols=True) as bar:
        if jobs == 1:
            results = map(ship_episode, specs)
            pool = None
        else:
            pool = worker_pool(jobs)
            results = pool.map(ship_episode, specs, chunksize=max(1, min(8, episodes // (4 * jobs))))
        try:
            for s in results:
                _write(out, s)
                summary.add(s)
                truths.append(s.truth)
                bar.update(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    part = out / "synth-truth.jsonl.part"
    part.write_text("".join(json.dumps(t, separators=(",", ":")) + "\n" for t in truths))
    os.replace(part, out / "synth-truth.jsonl")
    summary.seconds = time.perf_counter() - t0
    return summary


def read_truth(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out) / "synth-truth.jsonl").read_text().splitlines() if line]


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="store directory to write")
    p.add_argument("--episodes", type=int, default=240, help="number of episodes (default 240)")
    p.add_argument(
        "--hosts", type=int, default=6, help="number of lab hosts (default 6; the first six are hand-made)"
    )
    p.add_argument("--seed", type=int, default=7, help="seed: the same seed gives byte-identical archives")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")


def cli_synth(args: argparse.Namespace) -> int:
    if args.episodes < 1 or args.hosts < 1:
        print("phasewatch synth: --episodes and --hosts must be >= 1")
        return 2
    summary = generate_store(args.out, args.episodes, args.hosts, args.seed, args.jobs, progress=True)
    print(summary.table())
    return 0
