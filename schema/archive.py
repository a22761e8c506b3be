"""Untrusted archive bytes: ``<episode>.tar.zst`` -> tar members, never extracted to disk.

Pipeline: file -> sha256 + zstd frame walker (:class:`Tap`) -> zstandard stream reader ->
byte cap (:class:`CappedReader`) -> tar headers (:func:`tar_members`) -> one
:class:`MemberReader` per member. :class:`ArchiveWalk` runs it and turns whatever goes wrong
into :class:`~schema.validation.Problem` s with reason codes (the policy is
:data:`WALK_ERRORS`); :func:`iter_members` is the same walk for callers that want bytes.

Nothing here trusts the archive: unsafe members (absolute or ``..`` paths, links, devices)
are named by :func:`unsafe_reason`, decompressed bytes are capped in total, a cut-off zstd
frame is caught by following frame headers, and the decompressor is always run to the end
of the last frame so that every frame's content checksum, where the producer wrote one, is
verified (``zstd_checksum``). A frame without a checksum has only the sidecar's sha256 to
guard it (docs/PRODUCERS.md).

Pi-safe: zstandard and the standard library only.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final, Protocol

import zstandard

from .validation import Problem, ReasonCode
from .vocab import sidecar_path

RAW_READ: Final = 1 << 20
_SIDECAR_MAX: Final = 4096


@dataclass(frozen=True)
class Limits:
    """Bounds on what one archive may cost; a zstd bomb or a giant line costs bounded memory."""

    max_member_bytes: int = 256 << 20
    max_total_bytes: int = 1 << 30
    max_line_bytes: int = 1 << 20


DEFAULT_LIMITS: Final = Limits()


class ArchiveError(Exception):
    """An archive that cannot be walked: its path and what is wrong with it."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# --- the compressed bytes ------------------------------------------------------------


class FrameWalker:
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
        self.checksum = False  # the current frame carries a content checksum
        self.frames_with_checksum = 0
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
            self.frames_with_checksum += 1
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


class Tap:
    """The compressed file as read: hashed and frame-walked on the way through."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.walker = FrameWalker()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size if size and size > 0 else RAW_READ)
        if data:
            self.sha.update(data)
            self.nbytes += len(data)
            self.walker.feed(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file after an early stop, so sha256 is always the whole file's."""
        while self.read(RAW_READ):
            pass


# --- the decompressed bytes ----------------------------------------------------------


class LimitHit(Exception):
    pass


class CappedReader:
    """Decompressed bytes with a running total: past the cap the read raises, so a bomb
    stops wherever it is, even inside a member being skipped."""

    def __init__(self, inner: Readable, cap: int) -> None:
        self._inner = inner
        self._cap = cap
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size if size and size > 0 else RAW_READ)
        self.total += len(data)
        if self.total > self._cap:
            raise LimitHit(f"more than {self._cap} decompressed bytes")
        return data

    def read_to_end(self) -> None:
        """Decompress what follows the tar's end (its padding) to the end of the last frame,
        so zstandard checks every frame's content checksum; bounded by the same cap."""
        while self.read(RAW_READ):
            pass


def decompressed(raw: Readable, limits: Limits) -> CappedReader:
    return CappedReader(
        zstandard.ZstdDecompressor().stream_reader(
            raw,  # type: ignore[arg-type]  # anything with read() will do
            read_size=RAW_READ,
            read_across_frames=True,
        ),
        limits.max_total_bytes,
    )


def _is_checksum_error(exc: zstandard.ZstdError) -> bool:
    return "checksum" in str(exc).lower()


# --- tar -------------------------------------------------------------------------------

_BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(_BLOCK)
_PAX_TYPES: Final = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG: Final = {tarfile.GNUTYPE_LONGNAME: "path", tarfile.GNUTYPE_LONGLINK: "linkpath"}
_MAX_EXT_HEADER: Final = 1 << 20


def read_exact(r: Readable, n: int) -> bytes:
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


class MemberReader:
    """One member's bytes, read straight from the decompressor and never past its end."""

    def __init__(self, r: Readable, size: int) -> None:
        self._r = r
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = read_exact(self._r, n)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        self.left -= n
        return data

    def read_capped(self, limit: int) -> bytes | None:
        """The whole member, or None when it is longer than ``limit`` bytes."""
        data = self.read(limit + 1)
        return None if len(data) > limit else data

    def skip(self) -> None:
        while self.left > 0:
            self.read(RAW_READ)


def _skip(r: Readable, n: int) -> None:
    if n and len(read_exact(r, n)) < n:
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


def tar_members(r: Readable) -> Iterator[tuple[tarfile.TarInfo, MemberReader]]:
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
        hdr = read_exact(r, _BLOCK)
        if len(hdr) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data: no end-of-archive block")
        if hdr == _ZERO_BLOCK:
            return
        ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        pad = -ti.size % _BLOCK
        if ti.type in _PAX_TYPES or ti.type in _GNU_LONG:
            if ti.size > _MAX_EXT_HEADER:
                raise tarfile.ReadError(f"extended header of {ti.size} bytes")
            data = read_exact(r, ti.size)
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
        member = MemberReader(r, ti.size if has_data else 0)
        yield ti, member
        member.skip()
        if has_data:
            _skip(r, pad)


def unsafe_reason(ti: tarfile.TarInfo) -> str | None:
    """Why a member must not be used (absolute, ``..``, link, device, fifo), or None."""
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


def member_key(name: str) -> str:
    """`<episode_id>/labels.jsonl` -> `labels.jsonl`; deeper paths keep their tail."""
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 else name


# --- the walk and its error policy ---------------------------------------------------

# What an exception out of the walk means: (reason, fatal). Order matters (first match).
WALK_ERRORS: Final[tuple[tuple[type[BaseException], ReasonCode, bool], ...]] = (
    (LimitHit, ReasonCode.ARCHIVE_TOO_LARGE, False),
    (zstandard.ZstdError, ReasonCode.ZSTD_CORRUPT, True),  # ZSTD_CHECKSUM when the text says so
    (tarfile.TarError, ReasonCode.TAR_CORRUPT, True),
    (OSError, ReasonCode.IO_ERROR, True),
)
_ZSTD_FATAL: Final = (ReasonCode.ZSTD_CORRUPT, ReasonCode.ZSTD_CHECKSUM)


class ArchiveWalk:
    """One streaming pass over an open archive: ``run(visit)`` calls ``visit(info, reader)``
    per tar member; what goes wrong lands in ``problems`` (the caller's list, so the order
    of member and archive problems is kept) and sets ``fatal``. sha256 is always of the
    whole file."""

    def __init__(self, fh: BinaryIO, limits: Limits, problems: list[Problem]) -> None:
        self.tap = Tap(fh)
        self._data = decompressed(self.tap, limits)
        self.problems = problems
        self.fatal = False

    def run(self, visit: Callable[[tarfile.TarInfo, MemberReader], None]) -> None:
        try:
            for ti, member in tar_members(self._data):
                visit(ti, member)
            self._data.read_to_end()
        except (LimitHit, zstandard.ZstdError, tarfile.TarError, OSError) as exc:
            self._fail(exc)
        self.tap.drain()
        walker = self.tap.walker
        if not walker.complete() and not any(p.code in _ZSTD_FATAL for p in self.problems):
            detail = walker.error or "zstd stream ends inside a frame (truncated)"
            self.problems.append(Problem(ReasonCode.ZSTD_CORRUPT, detail=detail))
            self.fatal = True

    def _fail(self, exc: BaseException) -> None:
        for kind, code, fatal in WALK_ERRORS:
            if isinstance(exc, kind):
                if isinstance(exc, zstandard.ZstdError) and _is_checksum_error(exc):
                    code = ReasonCode.ZSTD_CHECKSUM
                self.problems.append(Problem(code, detail=str(exc)))
                self.fatal |= fatal
                return
        raise exc  # pragma: no cover - run() catches only the kinds above

    @property
    def sha256(self) -> str:
        return self.tap.sha.hexdigest()

    @property
    def compressed_bytes(self) -> int:
        return self.tap.nbytes


def iter_members(path: Path | str, *, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, bytes]]:
    """``(member name inside <episode_id>/, bytes)`` of an archive's safe regular files.

    The same streaming walk as ``read_episode`` (no temporary files, the same caps, frame
    checksums verified at the end): unsafe members and members over the per-member cap are
    skipped; an unreadable archive or one over the total cap raises ``ArchiveError``."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = decompressed(fh, limits)
        try:
            for ti, member in tar_members(data):
                if unsafe_reason(ti) is not None or not ti.isfile() or ti.size > limits.max_member_bytes:
                    continue
                yield member_key(ti.name), member.read()
            data.read_to_end()
        except (LimitHit, zstandard.ZstdError, tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"{path}: unreadable archive: {exc}") from None


# --- the sidecar -----------------------------------------------------------------------

_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


def parse_sidecar(path: Path, problems: list[Problem]) -> str | None:
    """The sha256 that ``<archive>.sha256`` promises, or None with a problem saying why."""
    sp = sidecar_path(path)
    try:
        with open(sp, "rb") as fh:
            raw = fh.read(_SIDECAR_MAX + 1)
    except FileNotFoundError:
        problems.append(Problem(ReasonCode.NO_SIDECAR, detail=f"{sp.name} not found"))
        return None
    except OSError as exc:
        problems.append(Problem(ReasonCode.SIDECAR_MALFORMED, detail=f"{sp.name}: {exc}"))
        return None
    parts = raw.decode("utf-8", "replace").split()
    digest = parts[0].lower() if parts else ""
    name = parts[1].lstrip("*") if len(parts) > 1 else None
    if len(raw) > _SIDECAR_MAX or not _DIGEST.fullmatch(digest) or (name and name != path.name):
        problems.append(
            Problem(ReasonCode.SIDECAR_MALFORMED, detail=f"{sp.name}: expected '<sha256>  {path.name}'")
        )
        return None
    return digest


__all__ = [
    "DEFAULT_LIMITS",
    "ArchiveError",
    "ArchiveWalk",
    "Limits",
    "MemberReader",
    "iter_members",
    "member_key",
    "parse_sidecar",
    "sidecar_path",
    "tar_members",
    "unsafe_reason",
]
