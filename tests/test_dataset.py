"""Windows of a store, the feature cache, and the three honest splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer import windowstore
from trainer.dataset import CLEAN_ONLY, WindowSet, load_windows, make_split
from trainer.errors import DatasetError

PROFILES = ("cpu-saturate", "bursty-c2", "disk-encrypt")


def _windowset(hosts: int = 6, eps_per_host: int = 8, drop: tuple[str, str] | None = None) -> WindowSet:
    """A hand-made set: every host runs every profile (and clean-only) on two samples each."""
    rows = []
    for h in range(hosts):
        for e in range(eps_per_host):
            prof = (CLEAN_ONLY, *PROFILES)[e % 4]
            host = f"h{h}"
            if drop and (host, prof) == drop:
                prof = CLEAN_ONLY
            sample = CLEAN_ONLY if prof == CLEAN_ONLY else f"{prof}-s{e // 4 % 2}"
            for w in range(5):
                rows.append((f"{host}-e{e}", host, prof, sample, h * eps_per_host + e, w))
    n = len(rows)
    ep, host, prof, sample, order, win = (np.array(c) for c in zip(*rows))
    return WindowSet(
        tensor=np.zeros((n, 46, 100), np.float32),
        summary=np.zeros((n, 368), np.float32),
        coverage=np.ones((n, 4), np.float32),
        y=np.arange(n) % 5,
        episode=ep,
        host=host,
        profile=prof,
        sample=sample,
        t_rank=order / order.max(),
        window=win.astype(np.int32),
    )


def _check_disjoint(ws: WindowSet, split) -> None:
    sides = [set(ws.episode[idx]) for idx in (split.train, split.val, split.test)]
    assert not sides[0] & sides[2] and not sides[1] & sides[2] and not sides[0] & sides[1]
    assert len(split.train) + len(split.val) + len(split.test) == len(ws)


def test_host_split_holds_out_whole_hosts_and_a_validation_host() -> None:
    ws = _windowset()
    split = make_split(ws, "host", seed=3)
    _check_disjoint(ws, split)
    test_hosts = set(ws.host[split.test])
    assert test_hosts == set(split.test_groups) and len(test_hosts) == 2
    assert not test_hosts & set(ws.host[split.train]) and not test_hosts & set(ws.host[split.val])
    assert len(set(ws.host[split.val])) == 1 and not set(ws.host[split.val]) & set(ws.host[split.train])
    assert split.untested_profiles == []


def test_a_profile_the_test_hosts_never_ran_is_listed_not_averaged_away() -> None:
    ws = _windowset(hosts=2)
    ws.profile[ws.host == "h1"] = np.where(
        ws.profile[ws.host == "h1"] == "disk-encrypt", CLEAN_ONLY, ws.profile[ws.host == "h1"]
    )
    ws.profile[ws.host == "h0"] = np.where(
        ws.profile[ws.host == "h0"] == "bursty-c2", CLEAN_ONLY, ws.profile[ws.host == "h0"]
    )
    split = make_split(ws, "host", seed=0)
    _check_disjoint(ws, split)
    train_only = set(ws.profile[split.train]) - set(ws.profile[split.test])
    assert split.untested_profiles == sorted(train_only) and train_only
    assert split.to_json()["untested_profiles"] == split.untested_profiles


def test_sample_split_holds_out_one_sample_per_profile() -> None:
    ws = _windowset()
    split = make_split(ws, "sample", seed=1)
    _check_disjoint(ws, split)
    held = set(split.test_groups)
    assert {s.rsplit("-s", 1)[0] for s in held} == set(PROFILES)
    assert not held & set(ws.sample[split.train])
    assert CLEAN_ONLY in set(ws.profile[split.test])


def test_time_split_tests_on_the_latest_episodes() -> None:
    ws = _windowset()
    split = make_split(ws, "time", seed=0)
    _check_disjoint(ws, split)
    assert ws.t_rank[split.test].min() > ws.t_rank[split.train].max()


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        make_split(_windowset(), "random")


def test_load_windows_extracts_then_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.synth import generate_store
    from trainer.validate import validate_store

    store = tmp_path / "store"
    generate_store(store, episodes=10, hosts=5, seed=3, jobs=1, progress=False)
    validate_store(store, jobs=1, progress=False)
    table = load_windows(store, jobs=1, progress=False)
    ws = table.materialize()  # the table's windows read back from the window store
    assert len(ws) > 100 and ws.tensor.shape[1:] == (46, 100) and ws.summary.shape[1] == 368
    assert set(np.unique(ws.y)) <= set(range(5)) and len(set(ws.host)) >= 3
    assert ws.view("realistic", "tensor").shape[1] == 30 and ws.view("oracle", "summary").shape[1] == 368
    assert (ws.mask("realistic") | ~ws.mask("oracle")).all()  # oracle needs more than realistic
    assert np.array_equal(table.mask("oracle"), ws.mask("oracle"))

    def boom(*_a, **_k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(windowstore, "extract_shard", boom)
    again = load_windows(store, jobs=1, progress=False).materialize()
    assert np.array_equal(again.tensor, ws.tensor, equal_nan=True) and np.array_equal(
        again.episode, ws.episode
    )


def test_a_store_with_nothing_usable_says_so(tmp_path: Path) -> None:
    from schema.validation import write_index_atomic

    (tmp_path / "s").mkdir()
    write_index_atomic(tmp_path / "s" / "index.jsonl", [])
    with pytest.raises(DatasetError, match="no accepted or degraded episodes"):
        load_windows(tmp_path / "s", progress=False)
