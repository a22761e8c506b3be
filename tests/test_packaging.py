"""Edge first: what the Pi installs, and that the wheel serves the deck."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
TRAINER_ONLY = (
    "torch",
    "xgboost",
    "xgboost-cpu",
    "onnx",
    "onnxmltools",
    "scikit-learn",
    "matplotlib",
    "tqdm",
)


def _name(req: str) -> str:
    return re.split(r"[ <>=!;\[]", req, maxsplit=1)[0].lower()


def test_edge_extra_pulls_in_nothing_heavy() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    edge = {_name(r) for r in project["optional-dependencies"]["edge"]} | {
        _name(r) for r in project["dependencies"]
    }
    assert edge == {
        "numpy",
        "msgspec",
        "zstandard",
        "onnxruntime",
        "trio",
        "wsproto",
        "h11",
        "paho-mqtt",
        "inotify-simple",
    }
    assert not edge & set(TRAINER_ONLY)
    ort = next(r for r in project["optional-dependencies"]["edge"] if _name(r) == "onnxruntime")
    assert "!=1.21.*" in ort  # SIGILL on a Pi 4


def test_schema_and_edge_never_import_the_trainer_side() -> None:
    offenders = []
    pattern = re.compile(
        r"^\s*(from|import)\s+(trainer|torch|xgboost|onnxmltools|onnx|sklearn|matplotlib|tqdm)\b", re.M
    )
    for pkg in ("schema", "edge"):
        for py in (ROOT / pkg).rglob("*.py"):
            offenders += [
                f"{py.relative_to(ROOT)}: {m.group(0).strip()}" for m in pattern.finditer(py.read_text())
            ]
    assert offenders == []


def test_daemon_modules_import_without_trainer_packages() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'xgboost', 'sklearn', 'onnx', 'trainer', 'matplotlib'):\n"
        "    sys.modules[m] = None  # importing any of these now raises ImportError\n"
        "import edge.daemon, edge.server, edge.tail, edge.infer, edge.modelset, edge.replay, edge.demo\n"
        "import schema.reader, schema.extract, schema.validation, schema.publisher\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_wheel_ships_the_deck_inside_edge(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0 and "hatchling" in out.stderr:
        pytest.skip("hatchling is not installed in this environment")
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("phasewatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    deck = sorted(p.name for p in (ROOT / "deck").iterdir() if p.is_file())
    assert all(f"edge/deck/{n}" in names for n in deck)
    assert any(n.startswith("schema/") for n in names) and any(n.startswith("trainer/") for n in names)
