"""The one streaming archive reader: ``<episode>.tar.zst`` -> typed, columnar episode data.

Used by the validator, the extractor and the edge daemon. It never extracts to disk and
never trusts the archive: unsafe members (absolute or ``..`` paths, links, devices) are
refused, decompressed bytes are capped per member and in total, lines are capped in
length, so a zstd bomb or a 100 MB line costs bounded memory and becomes a
:class:`Problem` with a reason code instead of an exception. A malformed line is counted
with its member, 1-based line number and field, and the rest of the member still reads.

Pipeline: file -> sha256 + zstd frame walker (:class:`_RawTap`) -> zstandard stream
reader -> byte cap (:class:`_CappedReader`) -> tar headers (:func:`_tar_members`) ->
member chunks of whole lines -> ``msgspec`` ``decode_lines`` -> numpy columns.

Pi-safe: numpy, msgspec, zstandard and the standard library only.
"""

from __future__ import annotations

import hashlib
import io
import operator
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any, Final

import msgspec
import numpy as np
import zstandard

from .rows import ROW_TYPES, EpisodeMeta, Label, OrchestratorEvent, row_fields
from .vocab import DONE_MEMBER, EVENTS_MEMBER, LABELS_MEMBER, META_MEMBER, SOURCE_MEMBER

MEMBER_SOURCE: Final = {m: s for s, m in SOURCE_MEMBER.items()}

# Member bytes handed to the decoder at once: big enough that msgspec's decode_lines
# amortises the Python overhead, small enough to be negligible next to the caps.
CHUNK_BYTES: Final = 1 << 20
_RAW_READ: Final = 1 << 20
_SIDECAR_MAX: Final = 4096


@dataclass(frozen=True)
class Limits:
    """Bounds on what one archive may cost; a zstd bomb or a giant line costs bounded memory."""

    max_member_bytes: int = 256 << 20
    max_total_bytes: int = 1 << 30
    max_line_bytes: int = 1 << 20


@dataclass
class Problem:
    """One thing wrong, machine-readable and pointing at its place."""

    code: str  # reason code, see schema.validation.REASONS
    member: str | None = None  # archive member name (inside the episode directory)
    line: int | None = None  # 1-based line number in that member
    field: str | None = None  # JSON field when known (from msgspec's "$.field")
    detail: str = ""

    def __str__(self) -> str:
        where = self.member or ""
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" field {self.field}"
        head = f"{self.code} {where}" if where else self.code
        return f"{head}: {self.detail}" if self.detail else head


@dataclass
class StreamColumns:
    """One telemetry stream as columns (what the extractor reads)."""

    source: str
    t_wall_ns: np.ndarray  # int64 (n,)
    t_mono_ns: np.ndarray  # int64 (n,)
    values: np.ndarray  # float64 (n, len(rows.row_fields(source)))
    malformed: int = 0

    def __len__(self) -> int:
        return int(self.t_wall_ns.shape[0])

    @property
    def fields(self) -> tuple[str, ...]:
        return row_fields(self.source)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.fields.index(name)]


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


def episode_id_from_path(path: Path | str) -> str:
    name = Path(path).name
    return name[: -len(".tar.zst")] if name.endswith(".tar.zst") else name


def sidecar_path(path: Path | str) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".sha256")


# --- decoding lines ---------------------------------------------------------------

_FIELD_AT = re.compile(r"at `\$(?:\[\d+\])?\.([A-Za-z_]\w*)")
_FIELD_MISSING = re.compile(r"missing required field `([A-Za-z_]\w*)`")
_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def _field_of(message: str) -> str | None:
    m = _FIELD_AT.search(message) or _FIELD_MISSING.search(message)
    return m.group(1) if m else None


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


def _scan(data: bytes) -> tuple[int, bool]:
    """(physical lines, has a blank line), with numpy: bytes.count and `in` on two
    bytes run at a fifth of this speed and were a sixth of the reader's time."""
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
            problems.append(Problem("malformed_line", member, first_line + i, _field_of(msg), msg))


class _ColumnBuilder:
    """Typed rows -> int64 clock columns and float64 value columns, chunk by chunk."""

    _CLOCKS: Final = operator.attrgetter("t_wall_ns", "t_mono_ns")

    def __init__(self, source: str) -> None:
        self.source = source
        self.width = len(row_fields(source))
        self._values = operator.attrgetter(*row_fields(source))
        self._t: list[np.ndarray] = []  # (n, 2) per chunk
        self._v: list[np.ndarray] = []  # (n, width) per chunk
        self.malformed = 0

    def add(self, rows: list[Any]) -> None:
        # One flat fromiter over every row's fields: no nested-list shape inference as
        # in np.array(list_of_tuples), and already in rows x fields order.
        n = len(rows)
        if not n:
            return
        self._t.append(
            np.fromiter(chain.from_iterable(map(self._CLOCKS, rows)), np.int64, 2 * n).reshape(n, 2)
        )
        self._v.append(
            np.fromiter(chain.from_iterable(map(self._values, rows)), np.float64, self.width * n).reshape(
                n, self.width
            )
        )

    def build(self) -> StreamColumns:
        t = (
            np.concatenate(self._t)
            if len(self._t) > 1
            else (self._t[0] if self._t else np.empty((0, 2), np.int64))
        )
        v = (
            np.concatenate(self._v)
            if len(self._v) > 1
            else (self._v[0] if self._v else np.empty((0, self.width)))
        )
        return StreamColumns(self.source, t[:, 0].copy(), t[:, 1].copy(), v, self.malformed)


def decode_rows(
    source: str, data: bytes, first_line: int = 1, member: str = ""
) -> tuple[StreamColumns, list[Problem]]:
    """JSONL bytes (complete lines) -> columns; bad lines become Problems, never exceptions."""
    rows, problems = decode_lines(ROW_TYPES[source], data, first_line, member or SOURCE_MEMBER[source])
    cols = _ColumnBuilder(source)
    cols.add(rows)
    cols.malformed = len(problems)
    return cols.build(), problems


# --- the byte pipeline ------------------------------------------------------------


class _FrameWalker:
    """Follows zstd frame and block headers (never their contents) as the compressed
    bytes pass, so a truncated stream is told from a complete one: zstandard's stream
    reader ends a cut-off frame silently with a short read."""

    _MAGIC: Final = 0xFD2FB528

    def __init__(self) -> None:
        self.state = "magic"
        self.need = 4
        self.buf = b""
        self.skip = 0
        self.frames = 0
        self.checksum = False
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and self.error is None:
            if self.skip:
                take = min(self.skip, n - pos)
                self.skip -= take
                pos += take
                continue
            take = min(self.need - len(self.buf), n - pos)
            self.buf += data[pos : pos + take]
            pos += take
            if len(self.buf) == self.need:
                head, self.buf = self.buf, b""
                self._header(head)

    def _header(self, b: bytes) -> None:
        st = self.state
        if st == "magic":
            magic = int.from_bytes(b, "little")
            if magic == self._MAGIC:
                self.state, self.need = "descriptor", 1
            elif 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                self.state, self.need = "skippable", 4
            else:
                self.error = f"not a zstd frame (magic {magic:#010x})"
        elif st == "descriptor":
            d = b[0]
            single = (d >> 5) & 1
            self.checksum = bool((d >> 2) & 1)
            size = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + ((1 if single else 0), 2, 4, 8)[d >> 6]
            self.state, self.need = ("header", size) if size else ("block", 3)
        elif st == "header":
            self.state, self.need = "block", 3
        elif st == "block":
            h = int.from_bytes(b, "little")
            kind, size = (h >> 1) & 3, h >> 3
            if kind == 3:
                self.error = "reserved zstd block type"
                return
            self.skip = 1 if kind == 1 else size  # RLE blocks store one byte
            if h & 1:  # last block of the frame
                if self.checksum:
                    self.state, self.need = "checksum", 4
                else:
                    self.frames += 1
                    self.state, self.need = "magic", 4
        elif st == "checksum":
            self.frames += 1
            self.state, self.need = "magic", 4
        elif st == "skippable":
            self.skip = int.from_bytes(b, "little")
            self.state, self.need = "magic", 4

    def complete(self) -> bool:
        return (
            self.error is None
            and self.frames > 0
            and self.state == "magic"
            and not self.buf
            and not self.skip
        )


class _RawTap:
    """The compressed file as read: hashed and frame-walked on the way through."""

    def __init__(self, f: io.BufferedReader) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.walker = _FrameWalker()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size if size and size > 0 else _RAW_READ)
        if data:
            self.sha.update(data)
            self.nbytes += len(data)
            self.walker.feed(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file after an early stop, so sha256 is always the whole file's."""
        while self.read(_RAW_READ):
            pass


class _LimitHit(Exception):
    pass


class _CappedReader:
    """Decompressed bytes with a running total: past the cap the read raises, so a bomb
    stops wherever it is, even inside a member being skipped."""

    def __init__(self, inner: Any, cap: int) -> None:
        self._inner = inner
        self._cap = cap
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size if size and size > 0 else _RAW_READ)
        self.total += len(data)
        if self.total > self._cap:
            raise _LimitHit(f"more than {self._cap} decompressed bytes")
        return data


_BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(_BLOCK)
_PAX_TYPES: Final = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG: Final = {tarfile.GNUTYPE_LONGNAME: "path", tarfile.GNUTYPE_LONGLINK: "linkpath"}
_MAX_EXT_HEADER: Final = 1 << 20


def _read_exact(r: Any, n: int) -> bytes:
    data = r.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = r.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _MemberReader:
    """One member's bytes, read straight from the decompressor and never past its end."""

    def __init__(self, r: Any, size: int) -> None:
        self._r = r
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = _read_exact(self._r, n)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        self.left -= n
        return data

    def skip(self) -> None:
        while self.left > 0:
            self.read(_RAW_READ)


def _skip(r: Any, n: int) -> None:
    if n and len(_read_exact(r, n)) < n:
        raise tarfile.ReadError("unexpected end of data")


def _parse_pax(buf: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        sp = buf.find(b" ", pos)
        try:
            length = int(buf[pos:sp])
        except ValueError:
            raise tarfile.ReadError("invalid pax header") from None
        if sp < 0 or length <= sp - pos:
            raise tarfile.ReadError("invalid pax header")
        key, _, value = buf[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_members(r: Any) -> Iterator[tuple[tarfile.TarInfo, _MemberReader]]:
    """The members of a tar stream, in order, each with a reader of its data.

    ``tarfile``'s stream mode copies every byte several times through its buffer; this
    reads headers with ``TarInfo.frombuf`` (checksums, ustar prefix, base-256 sizes)
    and member data straight from the decompressor. PAX and GNU long-name headers
    apply to the member after them, as in tarfile. A stream that ends before the
    end-of-archive block is corrupt (a cut archive), never a short success.
    """
    pending: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    while True:
        hdr = _read_exact(r, _BLOCK)
        if len(hdr) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data: no end-of-archive block")
        if hdr == _ZERO_BLOCK:
            return
        ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        pad = -ti.size % _BLOCK
        if ti.type in _PAX_TYPES or ti.type in _GNU_LONG:
            if ti.size > _MAX_EXT_HEADER:
                raise tarfile.ReadError(f"extended header of {ti.size} bytes")
            data = _read_exact(r, ti.size)
            if len(data) < ti.size:
                raise tarfile.ReadError("unexpected end of data")
            _skip(r, pad)
            if ti.type in _GNU_LONG:
                pending[_GNU_LONG[ti.type]] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                (global_pax if ti.type == tarfile.XGLTYPE else pending).update(_parse_pax(data))
            continue
        ext = {**global_pax, **pending}
        pending = {}
        if "path" in ext:
            ti.name = ext["path"]
        if "linkpath" in ext:
            ti.linkname = ext["linkpath"]
        if "size" in ext:
            try:
                ti.size = int(ext["size"])
            except ValueError:
                raise tarfile.ReadError("invalid pax size") from None
            pad = -ti.size % _BLOCK
        # As tarfile: only regular files (and types it does not know) carry data.
        has_data = ti.isreg() or ti.type not in tarfile.SUPPORTED_TYPES
        member = _MemberReader(r, ti.size if has_data else 0)
        yield ti, member
        member.skip()
        if has_data:
            _skip(r, pad)


def _unsafe(ti: tarfile.TarInfo) -> str | None:
    p = PurePosixPath(ti.name)
    if ti.name.startswith("/") or p.is_absolute():
        return "absolute path"
    if ".." in p.parts:
        return "'..' in path"
    if ti.issym():
        return f"symlink to {ti.linkname!r}"
    if ti.islnk():
        return f"hard link to {ti.linkname!r}"
    if ti.ischr() or ti.isblk():
        return "device node"
    if ti.isfifo():
        return "fifo"
    if not (ti.isfile() or ti.isdir()):
        return f"member type {ti.type!r}"
    return None


def _member_key(name: str) -> str:
    """`<episode_id>/labels.jsonl` -> `labels.jsonl`; deeper paths keep their tail."""
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 else name


def _line_chunks(
    f: Any, info: MemberInfo, limits: Limits, problems: list[Problem]
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
                    "line_too_long",
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


def _read_member_bytes(f: Any, limit: int) -> bytes | None:
    data = f.read(limit + 1)
    return None if len(data) > limit else data


def _parse_sidecar(path: Path, problems: list[Problem]) -> str | None:
    sp = sidecar_path(path)
    try:
        with open(sp, "rb") as fh:
            raw = fh.read(_SIDECAR_MAX + 1)
    except FileNotFoundError:
        problems.append(Problem("no_sidecar", None, None, None, f"{sp.name} not found"))
        return None
    except OSError as exc:
        problems.append(Problem("sidecar_malformed", None, None, None, f"{sp.name}: {exc}"))
        return None
    parts = raw.decode("utf-8", "replace").split()
    digest = parts[0].lower() if parts else ""
    name = parts[1].lstrip("*") if len(parts) > 1 else None
    if len(raw) > _SIDECAR_MAX or not re.fullmatch(r"[0-9a-f]{64}", digest) or (name and name != path.name):
        problems.append(
            Problem("sidecar_malformed", None, None, None, f"{sp.name}: expected '<sha256>  {path.name}'")
        )
        return None
    return digest


def read_episode(path: Path | str, *, limits: Limits = Limits(), verify_sidecar: bool = True) -> EpisodeData:
    """Read one archive in a single streaming pass. Never raises on bad content: what is
    wrong lands in ``problems``, and ``fatal`` is set when the archive cannot be read."""
    path = Path(path)
    ep = EpisodeData(path=path)
    expected = _parse_sidecar(path, ep.problems) if verify_sidecar else None
    ep.sidecar_sha256 = expected
    try:
        fh = open(path, "rb")
    except OSError as exc:
        ep.problems.append(Problem("io_error", None, None, None, str(exc)))
        ep.fatal = True
        return ep
    with fh:
        tap = _RawTap(fh)
        capped = _CappedReader(
            zstandard.ZstdDecompressor().stream_reader(tap, read_size=_RAW_READ, read_across_frames=True),
            limits.max_total_bytes,
        )
        try:
            for ti, member in _tar_members(capped):
                _read_member(member, ti, ep, limits)
        except _LimitHit as exc:
            ep.problems.append(Problem("archive_too_large", None, None, None, str(exc)))
        except zstandard.ZstdError as exc:
            ep.problems.append(Problem("zstd_corrupt", None, None, None, str(exc)))
            ep.fatal = True
        except tarfile.TarError as exc:
            ep.problems.append(Problem("tar_corrupt", None, None, None, str(exc)))
            ep.fatal = True
        except OSError as exc:
            ep.problems.append(Problem("io_error", None, None, None, str(exc)))
            ep.fatal = True
        tap.drain()
        walker = tap.walker
        if not walker.complete() and not any(p.code == "zstd_corrupt" for p in ep.problems):
            detail = walker.error or "zstd stream ends inside a frame (truncated)"
            ep.problems.append(Problem("zstd_corrupt", None, None, None, detail))
            ep.fatal = True
        ep.sha256 = tap.sha.hexdigest()
        ep.compressed_bytes = tap.nbytes
    if expected is not None and expected != ep.sha256:
        ep.problems.append(
            Problem("sha256_mismatch", None, None, None, f"sidecar {expected}, archive {ep.sha256}")
        )
        ep.fatal = True
    if any(p.code == "meta_unreadable" for p in ep.problems):
        ep.fatal = True
    return ep


class ArchiveError(Exception):
    """An archive that cannot be walked: its path and what is wrong with it."""


def iter_members(path: Path | str, *, limits: Limits = Limits()) -> Iterator[tuple[str, bytes]]:
    """``(member name inside <episode_id>/, bytes)`` of an archive's safe regular files.

    The same streaming walk as ``read_episode`` (no temporary files, the same caps): unsafe
    members (absolute, ``..``, links, devices) and members over the per-member cap are
    skipped; an unreadable archive or one over the total cap raises ``ArchiveError``."""
    path = Path(path)
    with open(path, "rb") as fh:
        capped = _CappedReader(
            zstandard.ZstdDecompressor().stream_reader(fh, read_size=_RAW_READ, read_across_frames=True),
            limits.max_total_bytes,
        )
        try:
            for ti, member in _tar_members(capped):
                if _unsafe(ti) is not None or not ti.isfile() or ti.size > limits.max_member_bytes:
                    continue
                yield _member_key(ti.name), member.read()
        except (_LimitHit, zstandard.ZstdError, tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"{path}: unreadable archive: {exc}") from None


def _read_member(f: _MemberReader, ti: tarfile.TarInfo, ep: EpisodeData, limits: Limits) -> None:
    why = _unsafe(ti)
    if why is not None:
        ep.problems.append(Problem("unsafe_member", ti.name, None, None, why))
        return
    if ti.isdir():
        return
    key = _member_key(ti.name)
    if key in ep.members:
        ep.problems.append(Problem("duplicate_member", key, None, None, "second copy ignored"))
        return
    info = ep.members[key] = MemberInfo(key, ti.size)
    if key == DONE_MEMBER:
        ep.has_done_marker = True
        return
    if key not in (META_MEMBER, LABELS_MEMBER, EVENTS_MEMBER) and key not in MEMBER_SOURCE:
        return  # network.pcap and anything unknown: the trainer ignores it, skipped unread
    if ti.size > limits.max_member_bytes:
        ep.problems.append(
            Problem("member_too_large", key, None, None, f"{ti.size} bytes > {limits.max_member_bytes}")
        )
        return
    if key == META_MEMBER:
        data = _read_member_bytes(f, limits.max_line_bytes)
        try:
            if data is None:
                raise ValueError(f"larger than {limits.max_line_bytes} bytes")
            ep.meta = msgspec.json.decode(data, type=EpisodeMeta)
            info.rows = 1
        except (ValueError, *_DECODE_ERRORS) as exc:
            info.malformed = 1
            ep.problems.append(Problem("meta_unreadable", key, 1, _field_of(str(exc)), str(exc)))
        return
    source = MEMBER_SOURCE.get(key)
    builder = _ColumnBuilder(source) if source else None
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
            builder.add(rows)
        else:
            records.extend(rows)
    if builder is not None:
        builder.malformed = info.malformed
        ep.streams[source] = builder.build()  # type: ignore[index]
