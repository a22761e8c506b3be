"""The edge loader: a good models directory loads and runs; every kind of bad one is refused
with a message naming the file and both hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_kit import make_run, synthetic_windows

from edge.modelset import ModelSetError, check_runtime, load_models, pick_primary, sha256_file
from schema import extract
from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME
from schema.hashing import schema_hash
from schema.vocab import PHASES
from trainer.export import export_run

OTHER_HASH = "ab" * 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real small models (trainer.models, profile demo): one per input kind and a recurrent one."""
    base = tmp_path_factory.mktemp("exported")
    make_run(base / "run", models=("gbt", "mlp", "cnn", "gru"), real=True)
    return base / "run"


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    export_run(run_dir, run_dir.parent / "models", progress=False)
    return run_dir.parent / "models"


@pytest.fixture
def models(exported: Path, tmp_path: Path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(exported, tmp_path / "models"))


def _sums(d: Path) -> dict[str, str]:
    return {name: h for h, name in (line.split("  ") for line in (d / "SHA256SUMS").read_text().splitlines())}


def _rewrite_sums(d: Path) -> None:
    """Make SHA256SUMS and manifest.json agree with the files again (a consistent but wrong export)."""
    manifest = json.loads((d / "manifest.json").read_text())
    for f in manifest["files"]:
        f["sha256"] = sha256_file(d / f["path"])
        f["bytes"] = (d / f["path"]).stat().st_size
    (d / "manifest.json").write_text(json.dumps(manifest))
    names = [f["path"] for f in manifest["files"]] + ["manifest.json"]
    (d / "SHA256SUMS").write_text("".join(f"{sha256_file(d / n)}  {n}\n" for n in names))


def test_good_directory_loads_and_runs(models: Path, run_dir: Path) -> None:
    ms = load_models(models, expected_schema_hash=schema_hash(), threads=1)
    assert sorted(m.key for m in ms.models) == sorted(
        f"{m}-{t}" for m in ("gbt", "mlp", "cnn", "gru") for t in ("realistic", "oracle")
    )
    a = synthetic_windows(seed=5)
    out = ms.run(a["tensor"][0], a["summary"][0])
    assert all(p.shape == (1, len(PHASES)) and abs(float(p.sum()) - 1) < 1e-5 for p in out.values())
    # each graph got its own threat model's slice of the full window
    cnn = next(m for m in ms.models if m.key == "cnn-realistic")
    # (the graph takes the full window and gathers its 30 channels itself)
    direct = ort.InferenceSession(str(models / "cnn-realistic.onnx")).run(
        [MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: a["tensor"][:1]}
    )[0]
    assert np.allclose(out["cnn-realistic"], direct, atol=1e-6)  # thread count may round differently
    assert len(cnn.channels) == 30 and cnn.input_kind == "tensor" and cnn.metrics.accuracy.value == 0.6
    # and equals the native model the run trained, fed the same raw features
    from trainer.models import load_model

    for key, kind in (("gru-oracle", "tensor"), ("gbt-realistic", "summary")):
        threat = key.split("-")[1]
        native = load_model(run_dir / key, expected_schema_hash=schema_hash())
        x = extract.view(a[kind][:16], threat, kind)
        got = ms.run(a["tensor"][:16], a["summary"][:16])[key]
        assert np.abs(got - native.predict_proba(x)).max() <= 1e-4
    # batches work too
    assert ms.run(a["tensor"][:4], a["summary"][:4])["gbt-oracle"].shape == (4, len(PHASES))

    xyz, cluster = ms.projectors["realistic"].project(a["summary"][:8])
    assert xyz.shape == (8, 3) and xyz.min() >= 0 and xyz.max() <= 1 and cluster.dtype == np.int64

    opts = cnn.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"

    desc = ms.describe()
    assert desc["schema_hash"] == schema_hash()
    assert desc["files"] == _sums(models)
    assert [e.name for e in ms.manifest.envelopes]


def test_each_graph_gathers_its_channels_from_the_full_window(exported: Path) -> None:
    from onnx import numpy_helper

    from schema.channels import view_channels
    from schema.extract import gather_indices

    for threat in ("realistic", "oracle"):
        cols = set(gather_indices(view_channels(threat), "summary").tolist())
        # the tree ensemble has the gather folded into its feature ids: no Gather node, and
        # every feature it reads is one of its threat model's columns of the full summary
        gbt = onnx.load(str(exported / f"gbt-{threat}.onnx"))
        assert gbt.graph.node[0].op_type.startswith("TreeEnsemble")
        (ids,) = [a.ints for n in gbt.graph.node for a in n.attribute if a.name == "nodes_featureids"]
        assert set(ids) <= cols and gbt.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 46 * 8
        for name in ("mlp", "cnn", "gru"):
            proto = onnx.load(str(exported / f"{name}-{threat}.onnx"))
            first = proto.graph.node[0]
            assert first.op_type == "Gather" and first.input[0] == MODEL_INPUT_NAME
            kind = "summary" if name == "mlp" else "tensor"
            got = next(t for t in proto.graph.initializer if t.name == first.input[1])
            assert numpy_helper.to_array(got).tolist() == gather_indices(view_channels(threat), kind).tolist()


def test_tampered_byte_is_refused(models: Path) -> None:
    path = models / "cnn-oracle.onnx"
    expected = _sums(models)["cnn-oracle.onnx"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelSetError) as err:
        load_models(models)
    msg = str(err.value)
    assert "cnn-oracle.onnx" in msg and expected in msg and hashlib.sha256(data).hexdigest() in msg


def test_truncated_file_is_refused(models: Path) -> None:
    path = models / "gbt-realistic.onnx"
    expected = _sums(models)["gbt-realistic.onnx"]
    data = path.read_bytes()[:1000]
    path.write_bytes(data)
    with pytest.raises(ModelSetError) as err:
        load_models(models)
    msg = str(err.value)
    assert "gbt-realistic.onnx" in msg and expected in msg and hashlib.sha256(data).hexdigest() in msg
    assert "1000 bytes" in msg


def test_missing_file_is_refused(models: Path) -> None:
    expected = _sums(models)["projector-oracle.onnx"]
    (models / "projector-oracle.onnx").unlink()
    with pytest.raises(ModelSetError, match=f"projector-oracle.onnx: missing.*{expected}.*no such file"):
        load_models(models)


def test_missing_sums_and_unlisted_model_are_refused(models: Path) -> None:
    shutil.copy(models / "gru-oracle.onnx", models / "gru-extra.onnx")
    with pytest.raises(ModelSetError) as err:
        load_models(models)
    assert "gru-extra.onnx: not listed in SHA256SUMS" in str(err.value)
    assert sha256_file(models / "gru-extra.onnx") in str(err.value)
    (models / "SHA256SUMS").unlink()
    with pytest.raises(ModelSetError, match="SHA256SUMS: missing"):
        load_models(models)


def test_sums_and_manifest_hash_mismatch_is_refused(models: Path) -> None:
    manifest = json.loads((models / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "mlp-oracle.onnx")
    real = entry["sha256"]
    entry["sha256"] = OTHER_HASH
    (models / "manifest.json").write_text(json.dumps(manifest))
    # SHA256SUMS updated for the edited manifest, so only the two lists disagree
    sums = (models / "SHA256SUMS").read_text().splitlines()
    sums = [
        f"{sha256_file(models / 'manifest.json')}  manifest.json" if s.endswith("manifest.json") else s
        for s in sums
    ]
    (models / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    with pytest.raises(ModelSetError) as err:
        load_models(models)
    msg = str(err.value)
    assert "mlp-oracle.onnx" in msg and OTHER_HASH in msg and real in msg


def test_daemon_under_another_schema_hash_refuses_the_directory(models: Path) -> None:
    with pytest.raises(ModelSetError) as err:
        load_models(models, expected_schema_hash=OTHER_HASH)
    msg = str(err.value)
    assert "manifest.json" in msg and OTHER_HASH in msg and schema_hash() in msg


def test_model_with_wrong_schema_hash_in_metadata_is_refused(models: Path) -> None:
    path = models / "mlp-realistic.onnx"
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "schema_hash":
            p.value = OTHER_HASH
    onnx.save(proto, str(path))
    _rewrite_sums(models)  # the files are intact; only what the model was built for is wrong
    with pytest.raises(ModelSetError) as err:
        load_models(models)
    msg = str(err.value)
    assert "mlp-realistic.onnx" in msg and OTHER_HASH in msg and schema_hash() in msg


def test_malformed_and_escaping_sums_lines_are_refused(models: Path) -> None:
    sums = models / "SHA256SUMS"
    good = sums.read_text()
    sums.write_text(good + "not a line\n")
    with pytest.raises(ModelSetError, match=r"SHA256SUMS: line 12: expected"):
        load_models(models)
    sums.write_text(good + f"{OTHER_HASH}  ../etc/passwd\n")
    with pytest.raises(ModelSetError, match="not a plain name"):
        load_models(models)


def test_runtime_known_to_crash_on_a_pi4_is_refused() -> None:
    with pytest.raises(ModelSetError, match="illegal instruction"):
        check_runtime("1.21.1", "aarch64")
    check_runtime("1.20.1", "aarch64")
    check_runtime("1.17.3", "aarch64")
    with pytest.warns(UserWarning, match="outside the supported range"):
        check_runtime("1.16.3", "x86_64")


def test_loader_imports_nothing_the_pi_lacks(exported: Path) -> None:
    """edge.modelset runs with the edge extra only: no trainer, torch, onnx, sklearn, xgboost."""
    code = (
        "import sys\n"
        "from edge.modelset import load_models\n"
        f"ms = load_models({str(exported)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'trainer', 'torch', 'onnx', 'sklearn', 'xgboost', 'onnxmltools', 'tqdm'})\n"
        "print(len(ms.models), bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "8 []"


@pytest.mark.parametrize(
    ("run", "opened", "projectors"),
    [
        ("primary", 1, set()),
        ("realistic", 4, {"realistic"}),
        ("all", 8, {"realistic", "oracle"}),
    ],
)
def test_only_the_run_set_gets_a_session(models: Path, run: str, opened: int, projectors: set[str]) -> None:
    ms = load_models(models, run=run)
    assert len(ms.models) == opened and set(ms.projectors) == projectors
    if run != "all":
        assert {m.threat_model for m in ms.models} == {"realistic"}
        assert set(ms.ood) <= {"realistic"}
    # every model stays listed (the deck's accuracy bars), the unopened ones named in /healthz
    assert len(ms.listed) == 8
    assert len(ms.describe()["not_loaded"]) == 8 - opened
    # the primary is the one the whole set would pick
    assert pick_primary(ms.models).key == pick_primary(load_models(models, run="all").models).key


def test_a_graph_outside_the_run_set_is_still_verified(models: Path) -> None:
    """--run realistic does not open the oracle graphs, but a flipped byte in one is still refused:
    the copy is bad now, not when someone switches --run."""
    oracle = models / "gbt-oracle.onnx"
    data = bytearray(oracle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    oracle.write_bytes(bytes(data))
    with pytest.raises(ModelSetError, match=r"gbt-oracle\.onnx"):
        load_models(models, run="realistic")


def test_a_listed_graph_missing_from_the_sums_is_refused_whatever_the_run(models: Path) -> None:
    """A manifest entry outside the run set whose file SHA256SUMS does not cover refuses the
    set under --run realistic too: what loads under one --run loads under every other."""
    manifest = json.loads((models / "manifest.json").read_text())
    ghost = dict(
        next(m for m in manifest["models"] if m["threat_model"] == "oracle"), file="ghost-oracle.onnx"
    )
    manifest["models"].append(ghost)
    (models / "manifest.json").write_text(json.dumps(manifest))
    _rewrite_sums(models)
    with pytest.raises(ModelSetError, match=r"ghost-oracle\.onnx: in manifest\.json but not in SHA256SUMS"):
        load_models(models, run="realistic")
