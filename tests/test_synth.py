"""The synthetic store generator: format (SPEC 3), realism and hardness (SPEC 8), determinism."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zstandard

from schema.channels import CHANNEL_NAMES, SUMMARY_STATS
from schema.rows import ROW_TYPES, EpisodeMeta, Label, OrchestratorEvent
from schema.vocab import PHASES, PROFILES, SOURCE_MEMBER
from trainer.synth import (
    OUTCOME_SHARE,
    SAMPLES_BY_PROFILE,
    add_synth_arguments,
    build_episode,
    cli_synth,
    generate_episode,
    generate_store,
    make_hosts,
    pack_archive,
    plan_store,
    read_truth,
    ship_episode,
)
from trainer.synth.streams import GUEST_COUNTERS, member_fields

N_STORE = 60
COUNTERS = {
    "proc": (
        "utime_ticks",
        "stime_ticks",
        "read_bytes",
        "write_bytes",
        "syscr",
        "syscw",
        "voluntary_ctxt_switches",
        "nonvoluntary_ctxt_switches",
        "majflt",
    ),
    "guest": GUEST_COUNTERS,
    "qmp": (
        "vcpu_time_ns",
        "blk_rd_bytes",
        "blk_wr_bytes",
        "blk_rd_ops",
        "blk_wr_ops",
        "net_rx_bytes",
        "net_tx_bytes",
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store")
    generate_store(out, episodes=N_STORE, hosts=6, seed=11, jobs=2, progress=False)
    return out


@pytest.fixture(scope="module")
def truth(store: Path) -> list[dict]:
    return read_truth(store)


@pytest.fixture(scope="module")
def windows(store: Path, truth: list[dict]) -> list[tuple[dict, object]]:
    """(truth, EpisodeWindows) of every accepted episode, extracted once by the project's own extractor."""
    extract = pytest.importorskip("schema.extract")
    reader = pytest.importorskip("schema.reader")
    return [
        (t, extract.extract_episode(reader.read_episode(store / t["host"] / f"{t['episode_id']}.tar.zst")))
        for t in truth
        if t["outcome"] == "accepted"
    ]


def _members(archive: bytes) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(archive)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {ti.name: tar.extractfile(ti).read() for ti in tar.getmembers() if ti.isfile()}


def _rows(data: bytes, source: str) -> list:
    dec = msgspec.json.Decoder(ROW_TYPES[source])
    return [dec.decode(line) for line in data.splitlines()]


def _columns(data: bytes) -> dict[str, np.ndarray]:
    objs = [msgspec.json.decode(line) for line in data.splitlines()]
    return {k: np.array([o[k] for o in objs]) for k in objs[0]}


def _archive(store: Path, t: dict) -> bytes:
    return (store / t["host"] / f"{t['episode_id']}.tar.zst").read_bytes()


def _spec_with(defect: str, outcome: str, infected: bool = True):
    """A planned episode turned into the given defect (same host, sample and seed)."""
    specs = plan_store(40, 6, 3)
    base = next(s for s in specs if (s.sample is not None) == infected)
    return dataclasses.replace(base, defect=defect, outcome=outcome)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_bytes_any_jobs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_store(a, episodes=6, hosts=3, seed=5, jobs=1, progress=False)
    generate_store(b, episodes=6, hosts=3, seed=5, jobs=2, progress=False)
    generate_store(c, episodes=6, hosts=3, seed=6, jobs=1, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    arch_a = {p.name: p.read_bytes() for p in a.rglob("*.tar.zst")}
    arch_c = {p.name: p.read_bytes() for p in c.rglob("*.tar.zst")}
    assert arch_a and arch_c and not set(arch_a.values()) & set(arch_c.values())


def test_generate_episode_is_pure() -> None:
    spec = plan_store(10, 6, 1)[3]
    assert generate_episode(spec) == generate_episode(spec)
    assert pack_archive(spec.episode_id, generate_episode(spec), 7) == pack_archive(
        spec.episode_id, generate_episode(spec), 7
    )


# --- layout, sidecars, members -----------------------------------------------------------------


def test_layout_and_sidecars(store: Path, truth: list[dict]) -> None:
    assert len(truth) == N_STORE
    ids = {t["episode_id"]: t for t in truth}
    for p in store.rglob("*"):
        if p.is_dir() or p.name == "synth-truth.jsonl":
            continue
        assert p.parent.parent == store, p
        m = re.fullmatch(r"(.+)\.tar\.zst(\.sha256)?", p.name)
        assert m and m.group(1) in ids and ids[m.group(1)]["host"] == p.parent.name, p
    for t in truth:
        arc = store / t["host"] / f"{t['episode_id']}.tar.zst"
        side = arc.with_name(arc.name + ".sha256")
        assert arc.exists()
        if t["defect"] == "missing_sidecar":
            assert not side.exists()
            continue
        line = side.read_text()
        assert re.fullmatch(r"[0-9a-f]{64}  " + re.escape(arc.name) + "\n", line), line
        matches = line[:64] == hashlib.sha256(arc.read_bytes()).hexdigest()
        assert matches == (t["defect"] not in ("truncated_upload", "bit_flip")), t["defect"]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum not installed")
def test_sha256sum_checks_sidecars(store: Path, truth: list[dict]) -> None:
    t = next(t for t in truth if t["outcome"] == "accepted")
    r = subprocess.run(
        ["sha256sum", "-c", f"{t['episode_id']}.tar.zst.sha256"],
        cwd=store / t["host"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith(": OK"), r.stdout + r.stderr
    bad = next(t for t in truth if t["defect"] in ("truncated_upload", "bit_flip"))
    r = subprocess.run(
        ["sha256sum", "-c", f"{bad['episode_id']}.tar.zst.sha256"],
        cwd=store / bad["host"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0


def test_pack_archive_is_a_plain_reproducible_tar() -> None:
    blob = pack_archive("ep-1", {"meta.json": b"{}", "done.marker": b""}, mtime=1_700_000_000)
    raw = zstandard.ZstdDecompressor().decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["ep-1", "ep-1/meta.json", "ep-1/done.marker"]
    assert all(i.mtime == 1_700_000_000 and i.uid == 1000 and i.uname == "collector" for i in infos)
    assert all(i.isdir() or i.isfile() for i in infos)


def test_every_member_with_spec_fields(store: Path, truth: list[dict]) -> None:
    t = next(t for t in truth if t["outcome"] == "accepted" and t["profile"])
    members = _members(_archive(store, t))
    prefix = t["episode_id"] + "/"
    assert all(name.startswith(prefix) for name in members)
    members = {k[len(prefix) :]: v for k, v in members.items()}
    required = {"meta.json", "labels.jsonl", "events.jsonl", "done.marker", *SOURCE_MEMBER.values()}
    assert required <= set(members) <= required | {"network.pcap"}
    assert members["done.marker"] == b""
    meta = msgspec.json.decode(members["meta.json"], type=EpisodeMeta)
    assert (meta.episode_id, meta.host_id, meta.schema_version, meta.profile) == (
        t["episode_id"],
        t["host"],
        1,
        t["profile"],
    )
    assert meta.ended_ns - meta.started_ns == pytest.approx(t["duration_s"] * 1e9, abs=2e6)
    labels = [msgspec.json.decode(x, type=Label) for x in members["labels.jsonl"].splitlines()]
    assert [l.phase for l in labels] == [p[0] for p in t["phases"]]
    assert labels[0].t_wall_ns == meta.started_ns and all(l.phase in PHASES for l in labels)
    kinds = [
        msgspec.json.decode(x, type=OrchestratorEvent).kind for x in members["events.jsonl"].splitlines()
    ]
    assert kinds[0] == "vm_boot" and kinds[-1] == "vm_shutdown"
    assert kinds[1:3] == ["sample_drop", "sample_exec"] and "payload_start" in kinds
    for src, member in SOURCE_MEMBER.items():
        data = members[member]
        rows = _rows(data, src)  # every line decodes as the typed row
        assert len(rows) > 100
        first = msgspec.json.decode(data.splitlines()[0])
        assert tuple(first) == member_fields(src)
        assert set(first) >= set(ROW_TYPES[src].__struct_fields__) - {"status"}


# --- rates, clocks, counters -----------------------------------------------------------------------


def test_rates_close_to_nominal(store: Path, truth: list[dict]) -> None:
    nominal = {"proc": 10.0, "guest": 10.0, "qmp": 1.0, "netflow": 10.0}
    for t in [t for t in truth if t["outcome"] == "accepted"][:6]:
        members = _members(_archive(store, t))
        for src, hz in nominal.items():
            c = _columns(members[f"{t['episode_id']}/{SOURCE_MEMBER[src]}"])
            rate = len(c["t_wall_ns"]) / t["duration_s"]
            assert 0.9 * hz < rate <= 1.01 * hz, (src, rate)
            dt = np.diff(c["t_wall_ns"]) / 1e9
            assert np.all(dt > 0), src
            med = np.median(dt)
            assert abs(med - 1 / hz) < 0.01 / hz, (src, med)
            if src in ("proc", "netflow"):  # +-10 ms jitter; only isolated rows are missing
                assert np.mean(np.abs(dt - 0.1) < 0.021) > 0.98, src
                assert dt.max() < 0.35, src
        nf = _columns(members[f"{t['episode_id']}/netflow.jsonl"])
        assert np.all(np.abs(nf["interval_ms"] - 100) <= 5)


def test_netflow_clock_trap(store: Path, truth: list[dict]) -> None:
    t = next(t for t in truth if t["outcome"] == "accepted")
    m = _members(_archive(store, t))
    cols = {s: _columns(m[f"{t['episode_id']}/{SOURCE_MEMBER[s]}"]) for s in SOURCE_MEMBER}
    mono0 = {s: int(c["t_mono_ns"][0]) for s, c in cols.items()}
    wall0 = {s: int(c["t_wall_ns"][0]) for s, c in cols.items()}
    # walls agree to within the first sampling period and a few ms of NTP residual...
    assert max(wall0.values()) - min(wall0.values()) < 8e9
    assert abs(wall0["proc"] - wall0["netflow"]) < 0.5e9
    # ...but the capture box's monotonic clock is days away from the host's
    assert abs(mono0["netflow"] - mono0["proc"]) > 86400e9
    # proc and qmp share the host's base (offset = wall - mono equal to within jitter)
    off = {s: int(cols[s]["t_wall_ns"][0]) - int(cols[s]["t_mono_ns"][0]) for s in cols}
    assert abs(off["proc"] - off["qmp"]) < 1e6
    assert abs(off["guest"] - off["proc"]) > 3600e9  # the guest booted with the VM


def test_counters_monotone_except_injected_resets(store: Path, truth: list[dict]) -> None:
    checked = 0
    for t in [t for t in truth if t["outcome"] == "accepted"]:
        m = _members(_archive(store, t))
        for src, fields in COUNTERS.items():
            c = _columns(m[f"{t['episode_id']}/{SOURCE_MEMBER[src]}"])
            for f in fields:
                down = int(np.sum(np.diff(c[f]) < 0))
                if f"{src}.{f}" in t["counter_resets"]:
                    assert down >= 1, (t["episode_id"], f)
                else:
                    assert down == 0, (t["episode_id"], src, f)
                checked += 1
    assert checked > 500


def test_agent_restart_resets_guest_counters() -> None:
    for spec in plan_store(240, 6, 7):
        if spec.outcome != "accepted":
            continue
        members, tr = build_episode(spec)
        if any(r.startswith("guest.forks") for r in tr["counter_resets"]):
            c = _columns(members[SOURCE_MEMBER["guest"]])
            for f in GUEST_COUNTERS:
                drops = np.flatnonzero(np.diff(c[f]) < 0)
                if f"guest.{f}" not in tr["counter_resets"]:
                    continue
                if spec.host.net32 and f.startswith("net_"):  # a 32-bit counter wraps, it does not restart
                    assert len(drops) >= 1 and np.all(c[f] < 2**32), f
                else:
                    assert len(drops) == 1 and c[f][drops[0] + 1] == 0, f  # back to zero, once
            return
    pytest.fail("no agent restart in 240 planned episodes")


# --- the store as a corpus --------------------------------------------------------------------------


def test_outcome_mix(truth: list[dict]) -> None:
    got = Counter(t["outcome"] for t in truth)
    for outcome, share in OUTCOME_SHARE.items():
        assert abs(got[outcome] / N_STORE - share) <= 0.03, (outcome, got)
    assert got["errored"] >= 1
    big = Counter(s.outcome for s in plan_store(20000, 6, 7))
    assert abs(big["accepted"] / 20000 - 0.845) < 0.01 and 100 <= big["errored"] <= 300
    defects = Counter(s.defect for s in plan_store(240, 6, 7))
    assert len(defects) >= 18  # every kind of defect shows up in the default store


def test_validator_agrees_with_intent(store: Path, truth: list[dict]) -> None:
    validation = pytest.importorskip("schema.validation")
    reader = pytest.importorskip("schema.reader")
    wrong = []
    for t in truth:
        ep = reader.read_episode(store / t["host"] / f"{t['episode_id']}.tar.zst")
        status, reasons = validation.classify(ep)
        if status != t["outcome"] or (status == "accepted" and reasons):
            wrong.append((t["episode_id"], t["defect"], status, reasons))
    assert not wrong


def test_hosts_differ_and_samples_vary(truth: list[dict]) -> None:
    hosts = make_hosts(6, 11)
    assert len({t["host"] for t in truth}) >= 5
    for attr in ("cpu_speed", "noise", "nic_Bps", "os", "guest_offset_ns", "netflow_mono_base_ns"):
        assert len({getattr(h, attr) for h in hosts}) >= 5, attr
    assert len({(h.vcpus, h.mem_mb) for h in hosts}) >= 5
    assert all(len(v) >= 3 for v in SAMPLES_BY_PROFILE.values())
    per_profile: dict[str, set] = {}
    for t in truth:
        if t["profile"]:
            per_profile.setdefault(t["profile"], set()).add(t["sample"])
    assert set(per_profile) == set(PROFILES) and all(len(s) >= 3 for s in per_profile.values()), per_profile
    clean_only = sum(t["clean_only"] for t in truth) / len(truth)
    assert 0.12 <= clean_only <= 0.28


def test_phase_schedules_have_realistic_lengths(truth: list[dict]) -> None:
    for t in truth:
        if t["defect"] == "too_short":
            assert t["duration_s"] < 10
            continue
        assert 180 <= t["duration_s"] <= 520
        ph = t["phases"]
        assert ph[0][1] == 0 and all(a[2] == pytest.approx(b[1]) for a, b in zip(ph, ph[1:]))
        if not t["clean_only"]:
            names = [p[0] for p in ph]
            assert names[:4] == ["clean", "armed", "infecting", "infected_running"]
            assert all(x != y for x, y in zip(names[3:], names[4:]))  # running and dormant alternate
            lengths = {"clean": (20, 60), "armed": (20, 60), "infecting": (20, 60)}
            for name, a, b in ph[:3]:
                lo, hi = lengths[name]
                assert lo <= b - a <= hi, (name, b - a)


def test_bad_cases_made_as_in_life() -> None:
    crash, _ = build_episode(_spec_with("collector_crash", "degraded"))
    assert "done.marker" not in crash
    assert any(
        not v.endswith(b"\n") for k, v in crash.items() if k.endswith(".jsonl") and k != "labels.jsonl"
    )
    assert b"vm_shutdown" not in crash["events.jsonl"]
    step, tr = build_episode(_spec_with("clock_step", "rejected"))
    times = [msgspec.json.decode(x)["t_wall_ns"] for x in step["labels.jsonl"].splitlines()]
    assert any(b < a for a, b in zip(times, times[1:])) and tr["clock_step_ns"] < 0
    proc_wall = _columns(step["telemetry-proc.jsonl"])["t_wall_ns"]
    assert np.sum(np.diff(proc_wall) < 0) == 1  # the host's rows jump back once
    legacy, _ = build_episode(_spec_with("unknown_phase", "rejected"))
    assert {msgspec.json.decode(x)["phase"] for x in legacy["labels.jsonl"].splitlines()} - set(PHASES)
    short, _ = build_episode(_spec_with("too_short", "rejected"))
    meta = msgspec.json.decode(short["meta.json"])
    assert (meta["ended_ns"] - meta["started_ns"]) / 1e9 < 10
    assert "telemetry-proc.jsonl" not in build_episode(_spec_with("missing_proc", "rejected"))[0]
    garbage = generate_episode(_spec_with("meta_garbage", "errored"))["meta.json"]
    assert garbage.strip(b"\x00") == b""
    died, _ = build_episode(_spec_with("guest_agent_died", "degraded"))
    g = _columns(died["telemetry-guest.jsonl"])["t_wall_ns"]
    p = _columns(died["telemetry-proc.jsonl"])["t_wall_ns"]
    assert len(g) < 0.7 * len(p) and g[-1] < p[-1] - 30e9
    bad, tr = build_episode(_spec_with("malformed_lines", "degraded"))
    n_bad = 0
    for k, v in bad.items():
        if k.endswith(".jsonl"):
            for line in v.splitlines():
                try:
                    msgspec.json.decode(line)
                except msgspec.DecodeError:
                    n_bad += 1
    assert 1 <= n_bad <= 10 and tr["malformed"]
    cut = ship_episode(_spec_with("truncated_upload", "errored"))
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(cut.archive)
    assert cut.sidecar and cut.sidecar[:64] != hashlib.sha256(cut.archive).hexdigest()


def test_profiles_leave_their_signature(windows: list) -> None:
    """Per profile, the channel its attack moves is higher while running than while clean,
    in most episodes."""
    sig = {
        "cpu-saturate": "qmp.vcpu_time_ns",
        "bursty-c2": "netflow.bytes_in",
        "scan-and-dial": "netflow.syn_out",
        "exfil-trickle": "netflow.bytes_out",
        "disk-encrypt": "qmp.blk_wr_bytes",
        "mem-inflate": "proc.rss_kb",
    }
    wins: Counter = Counter()
    total: Counter = Counter()
    for t, w in windows:
        if not t["profile"]:
            continue
        ch = CHANNEL_NAMES.index(sig[t["profile"]])
        per_window = w.tensor[:, ch].mean(axis=1)  # robust to bursts: median over windows of window means
        run = np.median(per_window[w.labels == PHASES.index("infected_running")])
        clean = np.median(per_window[w.labels == PHASES.index("clean")])
        total[t["profile"]] += 1
        wins[t["profile"]] += bool(run > clean)
    for prof in PROFILES:
        assert total[prof] and wins[prof] / total[prof] >= 0.5, (prof, wins[prof], total[prof])


# --- hard enough to be worth learning -------------------------------------------------------------


def best_threshold_f1(x: np.ndarray, y: np.ndarray, c: int) -> float:
    """Best F1 of the one-vs-rest rule 'class c iff x > thr' or 'iff x < thr', over every threshold."""
    order = np.argsort(x, kind="stable")
    xs, pos = x[order], (y[order] == c).astype(np.int64)
    n, n_c = len(x), int(pos.sum())
    if n_c == 0:
        return 0.0
    below = np.concatenate([[0], np.cumsum(pos)])  # positives among the k smallest
    k = np.concatenate([[0], np.flatnonzero(np.diff(xs) > 0) + 1, [n]])  # cuts between distinct values
    f_low = 2 * below[k] / np.maximum(k + n_c, 1)
    f_high = 2 * (n_c - below[k]) / np.maximum(n - k + n_c, 1)
    return float(max(f_low.max(), f_high.max()))


def test_best_threshold_f1_is_right() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    y = np.array([0, 0, 0, 1, 1])
    assert best_threshold_f1(x, y, 1) == 1.0 and best_threshold_f1(x, y, 0) == 1.0
    assert best_threshold_f1(np.zeros(4), np.array([0, 1, 0, 1]), 1) == pytest.approx(2 * 2 / (4 + 2))


def test_no_single_channel_threshold_separates_phases(windows: list) -> None:
    xs = [w.summary[w.labels >= 0] for _, w in windows]
    ys = [w.labels[w.labels >= 0] for _, w in windows]
    X, y = np.concatenate(xs), np.concatenate(ys)
    assert len(y) > 1000 and set(np.unique(y)) == set(range(len(PHASES)))
    k = len(SUMMARY_STATS)
    best = (0.0, "")
    for ci, name in enumerate(CHANNEL_NAMES):
        for si, stat in enumerate(SUMMARY_STATS):
            col = X[:, ci * k + si]
            macro = float(np.mean([best_threshold_f1(col, y, c) for c in range(len(PHASES))]))
            best = max(best, (macro, f"{name}.{stat}"))
    assert best[0] <= 0.6, best


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "s"), "--episodes", "3", "--hosts", "2", "--jobs", "1"])
    assert (args.seed, args.hosts) == (7, 2)
    assert cli_synth(args) == 0
    out = capsys.readouterr().out
    assert "lab01" in out and "accepted" in out and "3 episodes" in out
    assert len(list((tmp_path / "s").rglob("*.tar.zst"))) == 3
    defaults = p.parse_args(["--out", "x"])
    assert (defaults.episodes, defaults.hosts, defaults.seed) == (240, 6, 7)
