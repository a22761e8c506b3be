"""Build episode archives from rows for tests: a small good episode, then break it on purpose.

Everything is written the way a collector ships it (SPEC section 3): a zstd-compressed
tar whose members sit under `<episode_id>/`, plus a sha256sum-format sidecar.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import zstandard

from schema.rows import ROW_TYPES
from schema.vocab import SOURCE_MEMBER, SOURCES

STARTED_NS = 1_700_000_000_000_000_000
RATE_HZ = {"proc": 10, "guest": 10, "qmp": 1, "netflow": 10}
# The capture box's monotonic clock has its own base (the netflow clock trap).
MONO_BASE = {
    "proc": 5_000_000_000,
    "guest": 5_000_000_000,
    "qmp": 5_000_000_000,
    "netflow": 9_000_000_000_000,
}


def jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def _row(source: str, i: int, t_wall: int, rng: random.Random) -> dict[str, Any]:
    row: dict[str, Any] = {"t_wall_ns": t_wall, "t_mono_ns": MONO_BASE[source] + (t_wall - STARTED_NS)}
    for f in ROW_TYPES[source].__struct_fields__:
        if f in row:
            continue
        if f == "pid":
            row[f] = 4242
        elif f == "status":
            row[f] = "running"
        elif f == "interval_ms":
            row[f] = 100
        else:
            # cumulative-looking counters grow, gauges wander; ints and floats both occur.
            row[f] = i * 7 + rng.randint(0, 5) if rng.random() < 0.5 else round(rng.uniform(0, 100), 3)
    return row


def episode_members(
    episode_id: str = "ep-0001",
    host_id: str = "host-a",
    *,
    duration_s: int = 40,
    profile: str | None = "cpu-saturate",
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
) -> dict[str, bytes]:
    """A good, minimal episode: member name (inside `<episode_id>/`) -> bytes.

    40 s at 10 Hz gives 400 rows per fast stream; labels walk clean -> armed -> infecting
    -> infected_running (or stay clean when ``profile`` is None)."""
    rng = random.Random(seed)
    ended = STARTED_NS + duration_s * 1_000_000_000
    meta = {
        "episode_id": episode_id,
        "host_id": host_id,
        "schema_version": 1,
        "sample_id": None if profile is None else f"{profile}-s1",
        "profile": profile,
        "started_ns": STARTED_NS,
        "ended_ns": ended,
        "vm": {"vcpus": 2, "mem_mb": 2048, "os": "debian-12"},
        "collector": "kit/1",
    }
    phases = ["clean"] if profile is None else ["clean", "armed", "infecting", "infected_running"]
    step = duration_s * 1_000_000_000 // len(phases)
    labels = [{"t_wall_ns": STARTED_NS + k * step, "phase": p} for k, p in enumerate(phases)]
    events = [{"t_wall_ns": STARTED_NS, "kind": "vm_boot"}, {"t_wall_ns": ended, "kind": "vm_shutdown"}]
    members: dict[str, bytes] = {
        "meta.json": json.dumps(meta).encode(),
        "labels.jsonl": jsonl(labels),
        "events.jsonl": jsonl(events),
    }
    for s in sources:
        period = 1_000_000_000 // RATE_HZ[s]
        n = duration_s * RATE_HZ[s]
        members[SOURCE_MEMBER[s]] = jsonl(
            _row(s, i, STARTED_NS + i * period + rng.randint(0, 999), rng) for i in range(n)
        )
    members["done.marker"] = b""
    return members


class ZeroFile(io.RawIOBase):
    """`size` zero bytes produced on demand, so a decompression bomb never sits in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    """A link / device / fifo member (no data)."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    return ti, None


def big(name: str, size: int) -> tuple[tarfile.TarInfo, io.RawIOBase]:
    """A member of `size` zero bytes: the decompression bomb."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti, ZeroFile(size)


def write_archive(
    path: Path,
    members: Mapping[str, bytes],
    *,
    extra: Sequence[tuple[tarfile.TarInfo, Any]] = (),
    sidecar: bool = True,
    level: int = 3,
    format: int = tarfile.PAX_FORMAT,
    checksum: bool = False,
) -> Path:
    """Write `members` under `<episode_id>/` (episode id from the file name), then the
    `extra` raw members named as given, as `path` (a .tar.zst) plus its sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    episode_id = path.name.removesuffix(".tar.zst")
    with open(path, "wb") as fh:
        with zstandard.ZstdCompressor(level=level, write_checksum=checksum).stream_writer(
            fh, closefd=False
        ) as zw:
            with tarfile.open(fileobj=zw, mode="w|", format=format) as tf:
                for name, data in members.items():
                    ti = tarfile.TarInfo(f"{episode_id}/{name}")
                    ti.size = len(data)
                    ti.mtime = 1_700_000_000
                    tf.addfile(ti, io.BytesIO(data))
                for ti, fobj in extra:
                    tf.addfile(ti, fobj)
    if sidecar:
        write_sidecar(path)
    return path


def write_raw(path: Path, tar_bytes: bytes) -> Path:
    """Compress hand-made tar bytes (for broken tar structure inside good zstd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(tar_bytes))
    write_sidecar(path)
    return path


def tar_bytes(path_name: str, members: Mapping[str, bytes]) -> bytes:
    """An uncompressed tar of `members` under `<path_name>/`, as bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(f"{path_name}/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_sidecar(path: Path, digest: str | None = None) -> None:
    if digest is None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".sha256")).write_text(f"{digest}  {path.name}\n")


def truncate(path: Path, keep: float = 0.5, *, fix_sidecar: bool = True) -> None:
    """Cut the compressed file (a collector that died mid-upload); by default the sidecar
    is rewritten to match, so only the cut itself is wrong."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    if fix_sidecar:
        write_sidecar(path)


def replace_line(data: bytes, line_no: int, new: bytes) -> bytes:
    """Replace 1-based line `line_no` of JSONL bytes."""
    lines = data.split(b"\n")
    lines[line_no - 1] = new
    return b"\n".join(lines)


def make_store(root: Path, cases: Mapping[str, Mapping[str, bytes]], host: str = "host-a") -> dict[str, Path]:
    """Write one good archive per case name; returns name -> path."""
    return {name: write_archive(root / host / f"{name}.tar.zst", m) for name, m in cases.items()}
