"""kill -9 and a full disk during the writes the edge depends on: the acceptance index
(``phasewatch validate``), the run directory (``phasewatch train``) and the models directory
(``phasewatch export``). Issue 14, item 9;
docs/FAULTS.md. Each kill is a real SIGKILL of a real child process; the full disk is a real
tmpfs mounted small (skipped where this user may not mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_kit import episode_members, write_archive

from edge.modelset import load_models
from schema.validation import read_index
from schema.vocab import INDEX_NAME

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _store(root: Path, n: int, first: int = 0) -> Path:
    for i in range(first, first + n):
        write_archive(
            root / f"host-{i % 2}" / f"ep{i:03d}.tar.zst",
            episode_members(f"ep{i:03d}", "h", duration_s=20, seed=i),
        )
    return root


def _validate(store: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "trainer.cli",
        "validate",
        str(store),
        "--jobs",
        "1",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _temps(d: Path, name: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{name}."))


def test_kill_9_while_the_index_is_written_leaves_the_old_one(tmp_path: Path) -> None:
    """A child writes the index slowly (a record every few ms) and is killed mid-write."""
    store = _store(tmp_path / "store", 4)
    assert _validate(store).wait(120) == 0
    index = store / INDEX_NAME
    old = index.read_bytes()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from schema.validation import read_index, write_index_atomic\n"
            "p = pathlib.Path(sys.argv[1]); recs = read_index(p)\n"
            "def slow():\n"
            "    for i in range(2000):\n"
            "        if i == 20: pathlib.Path(sys.argv[2]).touch()\n"
            "        time.sleep(0.002); yield recs[i % len(recs)]\n"
            "write_index_atomic(p, slow())\n",
            str(index),
            str(tmp_path / "halfway"),
        ],
        env=ENV,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "halfway").exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert index.read_bytes() == old  # the old index, whole
    assert len(_temps(store, INDEX_NAME)) == 1  # what SIGKILL leaves: the half temporary, beside it
    assert _validate(store).wait(120) == 0  # the next run starts cleanly
    assert _temps(store, INDEX_NAME) == [] and index.read_bytes() == old


def test_kill_9_at_random_points_of_validate(tmp_path: Path) -> None:
    store = _store(tmp_path / "store", 6)
    index = store / INDEX_NAME
    t = time.monotonic()
    assert _validate(store).wait(120) == 0
    full_s = time.monotonic() - t
    old = index.read_bytes()
    _store(store, 4, first=6)  # new archives: the next index differs
    rng = random.Random(14)
    outcomes = set()
    for _ in range(5):
        child = _validate(store)
        time.sleep(rng.uniform(0.2, 1.2) * full_s)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        data = index.read_bytes()
        records = read_index(index)  # every line decodes: never half a file
        assert data == old or len(records) == 10, len(records)
        outcomes.add("old" if data == old else "new")
    assert _validate(store).wait(120) == 0
    assert len(read_index(index)) == 10 and _temps(store, INDEX_NAME) == []
    print(f"\nvalidate killed 5 times at random points ({full_s:.1f} s run): index found {sorted(outcomes)}")


# --- a full disk ---------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    """Use every free byte (a filler file written until ENOSPC)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def test_validate_on_a_full_disk_is_one_line_and_keeps_the_old_index(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "32m") as disk:
        store = _store(disk / "store", 6)
        assert _validate(store).wait(120) == 0
        index = store / INDEX_NAME
        old = index.read_bytes()
        for p in sorted(store.rglob("*.tar.zst"))[:3]:
            os.utime(p, ns=(time.time_ns(), time.time_ns()))  # changed: read again, index rewritten
        fill(disk)
        child = _validate(store)
        _, err = child.communicate(timeout=120)
        lines = err.decode().strip().splitlines()
        assert child.returncode != 0
        assert len(lines) == 1 and "Traceback" not in err.decode(), err.decode()
        assert "No space left on device" in lines[0] and str(store) in lines[0], lines[0]
        assert index.read_bytes() == old and _temps(store, INDEX_NAME) == []


def _export_child(run: Path, out: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys, pathlib\n"
        "from export_kit import load_standin\n"
        "from trainer.export import export_run\n"
        "run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "export_run(run, out, loader=load_standin, progress=False)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(run), str(out)], env=ENV, stderr=subprocess.PIPE)


def test_kill_9_at_random_points_of_export_leaves_a_loadable_models_dir(tmp_path: Path) -> None:
    from export_kit import make_run

    run = tmp_path / "run"
    make_run(run, models=("gbt", "cnn"))
    out = tmp_path / "models"
    t = time.monotonic()
    assert _export_child(run, out).wait(300) == 0
    full_s = time.monotonic() - t
    first = load_models(out).manifest.created
    rng = random.Random(9)
    for _ in range(4):
        child = _export_child(run, out)
        time.sleep(rng.uniform(0.3, 1.1) * full_s)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        ms = load_models(out)  # the daemon's own verifier: every file matches SHA256SUMS
        assert ms.models
    assert _export_child(run, out).wait(300) == 0
    assert _temps(tmp_path, "models") == []  # the killed runs' temporaries are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "run"]
    print(f"\nexport killed 4 times at random points ({full_s:.1f} s run); first export {first}")


def test_export_on_a_full_disk_keeps_the_previous_models_dir(tmp_path: Path) -> None:
    from export_kit import load_standin, make_run

    from trainer.export import export_run

    run = tmp_path / "run"
    make_run(run, models=("gbt", "cnn"))
    with small_disk(tmp_path / "disk", "3m") as disk:
        out = disk / "models"
        export_run(run, out, loader=load_standin, progress=False)
        before = {p.name: _sha(p) for p in out.iterdir()}
        fill(disk)
        with pytest.raises(OSError) as info:
            export_run(run, out, loader=load_standin, progress=False)
        assert (
            info.value.errno == 28
            and "No space left on device" in str(info.value)
            and str(out) in str(info.value)
        )
        assert {p.name: _sha(p) for p in out.iterdir()} == before
        assert _temps(disk, "models") == [] and load_models(out).models


_TRAIN_CHILD = """
import sys
from pathlib import Path
from test_train import FAST, windowset
from trainer.dataset import make_split
from trainer.train import train_windowset

ws = windowset()
train_windowset(ws, make_split(ws, "host", seed=0), Path(sys.argv[1]), profile="demo",
                models=["gbt", "mlp", "cnn"], threats=["realistic", "oracle"], n_boot=50,
                progress=False, overrides=FAST)
"""


def _train_child(out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _TRAIN_CHILD, str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_during_train_leaves_the_previous_run_dir(tmp_path: Path) -> None:
    """The run directory is written beside its place and swapped in whole: a SIGKILL while the
    models train leaves the previous run byte for byte, and the next run removes the dead one's
    temporary and lands."""
    out = tmp_path / "run"
    first = _train_child(out)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    before = {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()}
    assert Path("run.json") in before
    child = _train_child(out)
    deadline = time.monotonic() + 240
    while not any((d / "gbt-realistic").exists() for d in tmp_path.glob(".run.*")):  # mid-run
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before it was killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    after = {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert _temps(tmp_path, "run")  # the killed run's temporary is still there
    third = _train_child(out)
    assert third.wait(timeout=300) == 0, third.stderr.read() if third.stderr else ""
    assert _temps(tmp_path, "run") == [] and (out / "run.json").exists()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_kill_9_of_validate_leaves_no_worker_behind(tmp_path: Path) -> None:
    """A SIGKILLed sweep's pool workers die with it (before, each slept on its queue forever)."""
    store = _store(tmp_path / "store", 12)
    child = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "validate", str(store), "--jobs", "2", "--no-progress"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(workers := _children(child.pid)) < 2:
        assert child.poll() is None and time.monotonic() < deadline, "no pool workers seen"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    deadline = time.monotonic() + 10
    while alive := [w for w in workers if Path(f"/proc/{w}").exists() and _state(w) != "Z"]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their killed parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
