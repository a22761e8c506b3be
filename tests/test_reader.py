"""The streaming archive reader: columns, bad lines with their place, caps, unsafe members."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from archive_kit import (
    big,
    episode_members,
    replace_line,
    special,
    tar_bytes,
    truncate,
    write_archive,
    write_raw,
    write_sidecar,
)

import schema.reader as reader
from schema.reader import Limits, decode_rows, read_episode
from schema.rows import row_fields
from schema.vocab import SOURCES


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    m = episode_members("ep-good", duration_s=30, seed=3)
    return write_archive(tmp_path / "h" / "ep-good.tar.zst", m), m


def codes(ep: reader.EpisodeData) -> list[str]:
    return [p.code for p in ep.problems]


def test_good_archive_reads_into_typed_columns(good: tuple[Path, dict[str, bytes]]) -> None:
    path, members = good
    ep = read_episode(path)
    assert ep.problems == [] and not ep.fatal and ep.has_done_marker
    assert ep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ep.compressed_bytes == path.stat().st_size
    assert ep.meta is not None and ep.meta.episode_id == "ep-good"
    assert [l.phase for l in ep.labels] == ["clean", "armed", "infecting", "infected_running"]
    assert ep.rows == {"proc": 300, "guest": 300, "qmp": 30, "netflow": 300}
    for s in SOURCES:
        cols = ep.streams[s]
        assert cols.t_wall_ns.dtype == np.int64 and cols.values.dtype == np.float64
        assert cols.values.shape == (len(cols), len(row_fields(s)))
        # every value equals what the collector wrote, in row_fields order
        src = [json.loads(x) for x in members[reader.SOURCE_MEMBER[s]].splitlines()]
        assert cols.t_wall_ns.tolist() == [r["t_wall_ns"] for r in src]
        assert cols.t_mono_ns.tolist() == [r["t_mono_ns"] for r in src]
        want = np.array([[r[f] for f in row_fields(s)] for r in src], dtype=np.float64)
        np.testing.assert_array_equal(cols.values, want)


BAD_LINES = {
    3: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1,"utime_ticks":"x"}', "utime_ticks"),
    5: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1,"utime_ticks":NaN}', None),
    6: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1,"utime_ticks":Infinity}', None),
    8: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1,"utime_ticks":1e999,"stime_ticks":0}', "utime_ticks"),
    9: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1,"junk":"\xff\xfe"}', None),
    11: (b'{"t_wall_ns":1,"t_mono_ns":2}', "pid"),
    12: (b'{"t_wall_ns":1,"t_mono_ns":2,"pid":1', None),
}


def test_decode_rows_names_line_and_field_and_keeps_the_rest(good: tuple[Path, dict[str, bytes]]) -> None:
    data = good[1]["telemetry-proc.jsonl"]
    n = data.count(b"\n")
    for line_no, (bad, _) in BAD_LINES.items():
        data = replace_line(data, line_no, bad)
    cols, problems = decode_rows("proc", data, first_line=101, member="telemetry-proc.jsonl")
    assert len(cols) == n - len(BAD_LINES) and cols.malformed == len(BAD_LINES)
    got = {p.line: p for p in problems}
    assert set(got) == {100 + k for k in BAD_LINES}
    for line_no, (_, fld) in BAD_LINES.items():
        p = got[100 + line_no]
        assert p.code == "malformed_line" and p.member == "telemetry-proc.jsonl"
        if fld is not None:
            assert p.field == fld, p
    assert "UTF-8" in got[109].detail


def test_two_objects_on_one_line_and_blank_lines() -> None:
    row = (
        b'{"t_wall_ns":1,"t_mono_ns":2,"interval_ms":100,"pkts_in":1,"pkts_out":1,"bytes_in":1,'
        b'"bytes_out":1,"flows_new":1,"uniq_dst_ips":1,"uniq_dst_ports":1,"syn_out":1,"rst_in":1,"dns_queries":1}'
    )
    data = row + b"\n\n" + row + row + b"\n" + row
    cols, problems = decode_rows("netflow", data)
    # blank line 2 is skipped, line 3 holds two rows glued together (a lost newline)
    assert len(cols) == 2 and [p.line for p in problems] == [3]
    assert cols.values[:, row_fields("netflow").index("interval_ms")].tolist() == [100.0, 100.0]


def test_line_numbers_survive_chunking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "CHUNK_BYTES", 3000)  # many chunks, lines cut across them
    m = episode_members("ep-c", duration_s=30)
    for k in (1, 77, 150, 300):
        m["telemetry-guest.jsonl"] = replace_line(m["telemetry-guest.jsonl"], k, b'{"oops": ')
    ep = read_episode(write_archive(tmp_path / "h" / "ep-c.tar.zst", m))
    bad = [(p.member, p.line) for p in ep.problems]
    assert bad == [("telemetry-guest.jsonl", k) for k in (1, 77, 150, 300)]
    assert ep.rows["guest"] == 296 and ep.members["telemetry-guest.jsonl"].lines == 300
    assert ep.rows["proc"] == 300


def test_over_long_line_is_dropped_in_bounded_memory(tmp_path: Path) -> None:
    m = episode_members("ep-long", duration_s=30)
    lines = m["telemetry-proc.jsonl"].split(b"\n")
    lines[9] = b'{"t_wall_ns":' + b"1" * (100 << 20) + b"}"  # a 100 MB line
    m["telemetry-proc.jsonl"] = b"\n".join(lines)
    path = write_archive(tmp_path / "h" / "ep-long.tar.zst", m, level=1)
    del m, lines
    tracemalloc.start()
    try:
        ep = read_episode(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(p.code, p.line) for p in ep.problems] == [("line_too_long", 10)]
    assert ep.rows["proc"] == 299 and ep.members["telemetry-proc.jsonl"].malformed == 1
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB while skipping a 100 MB line"


def test_decompression_bomb_stops_at_the_total_cap_and_still_hashes(tmp_path: Path) -> None:
    m = episode_members("ep-bomb", duration_s=20)
    extra = [big(f"ep-bomb/blob{i}.bin", 40 << 20) for i in range(3)]
    path = write_archive(tmp_path / "h" / "ep-bomb.tar.zst", m, extra=extra, level=1)
    assert path.stat().st_size < 1 << 20  # 120 MB of zeros, well compressed
    tracemalloc.start()
    try:
        ep = read_episode(path, limits=Limits(max_total_bytes=64 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "archive_too_large" in codes(ep) and not ep.fatal
    assert ep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # hashing finished after the stop
    assert ep.rows["proc"] == 200  # members before the bomb were read
    assert peak < 16 << 20


def test_member_over_its_cap_is_not_read(tmp_path: Path) -> None:
    m = episode_members("ep-m", duration_s=20)
    del m["telemetry-guest.jsonl"]
    ep_path = write_archive(
        tmp_path / "h" / "ep-m.tar.zst", m, extra=[big("ep-m/telemetry-guest.jsonl", 8 << 20)], level=1
    )
    ep = read_episode(ep_path, limits=Limits(max_member_bytes=4 << 20))
    assert [(p.code, p.member) for p in ep.problems] == [("member_too_large", "telemetry-guest.jsonl")]
    assert "guest" not in ep.streams and ep.has_done_marker  # later members still read


@pytest.mark.parametrize(
    "member",
    [
        special("ep-u/telemetry-guest.jsonl", tarfile.SYMTYPE, "/etc/passwd"),
        special("ep-u/events.jsonl", tarfile.LNKTYPE, "ep-u/labels.jsonl"),
        special("ep-u/dev", tarfile.CHRTYPE),
        special("ep-u/pipe", tarfile.FIFOTYPE),
        big("../../evil.jsonl", 10),
        big("/abs/evil.jsonl", 10),
        big("ep-u/../../evil.jsonl", 10),
    ],
    ids=["symlink", "hardlink", "device", "fifo", "dotdot", "absolute", "inner-dotdot"],
)
def test_unsafe_members_are_refused(tmp_path: Path, member: tuple[tarfile.TarInfo, object]) -> None:
    m = episode_members("ep-u", duration_s=20)
    m.pop("telemetry-guest.jsonl"), m.pop("events.jsonl")
    path = write_archive(tmp_path / "h" / "ep-u.tar.zst", m, extra=[member])
    before = set(tmp_path.rglob("*"))
    ep = read_episode(path)
    assert [(p.code, p.member) for p in ep.problems] == [("unsafe_member", member[0].name)]
    assert "guest" not in ep.streams and not ep.events
    # nothing was written anywhere: the reader never extracts
    assert set(tmp_path.rglob("*")) == before and not (tmp_path.parent / "evil.jsonl").exists()


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_zstd_is_fatal_even_with_a_matching_sidecar(
    good: tuple[Path, dict[str, bytes]], keep: float
) -> None:
    path, _ = good
    truncate(path, keep)
    ep = read_episode(path)
    assert ep.fatal and "zstd_corrupt" in codes(ep) and "sha256_mismatch" not in codes(ep)
    assert ep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cut_in_the_last_bytes_is_still_caught(tmp_path: Path) -> None:
    # only the tar's end-of-archive padding is lost: tarfile never notices, zstandard's
    # stream reader ends quietly, the frame walker sees the frame is unfinished
    m = episode_members("ep-t", duration_s=20)
    path = write_archive(tmp_path / "h" / "ep-t.tar.zst", m)
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    write_sidecar(path)
    ep = read_episode(path)
    assert ep.fatal and "zstd_corrupt" in codes(ep)


def test_not_zstd_at_all(tmp_path: Path) -> None:
    path = tmp_path / "h" / "x.tar.zst"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 this is a zip file" * 50)
    write_sidecar(path)
    ep = read_episode(path)
    assert ep.fatal and codes(ep) == ["zstd_corrupt"]


def test_sidecar_checks(good: tuple[Path, dict[str, bytes]]) -> None:
    path, _ = good
    write_sidecar(path, "0" * 64)
    ep = read_episode(path)
    assert ep.fatal and codes(ep) == ["sha256_mismatch"] and ep.rows["proc"] == 300
    assert read_episode(path, verify_sidecar=False).problems == []
    (path.parent / (path.name + ".sha256")).write_text("not a digest\n")
    assert codes(read_episode(path)) == ["sidecar_malformed"]
    (path.parent / (path.name + ".sha256")).unlink()
    ep = read_episode(path)
    assert codes(ep) == ["no_sidecar"] and not ep.fatal


def test_meta_garbage_is_fatal_with_field(tmp_path: Path) -> None:
    m = episode_members("ep-meta", duration_s=20)
    m["meta.json"] = bytes(200)
    ep = read_episode(write_archive(tmp_path / "h" / "ep-meta.tar.zst", m))
    assert ep.fatal and codes(ep) == ["meta_unreadable"] and ep.meta is None
    m["meta.json"] = json.dumps({**json.loads(episode_members()["meta.json"]), "started_ns": "soon"}).encode()
    ep = read_episode(write_archive(tmp_path / "h" / "ep-meta2.tar.zst", m))
    assert codes(ep) == ["meta_unreadable"] and ep.problems[0].field == "started_ns"


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    ep = read_episode(tmp_path / "nope.tar.zst", verify_sidecar=False)
    assert ep.fatal and codes(ep) == ["io_error"]


def test_bisection_finds_every_bad_line_in_a_big_chunk(good: tuple[Path, dict[str, bytes]]) -> None:
    rng = random.Random(5)
    base = good[1]["telemetry-guest.jsonl"].splitlines()
    lines = [base[i % len(base)] for i in range(6000)]
    bad = sorted(rng.sample(range(6000), 23))
    for i in bad:
        lines[i] = rng.choice([b"{", b'{"t_wall_ns":NaN}', lines[i] + lines[i], b"\xff" + lines[i], b"[]"])
    cols, problems = decode_rows("guest", b"\n".join(lines) + b"\n")
    assert [p.line for p in problems] == [i + 1 for i in bad]
    assert len(cols) == 6000 - len(bad)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_member_names(tmp_path: Path, fmt: int) -> None:
    # names past ustar's 100 bytes come from GNU long-name or PAX headers
    ep_id = "ep-" + "x" * 150
    ep = read_episode(
        write_archive(tmp_path / "h" / f"{ep_id}.tar.zst", episode_members(ep_id, duration_s=20), format=fmt)
    )
    assert (
        ep.problems == [] and ep.rows["proc"] == 200 and ep.meta is not None and ep.meta.episode_id == ep_id
    )


def test_tar_without_end_blocks_is_corrupt(tmp_path: Path) -> None:
    raw = tar_bytes("ep-e", episode_members("ep-e", duration_s=20))
    end = len(raw.rstrip(b"\0"))
    cut = raw[: end + (-end % 512)]  # every member complete, end-of-archive blocks gone
    ep = read_episode(write_raw(tmp_path / "h" / "ep-e.tar.zst", cut))
    assert ep.fatal and [p.code for p in ep.problems] == ["tar_corrupt"]


def test_bad_tar_header_checksum_is_corrupt(tmp_path: Path) -> None:
    raw = bytearray(tar_bytes("ep-k", episode_members("ep-k", duration_s=20)))
    raw[0] ^= 0x20  # the first header's name changes, its checksum no longer matches
    ep = read_episode(write_raw(tmp_path / "h" / "ep-k.tar.zst", bytes(raw)))
    assert (
        ep.fatal and [p.code for p in ep.problems] == ["tar_corrupt"] and "checksum" in ep.problems[0].detail
    )


# --- zstd frame checksums ------------------------------------------------------------


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x04
    path.write_bytes(bytes(data))
    write_sidecar(path)  # corrupted before its sidecar was written: the sidecar agrees


def test_frame_checksum_mismatch_is_errored_even_with_a_matching_sidecar(tmp_path: Path) -> None:
    from schema.validation import classify

    m = episode_members("ep-x", duration_s=30, seed=5)
    path = write_archive(tmp_path / "h" / "ep-x.tar.zst", m, checksum=True, sidecar=False)
    clean = path.read_bytes()
    assert read_episode(path, verify_sidecar=False).problems == []
    # Only the stored checksum (the frame's last 4 bytes) is wrong: every byte decompresses
    # fine, so only the checksum itself can tell.
    _flip(path, len(clean) - 2)
    ep = read_episode(path)
    assert ep.fatal and codes(ep) == ["zstd_checksum"] and classify(ep)[0] == "errored"
    # A flipped bit anywhere in the frame body: never degraded, never numbers into training.
    seen = set()
    for pos in range(64, len(clean) - 8, (len(clean) - 72) // 40):
        path.write_bytes(clean)
        _flip(path, pos)
        ep = read_episode(path)
        status, reasons = classify(ep)
        assert ep.fatal and status == "errored", (pos, reasons)
        assert {"zstd_checksum", "zstd_corrupt", "tar_corrupt"} & set(reasons), (pos, reasons)
        seen.update(reasons)
    assert "zstd_checksum" in seen  # the case the checksum alone catches occurs


def test_iter_members_verifies_frame_checksums(tmp_path: Path) -> None:
    m = episode_members("ep-y", duration_s=12, seed=2)
    path = write_archive(tmp_path / "h" / "ep-y.tar.zst", m, checksum=True)
    assert dict(reader.iter_members(path))["meta.json"] == m["meta.json"]
    _flip(path, path.stat().st_size - 1)
    with pytest.raises(reader.ArchiveError, match="checksum"):
        dict(reader.iter_members(path))


def test_problem_codes_are_reason_codes() -> None:
    from schema.validation import REASONS, Problem, ReasonCode

    assert Problem("zstd_checksum").code is ReasonCode.ZSTD_CHECKSUM
    with pytest.raises(ValueError):
        Problem("no_such_reason")  # type: ignore[arg-type]
    assert set(REASONS) | {ReasonCode.MALFORMED_LINE} == set(ReasonCode)
