"""The validation sweep: every bad case built on purpose gets its status and reason,
while the rest of the store still validates; the index is atomic and reused."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from archive_kit import big, episode_members, replace_line, special, truncate, write_archive, write_sidecar

import trainer.validate as tv
from schema.reader import read_episode
from schema.validation import REASONS, IndexRecord, classify, read_index, write_index_atomic
from schema.vocab import STATUSES

Members = dict[str, bytes]


def _drop(member: str) -> Callable[[Members], None]:
    return lambda m: m.pop(member) and None


def _lines(member: str, keep: Callable[[int], bool]) -> Callable[[Members], None]:
    def edit(m: Members) -> None:
        rows = m[member].splitlines(keepends=True)
        m[member] = b"".join(r for i, r in enumerate(rows) if keep(i))

    return edit


def _replace(member: str, **lines: bytes) -> Callable[[Members], None]:
    def edit(m: Members) -> None:
        for k, v in lines.items():
            m[member] = replace_line(m[member], int(k[1:]), v)

    return edit


def _labels_back(m: Members) -> None:
    rows = [json.loads(x) for x in m["labels.jsonl"].splitlines()]
    rows[2]["t_wall_ns"] = rows[0]["t_wall_ns"] - 1  # NTP stepped the clock back
    m["labels.jsonl"] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _unknown_phase(m: Members) -> None:
    m["labels.jsonl"] = m["labels.jsonl"].replace(b'"armed"', b'"staging"')


def _short(m: Members) -> None:
    meta = json.loads(m["meta.json"])
    meta["ended_ns"] = meta["started_ns"] + 6 * 10**9
    m["meta.json"] = json.dumps(meta).encode()


# name -> (edit of the good members, extra raw members, after-write breakage, status, reason)
CASES: dict[str, tuple] = {
    "good-a": (None, None, None, "accepted", None),
    "good-clean": ("clean", None, None, "accepted", None),
    "truncated": (None, None, lambda p: truncate(p, 0.5), "errored", "zstd_corrupt"),
    "sha-mismatch": (None, None, lambda p: write_sidecar(p, "ab" * 32), "errored", "sha256_mismatch"),
    "meta-garbage": (lambda m: m.update({"meta.json": bytes(300)}), None, None, "errored", "meta_unreadable"),
    "no-sidecar": (
        None,
        None,
        lambda p: (p.parent / (p.name + ".sha256")).unlink(),
        "degraded",
        "no_sidecar",
    ),
    "no-meta": (_drop("meta.json"), None, None, "rejected", "missing_meta"),
    "no-labels": (_drop("labels.jsonl"), None, None, "rejected", "missing_labels"),
    "no-proc": (_drop("telemetry-proc.jsonl"), None, None, "rejected", "missing_proc"),
    "no-guest": (_drop("telemetry-guest.jsonl"), None, None, "degraded", "missing_guest"),
    "no-done": (_drop("done.marker"), None, None, "degraded", "no_done_marker"),
    "labels-back": (_labels_back, None, None, "rejected", "labels_not_monotonic"),
    "unknown-phase": (_unknown_phase, None, None, "rejected", "unknown_phase"),
    "nan-inf": (
        _replace(
            "telemetry-proc.jsonl",
            l5=b'{"t_wall_ns":1,"t_mono_ns":1,"pid":1,"utime_ticks":NaN}',
            l9=b'{"t_wall_ns":1,"t_mono_ns":1,"pid":1,"utime_ticks":Infinity}',
            l11=b'{"t_wall_ns":1,"t_mono_ns":1,"pid":1,"utime_ticks":-1e999}',
        ),
        None,
        None,
        "degraded",
        "malformed_lines",
    ),
    "non-utf8": (
        _replace("telemetry-guest.jsonl", l7=b'{"t_wall_ns":1,\xff\xfe\xfd}'),
        None,
        None,
        "degraded",
        "malformed_lines",
    ),
    "too-many-bad": (
        lambda m: m.update(
            {
                "netflow.jsonl": b"\n".join(
                    b"{garbage" if i % 5 == 0 else r for i, r in enumerate(m["netflow.jsonl"].split(b"\n"))
                )
            }
        ),
        None,
        None,
        "rejected",
        "too_many_malformed",
    ),
    "traversal": (None, [big("../../escape.jsonl", 100)], None, "rejected", "unsafe_member"),
    "symlink": (
        _drop("telemetry-guest.jsonl"),
        [special("symlink/telemetry-guest.jsonl", b"2", "/etc/shadow")],
        None,
        "rejected",
        "unsafe_member",
    ),
    "long-line": (
        _replace("telemetry-qmp.jsonl", l3=b'{"t_wall_ns":"' + b"9" * (100 << 20) + b'"}'),
        None,
        None,
        "degraded",
        "line_too_long",
    ),
    "bomb": (
        _drop("telemetry-guest.jsonl"),
        [big("bomb/telemetry-guest.jsonl", 300 << 20)],
        None,
        "rejected",
        "member_too_large",
    ),
    "too-short": (_short, None, None, "rejected", "too_short"),
    "proc-sparse": (
        _lines("telemetry-proc.jsonl", lambda i: i % 5 == 0),
        None,
        None,
        "rejected",
        "too_few_rows",
    ),
    "guest-sparse": (
        _lines("telemetry-guest.jsonl", lambda i: i % 3 == 0),
        None,
        None,
        "degraded",
        "sparse_guest",
    ),
    "long-gap": (_lines("netflow.jsonl", lambda i: not 200 <= i < 360), None, None, "degraded", "long_gap"),
}


def _build(root: Path, name: str) -> Path:
    edit, extra, after, _, _ = CASES[name]
    ep_id = name
    host = "host-b" if name == "good-clean" else "host-a"
    m = episode_members(
        ep_id, host, duration_s=60, profile=None if edit == "clean" else "bursty-c2", seed=len(name)
    )
    if callable(edit):
        edit(m)
    fixed_extra = []
    for ti, f in extra or []:
        if not ti.name.startswith(("/", "..")):  # place it inside this episode's directory
            ti.name = f"{ep_id}/{ti.name.split('/', 1)[1]}"
        fixed_extra.append((ti, f))
    path = write_archive(root / host / f"{ep_id}.tar.zst", m, extra=fixed_extra, level=1)
    if after is not None:
        after(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for name in CASES:
        _build(root, name)
    return root


def test_reason_table_is_complete() -> None:
    assert {r.status for r in REASONS.values()} == set(STATUSES) - {"accepted"}
    assert all(r.doc for r in REASONS.values())
    assert {c[4] for c in CASES.values() if c[4]} <= set(REASONS)


def test_every_bad_case_gets_its_status_and_reason(store: Path, tmp_path: Path) -> None:
    res = tv.validate_store(store, tmp_path / "index.jsonl", jobs=2, progress=False)
    by_id = {r.episode_id: r for r in res.records}
    assert set(by_id) == set(CASES)
    for name, (*_, status, reason) in CASES.items():
        rec = by_id[name]
        assert rec.status == status, (name, rec.reasons, rec.details)
        if reason is None:
            assert rec.reasons == [], (name, rec.details)
        else:
            assert reason in rec.reasons, (name, rec.reasons)
            assert all(STATUSES.index(REASONS[c].status) <= STATUSES.index(status) for c in rec.reasons)
    # details point at the place: member, line, field
    assert any("telemetry-proc.jsonl:5" in d for d in by_id["nan-inf"].details)
    assert any("telemetry-proc.jsonl:11 field utime_ticks" in d for d in by_id["nan-inf"].details)
    good = by_id["good-a"]
    assert good.rows == {"proc": 600, "guest": 600, "qmp": 60, "netflow": 600}
    assert good.duration_s == 60.0 and good.host == "host-a" and good.profile == "bursty-c2"
    assert good.sha256 and good.bytes == (store / good.path).stat().st_size
    assert by_id["good-clean"].host == "host-b" and by_id["good-clean"].profile is None
    assert by_id["bomb"].bytes < 1 << 20  # 300 MB of zeros
    # the index on disk is the same records, sorted by path
    on_disk = read_index(tmp_path / "index.jsonl")
    assert on_disk == res.records and [r.path for r in on_disk] == sorted(r.path for r in on_disk)
    assert sum(res.counts.values()) == len(CASES)
    assert res.read == len(CASES) and res.reused == 0


def test_cli_json_prints_one_object(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    tv.add_validate_arguments(p)
    rc = tv.cli_validate(
        p.parse_args([str(store), "--index", str(tmp_path / "i.jsonl"), "--json", "--jobs", "2"])
    )
    out = capsys.readouterr()
    assert rc == 0
    summary = json.loads(out.out)  # the whole of stdout is one JSON object
    want: dict[str, int] = {s: 0 for s in STATUSES}
    for *_, status, _ in CASES.values():
        want[status] += 1
    assert summary["counts"] == want and summary["archives"] == len(CASES)
    assert summary["reasons"]["unsafe_member"] == 2
    assert "validate" in out.err  # the bar went to stderr
    rc = tv.cli_validate(p.parse_args([str(store), "--index", str(tmp_path / "i.jsonl"), "--no-progress"]))
    table = capsys.readouterr().out
    assert rc == 0 and "accepted" in table and f"read 0, reused {len(CASES)}" in table


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    root = tmp_path / "small"
    for i in range(4):
        write_archive(
            root / f"host-{i % 2}" / f"ep-{i}.tar.zst", episode_members(f"ep-{i}", duration_s=20, seed=i)
        )
    return root


def test_rerun_reuses_unchanged_archives(small_store: Path) -> None:
    first = tv.validate_store(small_store, jobs=2, progress=False)
    assert first.read == 4 and (small_store / "index.jsonl").exists()
    again = tv.validate_store(small_store, jobs=2, progress=False)
    assert again.read == 0 and again.reused == 4 and again.records == first.records
    # a changed archive (new mtime) and a removed sidecar are read again, nothing else
    a = small_store / "host-0" / "ep-0.tar.zst"
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    (small_store / "host-1" / "ep-1.tar.zst.sha256").unlink()
    third = tv.validate_store(small_store, jobs=2, progress=False)
    assert third.read == 2 and third.reused == 2
    assert {r.path: r.status for r in third.records}["host-1/ep-1.tar.zst"] == "degraded"
    # a new archive appears, a removed one disappears from the index
    shutil.copy(a, small_store / "host-0" / "ep-9.tar.zst")
    (small_store / "host-1" / "ep-3.tar.zst").unlink()
    fourth = tv.validate_store(small_store, jobs=2, progress=False)
    assert sorted(r.episode_id for r in fourth.records) == ["ep-0", "ep-0", "ep-1", "ep-2"]
    assert fourth.read == 1


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patch reaches workers by fork")
def test_a_crashing_reader_costs_one_errored_record(
    small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tv.read_episode

    def flaky(path: Path, **kw: object):  # type: ignore[no-untyped-def]
        if path.name == "ep-2.tar.zst":
            raise MemoryError("simulated reader bug")
        return real(path, **kw)

    monkeypatch.setattr(tv, "read_episode", flaky)  # the pool forks, so workers see it
    res = tv.validate_store(small_store, jobs=2, progress=False)
    by = {r.episode_id: r for r in res.records}
    assert by["ep-2"].status == "errored" and by["ep-2"].reasons == ["reader_crash"]
    assert "simulated reader bug" in by["ep-2"].details[0]
    assert [by[f"ep-{i}"].status for i in (0, 1, 3)] == ["accepted"] * 3
    # a crash is never reused: the next sweep tries again
    monkeypatch.setattr(tv, "read_episode", real)
    assert {r.episode_id: r.status for r in tv.validate_store(small_store, jobs=2, progress=False).records}[
        "ep-2"
    ] == "accepted"


def test_interrupted_index_write_leaves_the_old_index(tmp_path: Path) -> None:
    idx = tmp_path / "index.jsonl"
    old = [IndexRecord(path="h/a.tar.zst", episode_id="a", host="h", status="accepted")]
    write_index_atomic(idx, old)
    before = idx.read_bytes()

    def dying() -> Iterator[IndexRecord]:
        for i in range(100_000):  # more than one write buffer, so part of it hit the disk
            yield IndexRecord(path=f"h/{i}.tar.zst", episode_id=str(i), host="h", status="accepted")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_index_atomic(idx, dying())
    assert idx.read_bytes() == before and read_index(idx) == old
    assert [p.name for p in tmp_path.iterdir()] == ["index.jsonl"]  # no temp file left


def test_read_index_names_the_bad_line(tmp_path: Path) -> None:
    idx = tmp_path / "index.jsonl"
    write_index_atomic(idx, [IndexRecord(path="h/a", episode_id="a", host="h", status="accepted")] * 2)
    idx.write_bytes(idx.read_bytes() + b'{"path": "h/b", "episode_id": "b", "host": "h", "status": 3}\n')
    with pytest.raises(ValueError, match=r"index.jsonl:3: .*status"):
        read_index(idx)


def test_classify_on_a_live_read(tmp_path: Path) -> None:
    # classify is what the daemon calls on a finished episode: same verdict as the sweep
    p = write_archive(tmp_path / "h" / "e.tar.zst", episode_members("e", duration_s=30))
    assert classify(read_episode(p)) == ("accepted", [])


# How each defect the generator plants must show up (any one of the codes).
DEFECT_REASONS = {
    "none": set(),
    "collector_crash": {"no_done_marker"},
    "guest_agent_died": {"sparse_guest", "long_gap"},
    "guest_missing": {"missing_guest"},
    "netflow_sparse": {"sparse_netflow"},
    "netflow_missing": {"missing_netflow"},
    "qmp_sparse": {"sparse_qmp"},
    "long_gap": {"long_gap"},
    "malformed_lines": {"malformed_lines"},
    "missing_sidecar": {"no_sidecar"},
    "too_short": {"too_short"},
    "missing_proc": {"missing_proc"},
    "clock_step": {"labels_not_monotonic"},
    "unknown_phase": {"unknown_phase"},
    "proc_sparse": {"too_few_rows"},
    "truncated_upload": {"zstd_corrupt", "sha256_mismatch"},
    "bit_flip": {"sha256_mismatch"},
    "meta_garbage": {"meta_unreadable"},
}


def test_generated_store_matches_its_truth(tmp_path: Path) -> None:
    synth = pytest.importorskip("trainer.synth")
    if not hasattr(synth, "generate_store"):
        pytest.skip("trainer.synth.generate_store not written yet")
    synth.generate_store(tmp_path / "store", episodes=50, hosts=3, seed=7, progress=False)
    res = tv.validate_store(tmp_path / "store", jobs=2, progress=False)
    truth = [
        json.loads(x)
        for x in (tmp_path / "store" / "synth-truth.jsonl").read_text().splitlines()
        if x.strip()
    ]
    want = {t["episode_id"]: t.get("outcome", t.get("status")) for t in truth}
    got = {r.episode_id: r for r in res.records}
    assert set(got) == set(want)
    wrong = {e: (want[e], got[e].status, got[e].reasons) for e in want if got[e].status != want[e]}
    assert not wrong, wrong
    for t in truth:
        rec, expect = got[t["episode_id"]], DEFECT_REASONS[t["defect"]]
        assert (not rec.reasons) if not expect else bool(expect & set(rec.reasons)), (
            t["defect"],
            rec.reasons,
        )
    assert {r.status for r in res.records} == set(STATUSES)  # 50 episodes reach every status
