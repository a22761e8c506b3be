"""`phasewatch export`: graphs proven (checker, opset, parity), manifest, SHA256SUMS, atomic swap."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_kit import SIGNAL, Corpus, load_standin, make_run, synthetic_windows
from onnx import helper

from schema import atomic, extract
from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME
from schema.channels import CHANNEL_NAMES, REALISTIC_CHANNELS, view_channels
from schema.hashing import schema_hash
from schema.vocab import MODELS, PHASES, PROFILES, THREAT_MODELS
from trainer import export as export_mod
from trainer.envelopes import POINTS, compute_envelopes
from trainer.export import MAX_IR_VERSION, ExportError, check_graph, export_run
from trainer.projector import fit_projector


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture
def standin_run(tmp_path: Path) -> Path:
    make_run(tmp_path / "run", models=("gbt", "cnn"))
    return tmp_path / "run"


# --- real models: the parity contract -------------------------------------------------


@pytest.mark.slow
def test_export_real_models_parity_and_contents(tmp_path: Path) -> None:
    """All six real models x two threat models: checker, metadata, parity, sums, the loader."""
    arrays = make_run(tmp_path / "run", models=MODELS, real=True)
    out = tmp_path / "models"
    manifest = export_run(tmp_path / "run", out, progress=False, windows=Corpus(arrays))

    names = {f"{m}-{t}.onnx" for m in MODELS for t in THREAT_MODELS}
    assert names | {"projector-realistic.onnx", "projector-oracle.onnx", "manifest.json", "SHA256SUMS"} == {
        p.name for p in out.iterdir()
    }
    for entry in manifest.models:
        assert entry.parity is not None
        assert entry.parity.windows == int((arrays["host"] == "h2").sum())
        assert entry.parity.max_abs_diff <= 1e-4, entry
        assert entry.parity.argmax_agreement >= 0.999, entry
        path = out / entry.file
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        assert proto.ir_version <= MAX_IR_VERSION
        assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx", "ai.onnx.ml"}
        meta = _meta(path)
        assert meta["schema_hash"] == schema_hash()
        assert (meta["model"], meta["threat_model"]) == (entry.model, entry.threat_model)
        assert json.loads(meta["classes"]) == list(PHASES)
        assert json.loads(meta["channels"]) == [CHANNEL_NAMES[c] for c in view_channels(entry.threat_model)]
        assert json.loads(meta["metrics"])["macro_f1"]["ci"] == [0.4, 0.6]
        assert json.loads(meta["split"])["kind"] == "host"
        assert {"window_s", "stride_s", "rate_hz", "input_kind", "opset", "created"} <= set(meta)

    # the exported graph on raw held-out features equals the native model, independently re-run here
    from trainer.models import load_model

    held = np.load(tmp_path / "run" / "heldout-realistic.npz")
    native = load_model(tmp_path / "run" / "lstm-realistic", expected_schema_hash=schema_hash())
    x = extract.view(held["tensor"], "realistic", "tensor")
    # the graph takes the full 46-channel window and gathers its own channels
    got = ort.InferenceSession(str(out / "lstm-realistic.onnx")).run(
        [MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: held["tensor"]}
    )[0]
    assert np.abs(got - native.predict_proba(x)).max() <= 1e-4

    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out).returncode == 0

    from edge.modelset import load_models

    ms = load_models(out)
    probs = ms.run(arrays["tensor"][:3], arrays["summary"][:3])
    assert set(probs) == {n.removesuffix(".onnx") for n in names}
    assert all(
        p.shape == (3, len(PHASES)) and np.allclose(p.sum(axis=1), 1, atol=1e-5) for p in probs.values()
    )


# --- the directory -----------------------------------------------------------------------------


def test_manifest_and_sums_describe_every_file(standin_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    m = export_run(standin_run, out, loader=load_standin, progress=False)
    listed = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert listed == {k: v for k, v in _digests(out).items() if k != "SHA256SUMS"}
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["schema_hash"] == schema_hash()
    assert doc["onnxruntime"] == ">=1.17,!=1.21.*"
    for f in doc["files"]:
        assert f["sha256"] == listed[f["path"]] and f["bytes"] == (out / f["path"]).stat().st_size
    assert {e["file"] for e in doc["models"]} == {
        "gbt-realistic.onnx",
        "cnn-realistic.onnx",
        "gbt-oracle.onnx",
        "cnn-oracle.onnx",
    }
    assert doc["models"][0]["metrics"]["accuracy"]["value"] == 0.6
    assert {p["threat_model"] for p in doc["projectors"]} == set(THREAT_MODELS)
    # the held-out host h2 carries one infected episode of every profile
    assert [e["name"] for e in doc["envelopes"]] == list(PROFILES)
    assert all(len(e["curve"]) == POINTS for e in doc["envelopes"])
    assert len(m.files) == 6
    # the directory gets the usual umask permissions, not mkdtemp's 0700 that scp would carry
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_manifest_decodes_with_its_struct_and_every_graph_reads_the_full_window(
    standin_run: Path, tmp_path: Path
) -> None:
    from onnx import numpy_helper

    from schema.artifacts import MANIFEST_FILE, ArtifactError, Manifest, read_doc
    from schema.extract import gather_indices, input_shape

    out = tmp_path / "models"
    written = export_run(standin_run, out, loader=load_standin, progress=False)
    m = read_doc(out / MANIFEST_FILE, Manifest)
    assert m == written
    graphs = [(e.file, e.threat_model, e.input_kind, e.input_shape) for e in m.models]
    graphs += [(p.file, p.threat_model, "summary", p.input_shape) for p in m.projectors]
    for file, threat, kind, shape in graphs:
        assert shape == list(input_shape(kind)), file
        proto = onnx.load(str(out / file))
        (inp,) = proto.graph.input
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == shape, file
        first = proto.graph.node[0]
        assert first.op_type == "Gather" and first.input[0] == MODEL_INPUT_NAME, file
        cols = next(t for t in proto.graph.initializer if t.name == first.input[1])
        assert numpy_helper.to_array(cols).tolist() == gather_indices(view_channels(threat), kind).tolist()
    doc = json.loads((out / MANIFEST_FILE).read_text())
    doc["files"][2]["bytes"] = "big"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"bad\.json: .*\$\.files\[2\]\.bytes"):
        read_doc(tmp_path / "bad.json", Manifest)


def test_parity_failure_aborts_and_names_model(tmp_path: Path) -> None:
    make_run(tmp_path / "run", models=("mlp", "cnn"), onnx_skew={"cnn-oracle": 0.05})
    out = tmp_path / "models"
    with pytest.raises(ExportError) as err:
        export_run(tmp_path / "run", out, loader=load_standin, progress=False)
    msg = str(err.value)
    assert "cnn-oracle" in msg and "max abs probability difference" in msg and "argmax agreement" in msg
    assert not out.exists()
    assert not list(tmp_path.glob(".models.*"))  # no temporary left (schema.atomic.temp_prefix)


def test_interrupted_export_leaves_previous_directory(
    standin_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models"
    export_run(standin_run, out, loader=load_standin, progress=False)
    before = _digests(out)

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    # after every model graph is written into the temp dir, before the manifest
    monkeypatch.setattr("trainer.projector.fit_projector", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(standin_run, out, loader=load_standin, progress=False)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "run"]


def test_reexport_replaces_directory_with_and_without_exchange(
    standin_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models"
    export_run(standin_run, out, loader=load_standin, progress=False)
    (out / "bench.json").write_text("{}")  # written by `phasewatch bench`; gone after a re-export
    export_run(standin_run, out, loader=load_standin, progress=False)
    assert not (out / "bench.json").exists()
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # no renameat2: two renames
    (out / "bench.json").write_text("{}")
    export_run(standin_run, out, loader=load_standin, progress=False)
    assert not (out / "bench.json").exists() and (out / "SHA256SUMS").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "run"]


def test_failed_second_rename_puts_the_previous_export_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, new = tmp_path / "models", tmp_path / "models.tmp-x"
    out.mkdir()
    (out / "SHA256SUMS").write_text("previous\n")
    new.mkdir()
    (new / "SHA256SUMS").write_text("new\n")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a: Path, b: Path) -> None:
        if Path(a) == new:
            raise OSError(28, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(export_mod.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        export_mod.swap_into_place(new, out)
    assert (out / "SHA256SUMS").read_text() == "previous\n"
    assert not list(tmp_path.glob("models.old-*"))


def test_refuses_to_replace_a_directory_that_is_not_a_models_dir(standin_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a models directory"):
        export_run(standin_run, out, loader=load_standin, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]


def test_run_under_another_schema_hash_is_refused(standin_run: Path, tmp_path: Path) -> None:
    doc = json.loads((standin_run / "run.json").read_text())
    doc["schema_hash"] = "0" * 64
    (standin_run / "run.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=f"{'0' * 64}.*{schema_hash()}"):
        export_run(standin_run, tmp_path / "models", loader=load_standin, progress=False)


def test_listed_but_missing_checkpoint_and_bad_json_are_named(standin_run: Path, tmp_path: Path) -> None:
    shutil.rmtree(standin_run / "cnn-oracle")
    with pytest.raises(ExportError, match="cnn-oracle"):
        export_run(standin_run, tmp_path / "models", loader=load_standin, progress=False)
    (standin_run / "run.json").write_text('{"schema_hash": ')
    with pytest.raises(ExportError, match=r"run\.json: line 1"):
        export_run(standin_run, tmp_path / "models", loader=load_standin, progress=False)


def test_cli_export(
    standin_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.cli import main

    monkeypatch.setattr("trainer.models.load_model", load_standin)
    assert main(["export", "--run", str(standin_run), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "exported 4 models, 2 projectors" in capsys.readouterr().out
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "m"), "--quiet"]) == 1
    assert "run.json: missing" in capsys.readouterr().err


# --- graph checks ------------------------------------------------------------------------------


def _tiny(opsets: list[tuple[str, int]], domain: str = "") -> onnx.ModelProto:
    node = helper.make_node("Relu", ["features"], ["probabilities"], domain=domain)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 5])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_check_graph_limits() -> None:
    proto = _tiny([("", 17)])
    assert proto.ir_version > MAX_IR_VERSION  # this onnx stamps a newer IR than the Pi reads
    assert check_graph(proto, "x.onnx") == {"ai.onnx": 17}
    assert proto.ir_version == MAX_IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    with pytest.raises(ExportError, match=r"opset ai\.onnx 21 is above 20"):
        check_graph(_tiny([("", 21)]), "x.onnx")
    with pytest.raises(ExportError, match=r"'com\.microsoft'"):
        check_graph(_tiny([("", 17), ("com.microsoft", 1)], domain="com.microsoft"), "x.onnx")
    with pytest.raises(ExportError, match=r"ai\.onnx\.ml 5"):
        check_graph(_tiny([("", 17), ("ai.onnx.ml", 5)]), "x.onnx")


# --- projector and envelopes -------------------------------------------------------------------


def test_projector_graph_matches_numpy(tmp_path: Path) -> None:
    arrays = synthetic_windows(seed=3)
    x = extract.view(arrays["summary"], "realistic", "summary")
    proj = fit_projector(x, "realistic", REALISTIC_CHANNELS, seed=1)
    path = proj.to_onnx(tmp_path / "p.onnx", metadata={"schema_hash": schema_hash()})
    onnx.checker.check_model(str(path), full_check=True)
    # unseen windows, including some far outside the fitted box
    probe = extract.view(synthetic_windows(seed=4)["summary"], "realistic", "summary")
    probe[:5] *= 1e3
    xyz, cluster = ort.InferenceSession(str(path)).run(["xyz", "cluster"], {"features": probe})
    ref_xyz, ref_cluster = proj.transform(probe)
    assert xyz.shape == (len(probe), 3) and cluster.dtype == np.int64
    assert np.abs(xyz - ref_xyz).max() <= 1e-4
    assert (cluster == ref_cluster).mean() >= 0.999
    assert xyz.min() >= 0.0 and xyz.max() <= 1.0
    assert set(np.unique(cluster)) <= set(range(len(PHASES))) and len(np.unique(cluster)) > 1
    # the box is the fitted points' spread: they are not squashed into a corner
    fit_xyz, _ = proj.transform(x)
    assert (fit_xyz.max(axis=0) - fit_xyz.min(axis=0)).min() > 0.5


def test_projector_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="expected"):
        fit_projector(np.zeros((100, 7), np.float32), "realistic", REALISTIC_CHANNELS)
    bad = np.ones((100, len(REALISTIC_CHANNELS) * 8), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_projector(bad, "realistic", REALISTIC_CHANNELS)


def test_envelopes_follow_the_signature_channel() -> None:
    a = synthetic_windows(episodes_per_profile=3)
    envs = {
        e.name: e for e in compute_envelopes(a["tensor"], a["y"], a["episode"], a["profile"], a["window"])
    }
    assert set(envs) == set(PROFILES)
    cpu = envs["cpu-saturate"]
    assert cpu.episodes == 3 and len(cpu.curve) == POINTS
    assert cpu.channel in SIGNAL["cpu-saturate"]
    assert cpu.shape.startswith("sustained one-vCPU peg") and "x clean while running)" in cpu.shape
    curve = np.array(cpu.curve)
    # the span opens with two infecting windows (x4) before the payload runs (x20)
    assert curve[-20:].max() > 3 * curve[:5].mean()
    assert envs["disk-encrypt"].channel == "qmp.blk_rd_bytes+qmp.blk_wr_bytes"
    # shuffled input gives the same envelopes (windows are ordered by their number)
    perm = np.random.default_rng(0).permutation(len(a["y"]))
    again = compute_envelopes(
        a["tensor"][perm], a["y"][perm], a["episode"][perm], a["profile"][perm], a["window"][perm]
    )
    assert [e.curve for e in again] == [envs[e.name].curve for e in again]


def test_envelope_channel_is_the_one_that_rises_in_this_corpus() -> None:
    a = synthetic_windows(episodes_per_profile=3)
    mem = a["profile"] == "mem-inflate"
    for name in ("proc.rss_kb", "guest.mem_used_kb"):
        c = CHANNEL_NAMES.index(name)
        a["tensor"][mem, c] = a["tensor"][mem & (a["y"] == 0), c].mean()  # flat: nothing rises
    balloon = CHANNEL_NAMES.index("qmp.balloon_actual_kb")
    a["tensor"][mem & (a["y"] >= 2), balloon] *= 50.0
    envs = {
        e.name: e for e in compute_envelopes(a["tensor"], a["y"], a["episode"], a["profile"], a["window"])
    }
    assert envs["mem-inflate"].channel == "qmp.balloon_actual_kb"


def test_envelopes_on_a_channel_subset_and_length_checks() -> None:
    a = synthetic_windows()
    real = extract.view(a["tensor"], "realistic", "tensor")
    names = [CHANNEL_NAMES[c] for c in REALISTIC_CHANNELS]
    envs = compute_envelopes(real, a["y"], a["episode"], a["profile"], a["window"], names)
    assert [e.name for e in envs] == list(PROFILES)  # every signature channel is host-side
    with pytest.raises(ValueError, match="disagree in length"):
        compute_envelopes(real, a["y"][:-1], a["episode"], a["profile"], a["window"], names)


def test_ood_detectors_of_the_run_are_shipped_listed_and_loaded(standin_run: Path, tmp_path: Path) -> None:
    """ood-<threat>.json fitted on the run's windows: copied, in the manifest and SHA256SUMS, decoded."""
    from edge.modelset import load_models
    from schema.artifacts import ood_file
    from schema.ood import encode
    from trainer.ood import fit_detector

    arrays = synthetic_windows(seed=0)
    train = np.flatnonzero(arrays["host"] != "h2")
    for threat in THREAT_MODELS:
        det, _ = fit_detector(arrays["summary"], train, arrays["episode"], arrays["profile"], threat)
        (standin_run / ood_file(threat)).write_bytes(encode(det))
    out = tmp_path / "models"
    m = export_run(standin_run, out, loader=load_standin, progress=False)
    assert sorted(o.threat_model for o in m.ood) == sorted(THREAT_MODELS)
    kinds = {f.path: f.kind for f in m.files}
    assert all(kinds[ood_file(t)] == "ood" for t in THREAT_MODELS)
    assert ood_file("oracle") in (out / "SHA256SUMS").read_text()
    ms = load_models(out, schema_hash())
    by_threat = {o.threat_model: o for o in m.ood}
    assert ms.ood["realistic"].threshold == pytest.approx(by_threat["realistic"].threshold)
    # a broken detector in the run stops the export with the file named
    (standin_run / ood_file("oracle")).write_text('{"threat_model": "oracle"}')
    with pytest.raises(ValueError, match=r"ood-oracle\.json"):
        export_run(standin_run, tmp_path / "models2", loader=load_standin, progress=False)
