"""`phasewatch`'s common failures end in one line naming the file and the fix (issue 14 item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from archive_kit import episode_members, write_archive

from trainer import cli


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's refusals
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return rc, lines[0]


@pytest.fixture
def store_without_index(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    write_archive(store / "host-a" / "ep.tar.zst", episode_members("ep", "host-a", duration_s=20, seed=1))
    return store


def test_train_on_a_store_without_an_index(store_without_index: Path, tmp_path: Path, capsys) -> None:
    rc, line = _run(["train", "--store", str(store_without_index), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert line.startswith(f"phasewatch train: {store_without_index / 'index.jsonl'}: no acceptance index")
    assert f"run `phasewatch validate {store_without_index}` first" in line


@pytest.mark.parametrize(
    ("argv", "expect", "code"),
    [
        (["train", "--store", "{tmp}/nope", "--out", "{tmp}/run"], "{tmp}/nope: not a store directory", 2),
        (["train", "--split", "bogus"], "argument --split: invalid choice: 'bogus'", 2),
        (["bench", "--models", "{tmp}/nope"], "phasewatch bench: {tmp}/nope: not a directory", 2),
        (["validate", "{tmp}/nope"], "phasewatch validate: store {tmp}/nope is not a directory", 2),
        (["export", "--run", "{tmp}/nope", "--out", "{tmp}/m"], "{tmp}/nope/run.json: missing", 1),
        (["frobnicate"], "invalid choice: 'frobnicate'", 2),
    ],
)
def test_common_failures_are_one_line(
    tmp_path: Path, capsys, argv: list[str], expect: str, code: int
) -> None:
    rc, line = _run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert rc == code
    assert line.startswith("phasewatch") and expect.format(tmp=tmp_path) in line, line
