"""`phasewatch train` end to end on a small synthetic WindowSet: run directory, report, checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from schema import extract
from schema.channels import CHANNEL_NAMES, N_CHANNELS, SOURCE_SLICE, WINDOW_STEPS
from schema.hashing import schema_hash
from schema.vocab import PHASE_INDEX, SOURCES
from trainer.dataset import WindowSet, make_split
from trainer.errors import TrainerError
from trainer.models import load_model
from trainer.report import summary_table
from trainer.train import add_train_arguments, cli_train, train_windowset

SIGNAL = {
    "cpu-saturate": "proc.utime_ticks",
    "bursty-c2": "netflow.bytes_out",
    "disk-encrypt": "qmp.blk_wr_bytes",
}
PER_EP = 12
TRAINED = ("gbt", "mlp", "cnn", "rocket")  # both trainers (xgboost, torch loop) and the closed-form one
FAST = {
    "gbt": {"rounds": 15, "threads": 1},
    "mlp": {"epochs": 4, "threads": 1, "max_seconds": None},
    "cnn": {"epochs": 3, "threads": 1, "max_seconds": None},
}


def phase(w: int) -> int:
    if w < 3:
        return PHASE_INDEX["clean"]
    if w < 5:
        return PHASE_INDEX["armed"]
    if w < 6:
        return PHASE_INDEX["infecting"]
    return PHASE_INDEX["infected_running"] if w % 3 else PHASE_INDEX["dormant"]


def windowset(seed: int = 0) -> WindowSet:
    """3 hosts x (3 profiles + clean-only) x 2 episodes; the guest agent is silent in some windows."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {
        k: [] for k in ("tensor", "coverage", "y", "episode", "host", "profile", "sample", "window")
    }
    n_ep = 0
    for host in ("h1", "h2", "h3"):
        for prof in (*SIGNAL, "none"):
            for i in range(2):
                ep = f"{host}-{prof}-{i}"
                base = rng.lognormal(2.0, 1.0, size=N_CHANNELS)
                for w in range(PER_EP):
                    y = phase(w) if prof != "none" else PHASE_INDEX["clean"]
                    x = base[:, None] * rng.lognormal(0, 0.2, size=(N_CHANNELS, WINDOW_STEPS))
                    if prof != "none" and y in (PHASE_INDEX["infecting"], PHASE_INDEX["infected_running"]):
                        x[CHANNEL_NAMES.index(SIGNAL[prof])] *= 50.0
                    if prof != "none" and y == PHASE_INDEX["armed"]:
                        x[CHANNEL_NAMES.index("proc.rss_kb")] *= 5.0
                    cov = np.ones(len(SOURCES), np.float32)
                    if w == 1:  # guest agent down: unusable for oracle, fine for realistic
                        x[SOURCE_SLICE["guest"]] = np.nan
                        cov[SOURCES.index("guest")] = 0.0
                    parts["tensor"].append(x.astype(np.float32))
                    parts["coverage"].append(cov)
                    parts["y"].append(y)
                    parts["episode"].append(ep)
                    parts["host"].append(host)
                    parts["profile"].append(prof)
                    parts["sample"].append(f"{prof}-s{i}")
                    parts["window"].append(w)
                n_ep += 1
    tensor = np.stack(parts["tensor"])
    episode = np.array(parts["episode"])
    _, _first = np.unique(episode, return_index=True)
    return WindowSet(
        tensor=tensor,
        summary=extract.summarize(tensor),
        coverage=np.stack(parts["coverage"]),
        y=np.array(parts["y"], np.int64),
        episode=episode,
        host=np.array(parts["host"]),
        profile=np.array(parts["profile"]),
        sample=np.array(parts["sample"]),
        t_rank=np.repeat(np.linspace(0, 1, n_ep), PER_EP),
        window=np.array(parts["window"], np.int32),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, WindowSet, object]:
    ws = windowset()
    split = make_split(ws, "host", seed=0)
    out = tmp_path_factory.mktemp("run")
    report = train_windowset(
        ws,
        split,
        out,
        profile="demo",
        models=list(TRAINED),
        seed=0,
        n_boot=200,
        progress=False,
        overrides=FAST,
    )
    return out, report, ws, split


def test_run_directory_layout(run) -> None:
    out, _report, _ws, _split = run
    doc = json.loads((out / "run.json").read_text())
    assert doc["schema_hash"] == schema_hash() and doc["split"]["kind"] == "host"
    assert doc["models"] == [f"{m}-{t}" for t in ("realistic", "oracle") for m in TRAINED]
    for key in doc["models"]:
        assert (out / key / "model.json").is_file()
    for name in (
        "report.json",
        "report.html",
        "confusion-realistic.png",
        "confusion-oracle.png",
        "per-profile-f1.png",
        "model-comparison.png",
        "threat-gap.png",
        "reliability-realistic.png",
        "reliability-oracle.png",
        "ood.png",
        "ood-realistic.json",
        "ood-oracle.json",
    ):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert 'src="confusion-realistic.png"' in html and "threat-gap" in html


def test_run_json_decodes_with_its_struct_and_carries_the_heldout_metrics(run, tmp_path: Path) -> None:
    from schema.artifacts import ArtifactError, RunDoc, read_doc

    out, report, _ws, _split = run
    doc = read_doc(out / "run.json", RunDoc)
    assert sorted(doc.metrics) == sorted(doc.models) == sorted(report["models"])
    for key, m in doc.metrics.items():
        assert m.macro_f1.value == pytest.approx(report["models"][key]["macro_f1"])
        assert m.macro_f1.ci == pytest.approx(tuple(report["models"][key]["macro_f1_ci"]))
        assert m.accuracy.value == pytest.approx(report["models"][key]["accuracy"])
    bad = json.loads((out / "run.json").read_text())
    bad["metrics"]["gbt-oracle"]["n_windows"] = "many"
    (tmp_path / "run.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"run\.json: .*\$\.metrics\[\.\.\.\]\.n_windows"):
        read_doc(tmp_path / "run.json", RunDoc)


def test_heldout_windows_are_the_test_side_in_each_view(run) -> None:
    out, report, ws, split = run
    real = np.load(out / "heldout-realistic.npz")
    orac = np.load(out / "heldout-oracle.npz")
    # full width on disk (every array crossing a file boundary has all 46 channels)
    assert real["tensor"].shape[1:] == (46, 100) and real["summary"].shape[1] == 46 * 8
    real_view = extract.view(real["tensor"], "realistic", "tensor")
    assert (
        real_view.shape[1:] == (30, 100)
        and extract.view(real["summary"], "realistic", "summary").shape[1] == 30 * 8
    )
    assert orac["tensor"].shape[1:] == (46, 100) and np.isfinite(real_view).all()
    # No episode on both sides; oracle drops the guest-less windows that realistic keeps.
    assert not set(real["episode"]) & set(ws.episode[split.train])
    assert set(real["index"]) == set(split.test)
    assert len(orac["y"]) == len(real["y"]) - len(set(real["episode"])) and (orac["window"] != 1).all()
    assert np.isfinite(orac["tensor"]).all()
    assert report["dropped_unusable_windows"]["realistic"] == {"train": 0, "val": 0, "test": 0}


def test_report_contents(run) -> None:
    out, _report, _ws, split = run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["untested_profiles"] == split.untested_profiles
    for key, m in on_disk["models"].items():
        assert m["macro_f1_ci"][0] <= m["macro_f1"] <= m["macro_f1_ci"][1], key
        assert m["fit"]["epochs_run"] >= 1 and set(m["per_host"]) == set(split.test_groups)
    assert set(on_disk["baselines"]) == {
        "majority-realistic",
        "logreg-realistic",
        "majority-oracle",
        "logreg-oracle",
    }
    assert len(on_disk["comparisons"]) == 2 * 6  # every pair within each threat model
    assert set(on_disk["threat_gap"]) == set(TRAINED)
    v = on_disk["verdict"]["best_realistic_vs_majority"]
    assert v["a"] == on_disk["best"]["realistic"] and v["b"] == "majority-realistic"
    # This toy problem is easy: the best model clearly beats always-"clean".
    assert v["significant"] and v["diff"] > 0.3
    table = summary_table(on_disk)
    assert "realistic vs oracle" in table and "majority" in table and "logreg" in table
    assert "calibration (held-out ECE" in table


def test_calibration_is_reported_before_and_after(run) -> None:
    """Every model: a validation temperature, held-out ECE/NLL before and after with a paired CI."""
    out, _report, _ws, _split = run
    on_disk = json.loads((out / "report.json").read_text())
    held = np.load(out / "heldout-realistic.npz")
    for key, m in on_disk["models"].items():
        c = m["calibration"]
        assert c["temperature"] > 0 and 0 <= c["ece_after"] <= 1 and 0 <= c["ece_before"] <= 1, key
        assert c["validation"]["val_nll_after"] <= c["validation"]["val_nll_before"] + 1e-9, key
        g = c["bootstrap"]["gap"]
        assert g["lo"] <= g["diff"] <= g["hi"] and g["diff"] == pytest.approx(
            c["ece_after"] - c["ece_before"]
        )
        assert sum(c["reliability_after"]["count"]) == m["n_windows"]
        model = load_model(out / key, expected_schema_hash=schema_hash())
        assert model.inverse_temperature == pytest.approx(1 / c["temperature"])
        if key.endswith("realistic"):
            from trainer.calibrate import ece

            kind = "summary" if m["input_kind"] == "summary" else "tensor"
            x = extract.view(held[kind], "realistic", kind)
            assert ece(model.predict_proba(x), held["y"]) == pytest.approx(c["ece_after"])
    html = (out / "report.html").read_text()
    assert "ECE before" in html and 'src="reliability-realistic.png"' in html


def test_checkpoints_reproduce_the_reported_score(run) -> None:
    out, report, _ws, _split = run
    from trainer.evaluate import macro_f1

    held = np.load(out / "heldout-realistic.npz")
    for name, kind in (("gbt", "summary"), ("cnn", "tensor"), ("rocket", "tensor")):
        model = load_model(out / f"{name}-realistic", expected_schema_hash=schema_hash())
        pred = model.predict_proba(extract.view(held[kind], "realistic", kind)).argmax(axis=1)
        assert macro_f1(held["y"], pred) == pytest.approx(report["models"][f"{name}-realistic"]["macro_f1"])


def test_untested_profiles_are_shouted() -> None:
    table = summary_table({"split": {"kind": "host"}, "untested_profiles": ["mem-inflate"]})
    assert "UNTESTED profiles" in table and "mem-inflate" in table


def test_cli_arguments() -> None:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args([])
    assert (args.split, args.profile, args.store, args.out) == (
        "host",
        "quick",
        Path("data/store"),
        Path("runs/latest"),
    )
    args = p.parse_args(["--models", "gbt,svm"])
    with pytest.raises(TrainerError, match="unknown svm"):
        cli_train(args)


def test_ood_flag_is_fitted_shipped_and_evaluated(run) -> None:
    """The detector is typed, decodes on the edge side, and its report numbers are reproducible."""
    from schema.ood import FLAG_AT, read_detector
    from schema.ood import ood_score as score
    from trainer.ood import _auroc

    out, _report, _ws, _split = run
    on_disk = json.loads((out / "report.json").read_text())
    for threat in ("realistic", "oracle"):
        o = on_disk["ood"][threat]
        det = read_detector(out / o["file"])
        assert det.threat_model == threat and det.threshold == pytest.approx(o["threshold"])
        assert len(det.center) == len(det.channels) * 8 and (threat == "oracle") == (len(det.channels) == 46)
        a = o["auroc_heldout_vs_training_hosts"]
        assert 0 <= a["lo"] <= a["point"] <= a["hi"] <= 1
        # Thresholded at the 95 % quantile of unseen training-host windows: about 5 % flagged there.
        assert o["flagged_share_training_hosts"] <= 0.1
        held = np.load(out / f"heldout-{threat}.npz")
        s = score(det, held["summary"])  # full width, as the daemon scores it
        assert ((s >= FLAG_AT).mean()) == pytest.approx(o["flagged_share_heldout"])
        for key, f in o["accuracy_flagged_vs_unflagged"].items():
            assert f["n_flagged"] + f["n_unflagged"] == len(held["y"]), key
            assert key.endswith(threat) and key.split("-")[0] in TRAINED
    assert _auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert _auroc(np.array([1.0]), np.array([1.0])) == 0.5
    table = summary_table(on_disk)
    assert "OOD flag (realistic" in table and "AUROC held-out hosts vs training hosts" in table


def test_cli_turns_a_trainer_error_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main

    assert main(["train", "--models", "gbt,svm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("phasewatch train: --models: unknown svm; choose from")
    assert "Traceback" not in err
    assert main(["--debug", "train", "--models", "gbt,svm"]) == 2
    assert "Traceback" in capsys.readouterr().err
