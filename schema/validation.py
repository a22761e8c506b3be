"""Validation (SPEC section 5): one status per archive, with named reason codes.

:data:`REASONS` is the whole rulebook as data: every code, the status it forces and
what it means. :func:`classify` turns an :class:`~schema.reader.EpisodeData` into the
worst status among its reasons. The acceptance index is JSONL of :class:`IndexRecord`,
written atomically. Pi-safe: the daemon classifies finished episodes with this module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import numpy as np

from .atomic import remove_stale, temp_prefix
from .channels import WINDOW_S
from .vocab import (
    DONE_MEMBER,
    EVENTS_MEMBER,
    LABELS_MEMBER,
    META_MEMBER,
    PHASES,
    PROFILES,
    SOURCE_MEMBER,
    STATUSES,
    episode_id_from_path,
)

if TYPE_CHECKING:
    from .reader import EpisodeData

# Bump when a rule below changes, so a sweep re-reads archives it had judged by old rules.
VALIDATOR_VERSION: Final = 2  # 2: zstd frame checksums verified (zstd_checksum)


class ReasonCode(StrEnum):
    """Every reason code; :data:`REASONS` says what each forces and means (same members, tested)."""

    # a single bad line: spelled out in details, never a reason of its own (its share is)
    MALFORMED_LINE = "malformed_line"
    IO_ERROR = "io_error"
    SHA256_MISMATCH = "sha256_mismatch"
    ZSTD_CORRUPT = "zstd_corrupt"
    ZSTD_CHECKSUM = "zstd_checksum"
    TAR_CORRUPT = "tar_corrupt"
    META_UNREADABLE = "meta_unreadable"
    READER_CRASH = "reader_crash"
    MISSING_META = "missing_meta"
    MISSING_LABELS = "missing_labels"
    MISSING_PROC = "missing_proc"
    EMPTY_LABELS = "empty_labels"
    LABELS_NOT_MONOTONIC = "labels_not_monotonic"
    UNKNOWN_PHASE = "unknown_phase"
    TOO_FEW_ROWS = "too_few_rows"
    TOO_SHORT = "too_short"
    UNSAFE_MEMBER = "unsafe_member"
    MEMBER_TOO_LARGE = "member_too_large"
    ARCHIVE_TOO_LARGE = "archive_too_large"
    TOO_MANY_MALFORMED = "too_many_malformed"
    NO_DONE_MARKER = "no_done_marker"
    NO_SIDECAR = "no_sidecar"
    SIDECAR_MALFORMED = "sidecar_malformed"
    DUPLICATE_MEMBER = "duplicate_member"
    MISSING_EVENTS = "missing_events"
    MISSING_GUEST = "missing_guest"
    MISSING_QMP = "missing_qmp"
    MISSING_NETFLOW = "missing_netflow"
    SPARSE_PROC = "sparse_proc"
    SPARSE_GUEST = "sparse_guest"
    SPARSE_QMP = "sparse_qmp"
    SPARSE_NETFLOW = "sparse_netflow"
    LONG_GAP = "long_gap"
    MALFORMED_LINES = "malformed_lines"
    LINE_TOO_LONG = "line_too_long"
    UNKNOWN_PROFILE = "unknown_profile"


@dataclass
class Problem:
    """One thing wrong, machine-readable and pointing at its place. ``code`` is a
    :class:`ReasonCode`; a string that is not one raises ``ValueError`` at construction."""

    code: ReasonCode
    member: str | None = None  # archive member name (inside the episode directory)
    line: int | None = None  # 1-based line number in that member
    field: str | None = None  # JSON field when known (from msgspec's "$.field")
    detail: str = ""

    def __post_init__(self) -> None:
        self.code = ReasonCode(self.code)

    def __str__(self) -> str:
        where = self.member or ""
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" field {self.field}"
        head = f"{self.code} {where}" if where else str(self.code)
        return f"{head}: {self.detail}" if self.detail else head


@dataclass(frozen=True)
class Reason:
    status: str
    doc: str


REASONS: Final[dict[ReasonCode, Reason]] = {
    # errored: cannot be read
    ReasonCode.IO_ERROR: Reason("errored", "the archive file cannot be opened or read"),
    ReasonCode.SHA256_MISMATCH: Reason("errored", "the archive's sha256 differs from its sidecar"),
    ReasonCode.ZSTD_CORRUPT: Reason("errored", "the zstd stream is corrupt or truncated"),
    ReasonCode.ZSTD_CHECKSUM: Reason(
        "errored", "a zstd frame's content checksum does not match its decompressed bytes"
    ),
    ReasonCode.TAR_CORRUPT: Reason("errored", "the tar inside is corrupt or truncated"),
    ReasonCode.META_UNREADABLE: Reason("errored", "meta.json is present but does not decode as EpisodeMeta"),
    ReasonCode.READER_CRASH: Reason("errored", "the reader raised; the exception text is in details"),
    # rejected: readable, unusable
    ReasonCode.MISSING_META: Reason("rejected", "required member meta.json is missing"),
    ReasonCode.MISSING_LABELS: Reason("rejected", "required member labels.jsonl is missing"),
    ReasonCode.MISSING_PROC: Reason("rejected", "required member telemetry-proc.jsonl is missing"),
    ReasonCode.EMPTY_LABELS: Reason("rejected", "labels.jsonl holds no readable label"),
    ReasonCode.LABELS_NOT_MONOTONIC: Reason("rejected", "a label's t_wall_ns is earlier than the one before"),
    ReasonCode.UNKNOWN_PHASE: Reason("rejected", "a label names a phase outside the vocabulary"),
    ReasonCode.TOO_FEW_ROWS: Reason("rejected", "telemetry-row gate: proc rows far below duration x rate"),
    ReasonCode.TOO_SHORT: Reason("rejected", "the episode is shorter than one window"),
    ReasonCode.UNSAFE_MEMBER: Reason(
        "rejected", "a member has an absolute or '..' path, or is a link or device"
    ),
    ReasonCode.MEMBER_TOO_LARGE: Reason("rejected", "a member decompresses past Limits.max_member_bytes"),
    ReasonCode.ARCHIVE_TOO_LARGE: Reason(
        "rejected", "the archive decompresses past Limits.max_total_bytes (bomb)"
    ),
    ReasonCode.TOO_MANY_MALFORMED: Reason(
        "rejected", "more than MALFORMED_REJECT_SHARE of the lines are malformed"
    ),
    # degraded: usable with caveats
    ReasonCode.NO_DONE_MARKER: Reason(
        "degraded", "done.marker is missing: the episode did not close cleanly"
    ),
    ReasonCode.NO_SIDECAR: Reason("degraded", "no .sha256 sidecar, so integrity is unchecked"),
    ReasonCode.SIDECAR_MALFORMED: Reason(
        "degraded", "the sidecar is not '<sha256>  <name>', so integrity is unchecked"
    ),
    ReasonCode.DUPLICATE_MEMBER: Reason("degraded", "a member occurs twice; the second copy is ignored"),
    ReasonCode.MISSING_EVENTS: Reason("degraded", "optional member events.jsonl is missing"),
    ReasonCode.MISSING_GUEST: Reason("degraded", "optional stream telemetry-guest.jsonl is missing"),
    ReasonCode.MISSING_QMP: Reason("degraded", "optional stream telemetry-qmp.jsonl is missing"),
    ReasonCode.MISSING_NETFLOW: Reason("degraded", "optional stream netflow.jsonl is missing"),
    ReasonCode.SPARSE_PROC: Reason(
        "degraded", "proc rows below SPARSE_SHARE of duration x rate (but above the gate)"
    ),
    ReasonCode.SPARSE_GUEST: Reason("degraded", "guest rows below SPARSE_SHARE of duration x rate"),
    ReasonCode.SPARSE_QMP: Reason("degraded", "qmp rows below SPARSE_SHARE of duration x rate"),
    ReasonCode.SPARSE_NETFLOW: Reason("degraded", "netflow rows below SPARSE_SHARE of duration x rate"),
    ReasonCode.LONG_GAP: Reason(
        "degraded", "a stream has no row for more than LONG_GAP_S (inside or at its end)"
    ),
    ReasonCode.MALFORMED_LINES: Reason(
        "degraded", "a small share of lines is malformed (file, line, field in details)"
    ),
    ReasonCode.LINE_TOO_LONG: Reason("degraded", "a line exceeds Limits.max_line_bytes and was dropped"),
    ReasonCode.UNKNOWN_PROFILE: Reason("degraded", "meta.profile is not one of the attack profiles"),
}
assert all(r.status in STATUSES for r in REASONS.values())
assert set(REASONS) == set(ReasonCode) - {ReasonCode.MALFORMED_LINE}, set(ReasonCode) ^ set(REASONS)

# Nominal row rates (SPEC section 3); the gate and the sparse checks compare against them.
EXPECTED_HZ: Final = {"proc": 10.0, "guest": 10.0, "qmp": 1.0, "netflow": 10.0}
REQUIRED_SOURCE: Final = "proc"
ROW_GATE_SHARE: Final = 0.5  # proc below this share of duration x rate -> rejected
SPARSE_SHARE: Final = 0.7  # any stream below this share -> degraded
LONG_GAP_S: Final = 15.0  # one and a half windows without a row
MALFORMED_REJECT_SHARE: Final = 0.05
MAX_DETAILS: Final = 20  # problems spelled out per index record


def worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=STATUSES.index, default="accepted")


def effective_duration_s(ep: EpisodeData) -> float | None:
    """meta's duration, cut to the last row when the episode did not close cleanly
    (a crashed collector leaves a stale ended_ns)."""
    if ep.meta is None:
        return None
    end = ep.meta.ended_ns
    if not ep.has_done_marker:
        lasts = [int(c.t_wall_ns.max()) for c in ep.streams.values() if len(c)]
        if lasts:
            end = min(end, max(lasts))
    return max(0.0, (end - ep.meta.started_ns) / 1e9)


def findings(ep: EpisodeData) -> list[Problem]:
    """Every problem with ``ep``: the reader's plus those the rules find."""
    out = [p for p in ep.problems if p.code != ReasonCode.MALFORMED_LINE]
    if ep.fatal:
        return out + [p for p in ep.problems if p.code == ReasonCode.MALFORMED_LINE]
    add = out.append

    present = set(ep.members)
    for code, member in (
        (ReasonCode.MISSING_META, META_MEMBER),
        (ReasonCode.MISSING_LABELS, LABELS_MEMBER),
        (ReasonCode.MISSING_PROC, SOURCE_MEMBER[REQUIRED_SOURCE]),
    ):
        if member not in present:
            add(Problem(code, member, detail="required member missing"))
    if EVENTS_MEMBER not in present:
        add(Problem(ReasonCode.MISSING_EVENTS, EVENTS_MEMBER, detail="optional member missing"))
    for s in ("guest", "qmp", "netflow"):
        if SOURCE_MEMBER[s] not in present:
            add(Problem(ReasonCode(f"missing_{s}"), SOURCE_MEMBER[s], detail="optional stream missing"))
    if not ep.has_done_marker:
        add(Problem(ReasonCode.NO_DONE_MARKER, DONE_MEMBER, detail="episode did not close cleanly"))

    if LABELS_MEMBER in present:
        if not ep.labels:
            add(Problem(ReasonCode.EMPTY_LABELS, LABELS_MEMBER, detail="no readable label"))
        bad = [l for l in ep.labels if l.phase not in PHASES]
        if bad:
            add(
                Problem(
                    ReasonCode.UNKNOWN_PHASE,
                    LABELS_MEMBER,
                    field="phase",
                    detail=f"{len(bad)} label(s), e.g. {bad[0].phase!r}",
                )
            )
        t = np.fromiter((l.t_wall_ns for l in ep.labels), np.int64, len(ep.labels))
        back = np.flatnonzero(np.diff(t) < 0)
        if back.size:
            add(
                Problem(
                    ReasonCode.LABELS_NOT_MONOTONIC,
                    LABELS_MEMBER,
                    field="t_wall_ns",
                    detail=f"goes back in time at label {int(back[0]) + 2}",
                )
            )

    if ep.meta is not None:
        if ep.meta.profile is not None and ep.meta.profile not in PROFILES:
            add(
                Problem(
                    ReasonCode.UNKNOWN_PROFILE, META_MEMBER, field="profile", detail=repr(ep.meta.profile)
                )
            )
        dur = effective_duration_s(ep) or 0.0
        if dur < WINDOW_S:
            add(Problem(ReasonCode.TOO_SHORT, META_MEMBER, detail=f"{dur:.1f} s < one {WINDOW_S} s window"))
        else:
            end_ns = ep.meta.started_ns + int(dur * 1e9)
            for s, cols in ep.streams.items():
                share = len(cols) / (dur * EXPECTED_HZ[s])
                if s == REQUIRED_SOURCE and share < ROW_GATE_SHARE:
                    add(
                        Problem(
                            ReasonCode.TOO_FEW_ROWS,
                            SOURCE_MEMBER[s],
                            detail=f"{len(cols)} rows, {share:.0%} of {dur:.0f} s x {EXPECTED_HZ[s]:g} Hz",
                        )
                    )
                elif share < SPARSE_SHARE:
                    add(
                        Problem(
                            ReasonCode(f"sparse_{s}"),
                            SOURCE_MEMBER[s],
                            detail=f"{len(cols)} rows, {share:.0%} of {dur:.0f} s x {EXPECTED_HZ[s]:g} Hz",
                        )
                    )
                gap = _longest_gap_s(cols.t_wall_ns, end_ns)
                if gap > LONG_GAP_S:
                    add(Problem(ReasonCode.LONG_GAP, SOURCE_MEMBER[s], detail=f"{gap:.1f} s without a row"))

    lines = sum(m.lines for m in ep.members.values())
    malformed = [p for p in ep.problems if p.code == ReasonCode.MALFORMED_LINE]
    n_bad = ep.malformed_lines
    if n_bad:
        share = n_bad / max(lines, 1)
        code = ReasonCode.TOO_MANY_MALFORMED if share > MALFORMED_REJECT_SHARE else ReasonCode.MALFORMED_LINES
        add(Problem(code, detail=f"{n_bad} of {lines} lines ({share:.2%})"))
    return out + malformed


def _longest_gap_s(t: np.ndarray, end_ns: int) -> float:
    # Inside the stream and after its last row; not before its first, since the guest
    # agent only starts once the VM has booted.
    if t.size == 0:
        return 0.0
    inner = float(np.diff(t).max()) if t.size > 1 else 0.0
    tail = float(end_ns - int(t.max()))
    return max(inner, tail, 0.0) / 1e9


def classify(ep: EpisodeData) -> tuple[str, list[ReasonCode]]:
    """(status, reason codes): the worst status among the reasons; ``accepted`` when none."""
    # single malformed lines are spelled out in details; the reason is their share
    codes: list[ReasonCode] = sorted(
        {p.code for p in findings(ep) if p.code != ReasonCode.MALFORMED_LINE},
        key=lambda c: (-STATUSES.index(REASONS[c].status), c),
    )
    status = worst(REASONS[c].status for c in codes)
    if ep.fatal:
        status = "errored"
    return status, codes


# --- the acceptance index -----------------------------------------------------------


class IndexRecord(msgspec.Struct, kw_only=True):
    """One archive's verdict: one line of `<store>/index.jsonl`."""

    path: str  # relative to the store, POSIX separators
    episode_id: str
    host: str
    profile: str | None = None
    sample: str | None = None
    status: str
    reasons: list[str] = []
    sha256: str = ""  # of the compressed archive
    bytes: int = 0  # compressed size (= what was hashed)
    mtime_ns: int = 0  # with bytes: the archive is unchanged, reuse this record
    sidecar_mtime_ns: int | None = None  # None: no sidecar when validated
    rows: dict[str, int] = {}  # per source
    malformed_lines: int = 0
    duration_s: float = 0.0
    started_ns: int | None = None
    ended_ns: int | None = None
    has_done_marker: bool = False
    details: list[str] = []  # the first MAX_DETAILS problems, "code member:line field f: detail"
    validator_version: int = VALIDATOR_VERSION


def index_record(
    ep: EpisodeData, rel_path: str, *, mtime_ns: int = 0, sidecar_mtime_ns: int | None = None
) -> IndexRecord:
    status, reasons = classify(ep)
    meta = ep.meta
    return IndexRecord(
        path=rel_path,
        episode_id=ep.episode_id,
        host=meta.host_id if meta is not None else ep.path.parent.name,
        profile=meta.profile if meta is not None else None,
        sample=meta.sample_id if meta is not None else None,
        status=status,
        reasons=[str(c) for c in reasons],
        sha256=ep.sha256,
        bytes=ep.compressed_bytes,
        mtime_ns=mtime_ns,
        sidecar_mtime_ns=sidecar_mtime_ns,
        rows=ep.rows,
        malformed_lines=ep.malformed_lines,
        duration_s=round(effective_duration_s(ep) or 0.0, 3),
        started_ns=meta.started_ns if meta is not None else None,
        ended_ns=meta.ended_ns if meta is not None else None,
        has_done_marker=ep.has_done_marker,
        details=[str(p) for p in findings(ep)[:MAX_DETAILS]],
    )


def crash_record(
    path: Path,
    rel_path: str,
    exc: BaseException,
    *,
    mtime_ns: int = 0,
    nbytes: int = 0,
    sidecar_mtime_ns: int | None = None,
) -> IndexRecord:
    """The record of an archive whose reading raised: errored, never a dead sweep."""
    return IndexRecord(
        path=rel_path,
        episode_id=episode_id_from_path(path),
        host=path.parent.name,
        status="errored",
        reasons=[str(ReasonCode.READER_CRASH)],
        bytes=nbytes,
        mtime_ns=mtime_ns,
        sidecar_mtime_ns=sidecar_mtime_ns,
        details=[f"reader_crash: {type(exc).__name__}: {exc}"],
    )


_INDEX_DECODER = msgspec.json.Decoder(IndexRecord)
_INDEX_ENCODER = msgspec.json.Encoder()


def read_index(path: Path | str) -> list[IndexRecord]:
    """The records of an index file; a bad line raises ValueError naming file, line and field."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _INDEX_DECODER.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    for i, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            try:
                _INDEX_DECODER.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ValueError(f"{path}:{i}: {exc}") from None
    raise ValueError(f"{path}: not JSONL of index records")


def write_index_atomic(path: Path | str, records: Iterable[IndexRecord]) -> None:
    """Write the index so that a crash leaves the old file or the new one, never half:
    temp file in the same directory, fsync, rename over, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)  # what a killed earlier run left
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            buf = bytearray()
            for rec in records:
                _INDEX_ENCODER.encode_into(rec, buf, len(buf))
                buf += b"\n"
                if len(buf) > 1 << 20:
                    fh.write(buf)
                    buf.clear()
            fh.write(buf)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write's ENOSPC names no file: name it
            raise OSError(e.errno, f"{e.strerror} (the previous index is kept)", str(path)) from e
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
