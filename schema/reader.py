"""Episode decoding: archive members -> typed records and numpy columns; ``read_episode``.

Used by the validator, the extractor and the edge daemon; the tailer and replay decode
labels and meta with the same decoders (:func:`decode_lines`, :func:`decode_meta`). The
untrusted-bytes layer (zstd frames, caps, tar, unsafe members) is :mod:`schema.archive`;
this module decides what each member means. A malformed line is counted with its member,
1-based line number and field, and the rest of the member still reads; nothing here raises
on bad content: what is wrong becomes a :class:`Problem` with a reason code.

Pipeline: :class:`~schema.archive.ArchiveWalk` -> member chunks of whole lines ->
``msgspec`` ``decode_lines`` -> :class:`~schema.columns.ColumnBuilder` -> numpy columns.

Pi-safe: numpy, msgspec, zstandard and the standard library only.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np

from .archive import (
    DEFAULT_LIMITS,
    ArchiveError,
    ArchiveWalk,
    Limits,
    MemberReader,
    iter_members,
    member_key,
    parse_sidecar,
    unsafe_reason,
)
from .columns import ColumnBuilder, StreamColumns
from .rows import ROW_TYPES, EpisodeMeta, Label, OrchestratorEvent, Stamped, error_field
from .validation import Problem, ReasonCode
from .vocab import (
    DONE_MEMBER,
    EVENTS_MEMBER,
    LABELS_MEMBER,
    META_MEMBER,
    SOURCE_MEMBER,
    episode_id_from_path,
    sidecar_path,
)

MEMBER_SOURCE: Final = {m: s for s, m in SOURCE_MEMBER.items()}

# Member bytes handed to the decoder at once: big enough that msgspec's decode_lines
# amortises the Python overhead, small enough to be negligible next to the caps.
CHUNK_BYTES: Final = 1 << 20

__all__ = [  # what callers import from here (some of it lives in schema.archive / schema.columns)
    "MEMBER_SOURCE",
    "ArchiveError",
    "EpisodeData",
    "Limits",
    "MemberInfo",
    "Problem",
    "ReasonCode",
    "StreamColumns",
    "decode_labels",
    "decode_lines",
    "decode_meta",
    "decode_rows",
    "episode_id_from_path",
    "iter_members",
    "line_times",
    "read_episode",
    "sidecar_path",
]


@dataclass
class MemberInfo:
    name: str
    bytes: int  # size in the tar header (decompressed)
    lines: int = 0  # physical lines seen (a last line without newline counts)
    rows: int = 0  # lines that decoded
    malformed: int = 0  # lines that did not (including over-long ones)


@dataclass
class EpisodeData:
    path: Path
    meta: EpisodeMeta | None = None
    labels: list[Label] = field(default_factory=list)
    events: list[OrchestratorEvent] = field(default_factory=list)
    streams: dict[str, StreamColumns] = field(default_factory=dict)  # only the sources present
    members: dict[str, MemberInfo] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    has_done_marker: bool = False
    sha256: str = ""  # of the compressed archive, always of the whole file
    compressed_bytes: int = 0
    fatal: bool = False  # True when unreadable (errored)
    sidecar_sha256: str | None = None  # what the sidecar says, when there is one

    @property
    def episode_id(self) -> str:
        if self.meta is not None:
            return self.meta.episode_id
        return episode_id_from_path(self.path)

    @property
    def rows(self) -> dict[str, int]:
        return {s: len(c) for s, c in self.streams.items()}

    @property
    def malformed_lines(self) -> int:
        return sum(m.malformed for m in self.members.values())


# --- decoding lines ---------------------------------------------------------------

_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def _is_utf8(data: bytes) -> bool:
    # msgspec skips the bytes of unknown fields without checking them, so check here;
    # telemetry is ASCII, which isascii() confirms at memory speed.
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_SMALL_CHUNK: Final = 16 << 10


def _scan(data: bytes) -> tuple[int, bool]:
    """(physical lines, has a blank line), with numpy: bytes.count and `in` on two
    bytes run at a fifth of this speed and were a sixth of the reader's time. A small
    chunk (the tailer's few live lines) is cheaper with bytes methods than numpy's set-up."""
    if len(data) < _SMALL_CHUNK:
        n = data.count(b"\n")
        lines = n + (1 if data and data[-1] != 10 else 0)
        return lines, bool(n) and (data[0] == 10 or b"\n\n" in data)
    nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    lines = nl.size + (1 if data and data[-1] != 10 else 0)
    blank = bool(nl.size) and (nl[0] == 0 or bool((nl[1:] - nl[:-1] == 1).any()))
    return lines, bool(blank)


_DECODERS: dict[type, msgspec.json.Decoder] = {}


def _decoder(tp: type) -> msgspec.json.Decoder:
    dec = _DECODERS.get(tp)
    if dec is None:
        dec = _DECODERS[tp] = msgspec.json.Decoder(tp)
    return dec


def decode_lines(
    tp: type, data: bytes, first_line: int = 1, member: str = ""
) -> tuple[list[Any], list[Problem]]:
    """JSONL bytes -> typed records and one Problem per bad line; never raises.

    Fast path: one ``decode_lines`` over the whole chunk. It counts only when the chunk
    has no blank line, is valid UTF-8, decodes, and yields exactly one record per
    physical line (``decode_lines`` would otherwise accept two objects on one line).
    A chunk that fails is halved at a newline and each half tried again, down to a few
    lines decoded one by one, so one bad line costs about two chunks of decoding, not a
    chunk of per-line calls. Non-finite numbers need no check of their own: msgspec
    refuses ``NaN`` and ``Infinity`` as JSON and ``1e999`` as out of range.
    """
    records: list[Any] = []
    problems: list[Problem] = []
    _decode_span(_decoder(tp), data, first_line, member or None, records, problems)
    return records, problems


_LEAF_LINES: Final = 16


def _decode_span(
    dec: msgspec.json.Decoder,
    data: bytes,
    first_line: int,
    member: str | None,
    records: list[Any],
    problems: list[Problem],
    scan: tuple[int, bool] | None = None,
) -> None:
    lines, blank = scan or _scan(data)
    if not blank and _is_utf8(data):
        try:
            got = dec.decode_lines(data)
        except _DECODE_ERRORS:
            pass
        else:
            if len(got) == lines:
                records.extend(got)
                return
    if lines > _LEAF_LINES:
        cut = data.find(b"\n", len(data) // 2)
        if 0 <= cut < len(data) - 1:
            left = data[: cut + 1]
            left_scan = _scan(left)
            _decode_span(dec, left, first_line, member, records, problems, left_scan)
            _decode_span(dec, data[cut + 1 :], first_line + left_scan[0], member, records, problems)
            return
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            if not _is_utf8(line):
                raise UnicodeDecodeError("utf-8", line, 0, len(line), "line is not UTF-8")
            records.append(dec.decode(line))
        except _DECODE_ERRORS as exc:
            msg = str(exc) if not isinstance(exc, UnicodeDecodeError) else "invalid UTF-8 bytes"
            problems.append(Problem(ReasonCode.MALFORMED_LINE, member, first_line + i, error_field(msg), msg))


def decode_rows(
    source: str, data: bytes, first_line: int = 1, member: str = ""
) -> tuple[StreamColumns, list[Problem]]:
    """JSONL bytes (complete lines) -> columns; bad lines become Problems, never exceptions."""
    rows, problems = decode_lines(ROW_TYPES[source], data, first_line, member or SOURCE_MEMBER[source])
    cols = ColumnBuilder(source)
    cols.add_rows(rows)
    cols.malformed = len(problems)
    return cols.build(), problems


def decode_labels(data: bytes, first_line: int = 1) -> tuple[list[Label], list[Problem]]:
    """labels.jsonl bytes -> labels and one Problem per bad line (the phase is not checked here)."""
    return decode_lines(Label, data, first_line, LABELS_MEMBER)


def decode_meta(data: bytes) -> EpisodeMeta:
    """meta.json bytes -> EpisodeMeta; raises ``msgspec.DecodeError`` (a ``ValueError``) naming the field."""
    return _META_DECODER.decode(data)


_META_DECODER: Final = msgspec.json.Decoder(EpisodeMeta)
NO_TIME: Final = int(np.iinfo(np.int64).min)


def line_times(data: bytes) -> np.ndarray:
    """int64 (lines,) ``t_wall_ns`` of each physical line of JSONL bytes (every member's
    records carry one), :data:`NO_TIME` where a line does not decode: one ``decode_lines``
    when the whole member is clean, line by line otherwise."""
    dec = _decoder(Stamped)
    lines, blank = _scan(data)
    if not blank and _is_utf8(data):
        try:
            got = dec.decode_lines(data)
        except _DECODE_ERRORS:
            pass
        else:
            if len(got) == lines:
                return np.fromiter((r.t_wall_ns for r in got), np.int64, lines)
    out = np.full(lines, NO_TIME, np.int64)
    for i, line in enumerate(data.split(b"\n")[:lines]):
        try:
            out[i] = dec.decode(line).t_wall_ns
        except (*_DECODE_ERRORS, OverflowError):
            pass
    return out


# --- one member ---------------------------------------------------------------------


def _line_chunks(
    f: MemberReader, info: MemberInfo, limits: Limits, problems: list[Problem]
) -> Iterator[tuple[int, bytes, tuple[int, bool]]]:
    """A member's bytes as (first line number, whole lines, their _scan) chunks, never holding more
    than a chunk plus one line; a line over ``max_line_bytes`` is dropped as it streams
    past and reported as ``line_too_long``."""
    carry = b""
    line_no = 1  # number of the first line in carry
    dropping = False  # inside an over-long line, discarding to its newline
    while True:
        block = f.read(CHUNK_BYTES)
        if not block:
            break
        if dropping:
            nl = block.find(b"\n")
            if nl < 0:
                continue
            block = block[nl + 1 :]
            line_no += 1
            dropping = False
        buf = carry + block if carry else block
        cut = buf.rfind(b"\n")
        if cut < 0:
            carry = buf
        else:
            whole, carry = buf[: cut + 1], buf[cut + 1 :]
            scan = _scan(whole)
            info.lines += scan[0]
            yield line_no, whole, scan
            line_no += scan[0]
        if len(carry) > limits.max_line_bytes:
            problems.append(
                Problem(
                    ReasonCode.LINE_TOO_LONG,
                    info.name,
                    line_no,
                    None,
                    f"line longer than {limits.max_line_bytes} bytes",
                )
            )
            info.lines += 1
            info.malformed += 1
            carry = b""
            dropping = True
    if carry and not dropping:
        info.lines += 1
        yield line_no, carry, (1, False)


def read_episode(
    path: Path | str, *, limits: Limits = DEFAULT_LIMITS, verify_sidecar: bool = True
) -> EpisodeData:
    """Read one archive in a single streaming pass. Never raises on bad content: what is
    wrong lands in ``problems``, and ``fatal`` is set when the archive cannot be read."""
    path = Path(path)
    ep = EpisodeData(path=path)
    expected = parse_sidecar(path, ep.problems) if verify_sidecar else None
    ep.sidecar_sha256 = expected
    try:
        with open(path, "rb") as fh:  # what goes wrong inside the walk, the walk records
            walk = ArchiveWalk(fh, limits, ep.problems)
            walk.run(lambda ti, member: _read_member(member, ti, ep, limits))
    except OSError as exc:
        ep.problems.append(Problem(ReasonCode.IO_ERROR, detail=str(exc)))
        ep.fatal = True
        return ep
    ep.fatal |= walk.fatal
    ep.sha256 = walk.sha256
    ep.compressed_bytes = walk.compressed_bytes
    if expected is not None and expected != ep.sha256:
        ep.problems.append(
            Problem(ReasonCode.SHA256_MISMATCH, detail=f"sidecar {expected}, archive {ep.sha256}")
        )
        ep.fatal = True
    if any(p.code == ReasonCode.META_UNREADABLE for p in ep.problems):
        ep.fatal = True
    return ep


def _read_member(f: MemberReader, ti: tarfile.TarInfo, ep: EpisodeData, limits: Limits) -> None:
    why = unsafe_reason(ti)
    if why is not None:
        ep.problems.append(Problem(ReasonCode.UNSAFE_MEMBER, ti.name, None, None, why))
        return
    if ti.isdir():
        return
    key = member_key(ti.name)
    if key in ep.members:
        ep.problems.append(Problem(ReasonCode.DUPLICATE_MEMBER, key, None, None, "second copy ignored"))
        return
    info = ep.members[key] = MemberInfo(key, ti.size)
    if key == DONE_MEMBER:
        ep.has_done_marker = True
        return
    if key not in (META_MEMBER, LABELS_MEMBER, EVENTS_MEMBER) and key not in MEMBER_SOURCE:
        return  # network.pcap and anything unknown: the trainer ignores it, skipped unread
    if ti.size > limits.max_member_bytes:
        ep.problems.append(
            Problem(
                ReasonCode.MEMBER_TOO_LARGE, key, None, None, f"{ti.size} bytes > {limits.max_member_bytes}"
            )
        )
        return
    if key == META_MEMBER:
        data = f.read_capped(limits.max_line_bytes)
        try:
            if data is None:
                raise ValueError(f"larger than {limits.max_line_bytes} bytes")
            ep.meta = decode_meta(data)
            info.rows = 1
        except (ValueError, *_DECODE_ERRORS) as exc:
            info.malformed = 1
            ep.problems.append(Problem(ReasonCode.META_UNREADABLE, key, 1, error_field(str(exc)), str(exc)))
        return
    source = MEMBER_SOURCE.get(key)
    builder = ColumnBuilder(source) if source else None
    records: list[Any] = ep.labels if key == LABELS_MEMBER else ep.events
    tp = ROW_TYPES[source] if source else (Label if key == LABELS_MEMBER else OrchestratorEvent)
    dec = _decoder(tp)
    for first, chunk, scan in _line_chunks(f, info, limits, ep.problems):
        rows: list[Any] = []
        problems: list[Problem] = []
        _decode_span(dec, chunk, first, key, rows, problems, scan)
        info.rows += len(rows)
        info.malformed += len(problems)
        ep.problems.extend(problems)
        if builder is not None:
            builder.add_rows(rows)
        else:
            records.extend(rows)
    if builder is not None:
        builder.malformed = info.malformed
        ep.streams[source] = builder.build()  # type: ignore[index]
