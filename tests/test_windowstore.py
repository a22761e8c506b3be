"""The window store at corpus scale, shown on tiny stores: incremental shards, kill -9 and resume,
streamed training equal to in-memory training, gbt through xgboost.DataIter, the sampler."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import dataset
from trainer import windowstore as wst
from trainer.dataset import load_windows, make_split
from trainer.rows import ArrayRows, epoch_plan
from trainer.synth import generate_store
from trainer.validate import validate_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-episode store, validated (copied by each test that changes it)."""
    store = tmp_path_factory.mktemp("pristine") / "store"
    generate_store(store, episodes=12, hosts=5, seed=3, jobs=1, progress=False)
    validate_store(store, jobs=1, progress=False)
    return store


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = wst.extract_shard

    def counting(path: str, sha: str, root: str) -> wst.ShardStat:
        seen.append(path)
        return real(path, sha, root)

    monkeypatch.setattr(wst, "extract_shard", counting)
    return seen


def _archives(store: Path) -> list[Path]:
    """The archives the trainer learns from (accepted or degraded)."""
    return [store / r["path"] for r in dataset.usable_records(store / "index.jsonl")]


def _move_out(archive: Path, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for p in (archive, archive.with_name(archive.name + ".sha256")):
        shutil.move(p, to / p.name)
    return to / archive.name


def _move_in(parked: Path, host_dir: Path) -> None:
    for p in (parked, parked.with_name(parked.name + ".sha256")):
        shutil.move(p, host_dir / p.name)


def _same_windows(a: dataset.WindowSet, b: dataset.WindowSet) -> None:
    order_a = np.lexsort((a.window, a.episode))
    order_b = np.lexsort((b.window, b.episode))
    assert np.array_equal(a.episode[order_a], b.episode[order_b])
    assert np.array_equal(a.window[order_a], b.window[order_b])
    assert np.array_equal(a.y[order_a], b.y[order_b])
    assert np.array_equal(a.tensor[order_a], b.tensor[order_b], equal_nan=True)
    assert np.array_equal(a.summary[order_a], b.summary[order_b], equal_nan=True)


def test_new_removed_and_changed_archives_extract_only_themselves(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _count_extractions(monkeypatch)
    arch = _archives(store)
    late = _move_out(arch[0], tmp_path / "late")
    validate_store(store, jobs=1, progress=False)
    first = load_windows(store, jobs=1, progress=False)
    n_eps = first.n_episodes
    assert len(seen) == n_eps == len(arch) - 1

    # One new archive: one extraction, and its windows join the table.
    seen.clear()
    _move_in(late, arch[0].parent)
    validate_store(store, jobs=1, progress=False)
    added = load_windows(store, jobs=1, progress=False)
    assert [Path(p).name for p in seen] == [arch[0].name]
    assert added.n_episodes == n_eps + 1 and len(added) > len(first)

    # One removed archive: nothing extracted, its windows drop out.
    seen.clear()
    gone = _move_out(arch[1], tmp_path / "gone")
    validate_store(store, jobs=1, progress=False)
    removed = load_windows(store, jobs=1, progress=False)
    assert seen == [] and removed.n_episodes == n_eps
    assert gone.name.removesuffix(".tar.zst") not in set(removed.episode)

    # One changed archive (other bytes under the same name): only it is extracted again.
    seen.clear()
    other = tmp_path / "other"
    generate_store(other, episodes=12, hosts=5, seed=4, jobs=1, progress=False)
    donor = sorted((other / arch[2].parent.name).glob("*.tar.zst"))[0]
    shutil.copy(donor, arch[2])
    shutil.copy(donor.with_name(donor.name + ".sha256"), arch[2].with_name(arch[2].name + ".sha256"))
    validate_store(store, jobs=1, progress=False)
    changed = load_windows(store, jobs=1, progress=False)
    assert [Path(p).name for p in seen] == [arch[2].name]
    assert len({r["sha256"] for r in dataset.usable_records(store / "index.jsonl")}) == changed.n_episodes

    # gc keeps every shard the index names and drops the removed and the replaced ones.
    cache = store / "cache"
    shards = lambda: {d.name for d in wst.schema_root(cache).glob("shards/*/*")}
    before = shards()
    n, freed = wst.gc(cache, (r["sha256"] for r in dataset.usable_records(store / "index.jsonl")))
    assert n == 2 and freed > 0 and len(shards()) == len(before) - 2
    seen.clear()
    again = load_windows(store, jobs=1, progress=False)
    assert seen == [] and len(again) == len(changed)


def test_a_new_schema_hash_extracts_again_and_gc_drops_the_old(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _count_extractions(monkeypatch)
    ws = load_windows(store, jobs=1, progress=False)
    old_root = wst.schema_root(store / "cache")
    assert len(seen) == ws.n_episodes and old_root.is_dir()
    seen.clear()
    monkeypatch.setattr(wst, "schema_hash", lambda: "f" * 64)
    monkeypatch.setattr(dataset, "schema_hash", lambda: "f" * 64)
    again = load_windows(store, jobs=1, progress=False)
    assert len(seen) == again.n_episodes and wst.schema_root(store / "cache") != old_root
    n, _ = wst.gc(store / "cache", (r["sha256"] for r in dataset.usable_records(store / "index.jsonl")))
    assert n == 1 and not old_root.exists()


def test_a_cached_run_does_not_read_archives(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = load_windows(store, jobs=2, progress=False)  # through the worker pool

    def boom(*_a, **_k):
        raise AssertionError("an archive was read on a cached run")

    import schema.reader

    monkeypatch.setattr(schema.reader, "read_episode", boom)
    monkeypatch.setattr(wst, "extract_shard", boom)
    again = load_windows(store, jobs=1, progress=False)
    assert len(again) == len(ws) and np.array_equal(again.y, ws.y)


KILL_SCRIPT = """
import sys, time
from trainer import windowstore as wst
from trainer.dataset import load_windows
real = wst.extract_shard
def slow(*a):
    st = real(*a)
    time.sleep(0.4)
    return st
wst.extract_shard = slow
load_windows(sys.argv[1], jobs=1, progress=False)
"""


def test_kill_9_mid_extraction_then_resume_gives_the_same_windows(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store)], env=env, start_new_session=True)
    root = wst.schema_root(store / "cache")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(root.glob("shards/*/*/meta.npz"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(root.glob("shards/*/*/meta.npz")))
    total = len(_archives(store))
    assert 3 <= done < total, f"kill landed after {done} of {total} shards"

    seen = _count_extractions(monkeypatch)
    resumed = load_windows(store, jobs=1, progress=False)
    assert len(seen) == total - done  # only what the killed run had not finished
    fresh = load_windows(store, cache_dir=tmp_path / "fresh", jobs=1, progress=False)
    _same_windows(resumed.materialize(), fresh.materialize())
    assert not list(root.glob(f"shards/*/*{wst.TMP_MARK}*"))


def test_a_bad_archive_is_skipped_not_fatal(store: Path) -> None:
    victim = _archives(store)[0]
    ws0 = load_windows(store, jobs=1, progress=False)
    records = dataset.usable_records(store / "index.jsonl")
    victim.write_bytes(b"not a zstd archive")  # corrupted after validation
    rec = next(r for r in records if store / r["path"] == victim)
    shutil.rmtree(wst.shard_dir(wst.schema_root(store / "cache"), rec["sha256"]))
    ws = load_windows(store, jobs=1, progress=False)
    assert ws.skipped.get("extract_error") == 1 and 0 < len(ws) < len(ws0)


# --- streamed training equals in-memory training ------------------------------------------

FAST = {
    "gbt": {"rounds": 12, "threads": 1},
    "mlp": {"epochs": 3, "threads": 1, "max_seconds": None, "min_steps": 0},
    "cnn": {"epochs": 2, "threads": 1, "max_seconds": None, "min_steps": 0},
    "rocket": {"threads": 1},
}


@pytest.mark.parametrize("memory_mb", [64.0, 0.5], ids=["in-buffer", "block-streamed"])
def test_streamed_training_equals_in_memory_training(
    pristine: Path, tmp_path: Path, memory_mb: float
) -> None:
    """Same seed, same rows, same order: the store-backed table and its in-RAM copy train to the
    same metrics (tolerance 1e-6: both read identical float32 rows in identical batches). At 0.5 MB
    the train side does not fit and batches come block by block from the memmaps."""
    from trainer.train import train_windowset

    store = load_windows(pristine, cache_dir=tmp_path / "cache", jobs=1, progress=False)
    ram = store.materialize()
    split = make_split(store, "host", seed=0)
    reports = [
        train_windowset(
            ws,
            split,
            tmp_path / name,
            profile="demo",
            models=["gbt", "mlp", "cnn", "rocket"],
            threats=["realistic"],
            n_boot=50,
            progress=False,
            overrides=FAST,
            memory_mb=memory_mb,
        )
        for name, ws in (("store", store), ("ram", ram))
    ]
    a, b = (r["models"] | r["baselines"] for r in reports)
    assert (
        set(a) == set(b) == {f"{m}-realistic" for m in ("gbt", "mlp", "cnn", "rocket", "majority", "logreg")}
    )
    for key in a:
        assert a[key]["macro_f1"] == pytest.approx(b[key]["macro_f1"], abs=1e-6), key
        assert a[key]["macro_f1_ci"] == pytest.approx(b[key]["macro_f1_ci"], abs=1e-6), key
    for key in ("mlp-realistic", "cnn-realistic"):
        assert a[key]["fit"]["best_val_f1"] == pytest.approx(b[key]["fit"]["best_val_f1"], abs=1e-6)
    held = [np.load(tmp_path / n / "heldout-realistic.npz") for n in ("store", "ram")]
    assert np.array_equal(held[0]["tensor"], held[1]["tensor"], equal_nan=True)
    assert np.array_equal(held[0]["y"], held[1]["y"])


def test_gbt_through_the_iterator_matches_gbt_in_memory(pristine: Path, tmp_path: Path) -> None:
    """QuantileDMatrix from DataIter chunks (and ExtMemQuantileDMatrix) vs one in-memory DMatrix."""
    from trainer.evaluate import macro_f1
    from trainer.models import build_model

    ws = load_windows(pristine, cache_dir=tmp_path / "cache", jobs=1, progress=False)
    split = make_split(ws, "host", seed=0)
    ok = ws.mask("realistic") & ws.finite("realistic")
    tr, va, te = (np.asarray(i)[ok[i]] for i in (split.train, split.val, split.test))
    rows = {k: ws.rows("realistic", "summary", i) for k, i in (("tr", tr), ("va", va), ("te", te))}
    x_te = rows["te"].take(np.arange(len(te)))
    scores = {}
    for how, extra in (("ram", {}), ("iter", {"memory_mb": 0.05}), ("extmem", {"external_memory": True})):
        m = build_model("gbt", rows["tr"].row_shape, profile="demo", rounds=20, threads=1, **extra)
        if how == "ram":
            x_tr, x_va = (rows[k].take(np.arange(len(rows[k]))) for k in ("tr", "va"))
            m.fit(x_tr, ws.y[tr], x_va, ws.y[va])
        else:
            m.fit(rows["tr"], ws.y[tr], rows["va"], ws.y[va])
        scores[how] = (m.predict_proba(x_te), macro_f1(ws.y[te], m.predict(x_te)))
    for how in ("iter", "extmem"):
        assert abs(scores[how][1] - scores["ram"][1]) <= 0.02, (how, scores[how][1], scores["ram"][1])
        agree = (scores[how][0].argmax(1) == scores["ram"][0].argmax(1)).mean()
        assert agree >= 0.97, (how, agree)


# --- the sampler ----------------------------------------------------------------------------


def test_sampler_global_mode_is_the_in_ram_permutation_and_blocks_cover_every_row_once() -> None:
    groups = np.repeat(np.arange(40), 25)  # 40 episodes x 25 windows
    n = len(groups)
    plan = epoch_plan(n, groups, 64, n, np.random.default_rng(5))
    expect = np.random.default_rng(5).permutation(n)
    assert len(plan) == 1 and np.array_equal(np.concatenate(plan[0].batches), expect)

    plan = epoch_plan(n, groups, 64, 200, np.random.default_rng(5))
    assert len(plan) >= 5 and all(len(b.positions) <= 200 for b in plan)
    seen = np.concatenate([b.positions[np.concatenate(b.batches)] for b in plan])
    assert np.array_equal(np.sort(seen), np.arange(n))
    for b in plan:  # a block holds whole episodes
        eps = np.unique(groups[b.positions])
        assert len(b.positions) == 25 * len(eps)
    first = [b.positions[0] for b in plan]
    again = epoch_plan(n, groups, 64, 200, np.random.default_rng(6))
    assert first != [b.positions[0] for b in again]  # another epoch, another order

    # DDP: two ranks train on disjoint rows with the same number of steps.
    ranks = [epoch_plan(n, groups, 64, 200, np.random.default_rng(5), rank=r, world=2) for r in range(2)]
    rows = [set(np.concatenate([b.positions[np.concatenate(b.batches)] for b in p]).tolist()) for p in ranks]
    steps = [sum(len(b.batches) for b in p) for p in ranks]
    assert not rows[0] & rows[1] and steps[0] == steps[1] > 0


def test_rows_of_the_store_equal_rows_in_ram(pristine: Path, tmp_path: Path) -> None:
    ws = load_windows(pristine, cache_dir=tmp_path / "cache", jobs=1, progress=False)
    ram = ws.materialize()
    idx = np.random.default_rng(0).permutation(len(ws))[:300]
    pos = np.random.default_rng(1).permutation(300)
    for threat in ("realistic", "oracle"):
        for kind in ("tensor", "summary"):
            a = ws.rows(threat, kind, idx).take(pos)
            b = ArrayRows(ram.view(threat, kind)[idx]).take(pos)
            assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), (threat, kind)


def test_chunked_bootstrap_draws_the_same_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import evaluate as ev

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 3000)
    pa, pb = np.where(rng.random(3000) < 0.7, y, rng.integers(0, 5, 3000)), rng.integers(0, 5, 3000)
    groups = np.repeat(np.arange(100), 30)
    whole = (
        ev.bootstrap_ci(y, pa, groups, n_boot=300, seed=2),
        ev.paired_bootstrap(y, pa, pb, groups, 300, 2),
    )
    monkeypatch.setattr(ev, "BOOT_CHUNK_CELLS", 100 * 7)  # 7 resamples at a time
    chunked = (
        ev.bootstrap_ci(y, pa, groups, n_boot=300, seed=2),
        ev.paired_bootstrap(y, pa, pb, groups, 300, 2),
    )
    assert whole == chunked


def test_heldout_file_keeps_whole_episodes_up_to_its_cap(pristine: Path, tmp_path: Path) -> None:
    from trainer.heldout import Heldout, save_heldout_rows

    ws = load_windows(pristine, cache_dir=tmp_path / "cache", jobs=1, progress=False)
    te = np.arange(len(ws))
    full = {k: ws.rows(None, k, te) for k in ("tensor", "summary")}
    save_heldout_rows(tmp_path / "h.npz", ws, full, te, max_windows=len(ws) // 2, budget_bytes=200_000)
    assert len(Heldout.load(tmp_path / "h.npz")) > 0  # the layout export and bench read
    with np.load(tmp_path / "h.npz") as z:
        kept, tensor, summary = z["index"], z["tensor"], z["summary"]
        assert 0 < len(kept) <= len(ws) // 2 and tensor.shape == (len(kept), 46, 100)
        eps = set(z["episode"].tolist())
    assert sum(int((ws.episode == e).sum()) for e in eps) == len(kept)  # whole episodes
    ram = ws.materialize(kept)
    assert np.array_equal(tensor, ram.tensor, equal_nan=True) and np.array_equal(
        summary, ram.summary, equal_nan=True
    )
