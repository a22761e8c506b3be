"""Inference on tailed windows: real ONNX Runtime sessions on tiny graphs built here.

``build_models_dir`` writes a complete models directory (a graph per model and threat
model, 2 projectors, 2 OOD detectors, manifest.json, SHA256SUMS, bench.json) from small
``onnx.helper`` graphs whose maths is reproduced in numpy, so a test can check every
number the engine publishes. Like the exported ones, each graph reads the full-width
window and starts with a Gather of its threat model's channels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec
import numpy as np
import onnx
import pytest
from archive_kit import episode_members
from onnx import TensorProto, helper, numpy_helper

from edge.infer import Engine, pick_primary, startup_events
from edge.modelset import ModelSetError, load_models
from edge.tail import WindowJob
from schema.artifacts import (
    BENCH_FILE,
    MANIFEST_FILE,
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    PROJECTOR_CLUSTER,
    PROJECTOR_XYZ,
    SUMS_FILE,
    BenchDoc,
    BenchMethod,
    BenchRow,
    Envelope,
    Estimate,
    FileEntry,
    HeldoutMetrics,
    Machine,
    Manifest,
    ModelEntry,
    OodDetector,
    OodEntry,
    ProjectorEntry,
    encode_doc,
    estimate,
    ood_file,
)
from schema.channels import CHANNEL_NAMES, SUMMARY_STATS, view_channels
from schema.events import Embedding, ModelMetric, ModelPerf, PhaseEvent, Prediction
from schema.extract import extract_window, gather_indices, input_shape, summarize
from schema.hashing import schema_hash
from schema.reader import decode_rows
from schema.vocab import MODEL_INPUT, MODELS, PHASES, SOURCE_MEMBER, SOURCES, THREAT_MODELS

K = len(SUMMARY_STATS)
ACCURACY = {
    "gbt": 0.81,
    "mlp": 0.78,
    "cnn": 0.84,
    "gru": 0.88,
    "lstm": 0.86,
    "transformer": 0.83,
    "rocket": 0.85,
}
N_GRAPHS = len(MODELS) * len(THREAT_MODELS)


def _weights(key: str, rows: int, cols: int) -> np.ndarray:
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(0, 1e-3, (rows, cols)).astype(np.float32)


def expected_probs(key: str, kind: str, x: np.ndarray) -> np.ndarray:
    """What the tiny graph for ``key`` computes, in numpy (x: the model's own view)."""
    feats = x.mean(axis=2) if kind == "tensor" else x
    logits = feats.astype(np.float32) @ _weights(key, feats.shape[1], len(PHASES))
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _gather(chans: list[int], kind: str) -> tuple[onnx.ValueInfoProto, onnx.NodeProto, onnx.TensorProto]:
    """The full-width input and the Gather of this graph's channels into "view"."""
    inp = helper.make_tensor_value_info(MODEL_INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape(kind)])
    node = helper.make_node("Gather", [MODEL_INPUT_NAME, "cols"], ["view"], axis=1)
    return inp, node, numpy_helper.from_array(gather_indices(chans, kind), "cols")


def _model(key: str, kind: str, chans: list[int], meta: dict[str, str]) -> onnx.ModelProto:
    n_ch = len(chans)
    width = n_ch * K
    inp, gather, cols = _gather(chans, kind)
    nodes = [gather]
    if kind == "tensor":
        nodes.append(helper.make_node("ReduceMean", ["view"], ["m"], axes=[2], keepdims=0))
        w = _weights(key, n_ch, len(PHASES))
        src = "m"
    else:
        w = _weights(key, width, len(PHASES))
        src = "view"
    nodes += [
        helper.make_node("MatMul", [src, "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [MODEL_OUTPUT_NAME], axis=1),
    ]
    out = helper.make_tensor_value_info(MODEL_OUTPUT_NAME, TensorProto.FLOAT, ["N", len(PHASES)])
    graph = helper.make_graph(nodes, key, [inp], [out], [numpy_helper.from_array(w, "W"), cols])
    return _finish(graph, meta)


def _projector(threat: str, chans: list[int], meta: dict[str, str]) -> onnx.ModelProto:
    width = len(chans) * K
    inp, gather, cols = _gather(chans, "summary")
    nodes = [
        gather,
        helper.make_node("MatMul", ["view", "P"], ["p"]),
        helper.make_node("Sigmoid", ["p"], [PROJECTOR_XYZ]),
        helper.make_node("MatMul", ["view", "C"], ["c"]),
        helper.make_node("ArgMax", ["c"], [PROJECTOR_CLUSTER], axis=1, keepdims=0),
    ]
    outs = [
        helper.make_tensor_value_info(PROJECTOR_XYZ, TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info(PROJECTOR_CLUSTER, TensorProto.INT64, ["N"]),
    ]
    inits = [
        numpy_helper.from_array(_weights("P" + threat, width, 3), "P"),
        numpy_helper.from_array(_weights("C" + threat, width, 4), "C"),
        cols,
    ]
    return _finish(helper.make_graph(nodes, "projector", [inp], outs, inits), meta)


def _finish(graph: onnx.GraphProto, meta: dict[str, str]) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    return m


def build_models_dir(
    out: Path,
    *,
    models: tuple[str, ...] = MODELS,
    threats: tuple[str, ...] = THREAT_MODELS,
    schema: str | None = None,
    accuracy: dict[str, float] = ACCURACY,
    bench: bool = True,
    ood: bool = True,
    ood_threshold: float = 3.0,
    ood_center: dict[str, list[float]] | None = None,
) -> Path:
    """A complete, verifiable models directory of tiny graphs (what `phasewatch export` writes)."""
    out.mkdir(parents=True, exist_ok=True)
    schema = schema or schema_hash()
    files: dict[str, bytes] = {}
    entries: list[ModelEntry] = []
    projectors: list[ProjectorEntry] = []
    rows: list[BenchRow] = []
    for threat in threats:
        idx = list(view_channels(threat))
        chans = [CHANNEL_NAMES[i] for i in idx]
        for name in models:
            kind = MODEL_INPUT[name]
            key = f"{name}-{threat}"
            acc = accuracy[name] - (0.0 if threat == "oracle" else 0.05)
            meta = {
                "schema_hash": schema,
                "model": name,
                "threat_model": threat,
                "input_kind": kind,
                "channels": json.dumps(chans),
                "classes": json.dumps(list(PHASES)),
            }
            files[f"{key}.onnx"] = _model(key, kind, idx, meta).SerializeToString()
            shape = list(input_shape(kind))  # every graph reads the full width
            entries.append(
                ModelEntry(
                    file=f"{key}.onnx",
                    model=name,
                    threat_model=threat,
                    input_kind=kind,
                    channels=chans,
                    input_shape=shape,
                    metrics=HeldoutMetrics(
                        accuracy=estimate(acc, acc - 0.02, acc + 0.02),
                        macro_f1=estimate(acc - 0.1),
                        n_windows=100,
                        n_episodes=10,
                    ),
                )
            )
            i = len(rows)
            rows.append(
                BenchRow(
                    model=name,
                    threat_model=threat,
                    file=f"{key}.onnx",
                    input_kind=kind,
                    ort_p50_us=100.0 + i,
                    ort_p99_us=300.0 + i,
                    ort_spread_us=1.0,
                    ort_floor_us=5.0,
                    bound="small ops",
                    accuracy=acc,
                    accuracy_source="manifest",
                )
            )
        meta = {"schema_hash": schema, "threat_model": threat, "channels": json.dumps(chans)}
        files[f"projector-{threat}.onnx"] = _projector(threat, idx, meta).SerializeToString()
        projectors.append(
            ProjectorEntry(
                file=f"projector-{threat}.onnx",
                threat_model=threat,
                channels=chans,
                input_shape=list(input_shape("summary")),
                n_clusters=4,
                fitted_on="test",
                n_fit=1,
            )
        )
    oods: list[OodEntry] = []
    for threat in threats if ood else ():
        chans = [CHANNEL_NAMES[i] for i in view_channels(threat)]
        det = OodDetector(
            threat_model=threat,
            channels=chans,
            stats=list(SUMMARY_STATS),
            center=(ood_center or {}).get(threat, [1.0] * (len(chans) * K)),  # signed-log units
            scale=[0.5] * (len(chans) * K),
            threshold=ood_threshold,
            quantile=0.95,
        )
        files[ood_file(threat)] = encode_doc(det)
        oods.append(OodEntry(file=ood_file(threat), threat_model=threat, threshold=ood_threshold))
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = Manifest(
        schema_hash=schema,
        created="2026-01-01T00:00:00Z",
        classes=list(PHASES),
        window_s=10,
        stride_s=5,
        rate_hz=10,
        opset=17,
        onnxruntime="1.17",
        files=[
            FileEntry(
                path=n,
                sha256=hashlib.sha256(d).hexdigest(),
                bytes=len(d),
                kind="projector" if n.startswith("projector") else "ood" if n.startswith("ood") else "model",
            )
            for n, d in files.items()
        ],
        models=entries,
        projectors=projectors,
        ood=oods,
        envelopes=[Envelope(name="cpu-saturate", curve=[0.0, 0.5, 1.0, 1.0], shape="one vCPU pegged")],
    )
    files[MANIFEST_FILE] = encode_doc(manifest)
    (out / MANIFEST_FILE).write_bytes(files[MANIFEST_FILE])
    (out / SUMS_FILE).write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    )
    if bench:
        machine = Machine("test", "x86_64", 1, None, 1.0, {}, "none", 5.0, [0.0, 0.0, 0.0])
        doc = BenchDoc(schema, "2026-01-01T00:00:00Z", machine, BenchMethod(1, 1, 1), rows)
        (out / BENCH_FILE).write_bytes(encode_doc(doc))
    return out


# --- helpers -------------------------------------------------------------------------------


def _streams(members: dict[str, bytes], sources=SOURCES):
    return {s: decode_rows(s, members[SOURCE_MEMBER[s]])[0] for s in sources if SOURCE_MEMBER[s] in members}


def _job(streams, w: int, eid: str = "ep-1", actual: str | None = "armed") -> WindowJob:
    from archive_kit import STARTED_NS

    return WindowJob("host-a", eid, w, STARTED_NS, streams, actual, 0.0)


@pytest.fixture(scope="module")
def modelset(tmp_path_factory: pytest.TempPathFactory):
    return load_models(build_models_dir(tmp_path_factory.mktemp("models")), schema_hash())


# --- tests ---------------------------------------------------------------------------------


def test_primary_is_the_best_realistic_model(modelset) -> None:
    p = pick_primary(modelset.models)
    assert (p.name, p.threat_model) == ("gru", "realistic")  # gru-oracle scores higher but sees the guest


def test_every_model_scores_what_its_graph_computes(modelset) -> None:
    streams = _streams(episode_members(duration_s=40, seed=2))
    engine = Engine(modelset)
    jobs = [_job(streams, w) for w in range(4)]
    scored = engine.score(jobs)
    for s in scored:
        win = extract_window(s.job.streams, s.job.t0_ns, s.job.w)
        summ = summarize(win.tensor)
        preds = {p.model: p for p in [e for e in s.events if isinstance(e, Prediction)] + s.others}
        assert len(preds) == N_GRAPHS and s.usable
        for m in modelset.models:
            chans = list(m.channels)
            x = (
                win.tensor[None, chans, :]
                if m.input_kind == "tensor"
                else summ.reshape(46, K)[None, chans, :].reshape(1, -1)
            )
            want = expected_probs(m.key, m.input_kind, x)[0]
            p = preds[m.key]
            assert p.predicted == PHASES[int(np.argmax(want))]
            assert p.confidence == pytest.approx(float(want.max()), rel=1e-4)
            assert (p.window_idx, p.window_no, p.actual, p.episode_id) == (
                s.job.w % 6,
                s.job.w,
                "armed",
                "ep-1",
            )
        primary = [e for e in s.events if isinstance(e, Prediction)]
        assert [p.model for p in primary] == ["gru-realistic"]
        (emb,) = [e for e in s.late if isinstance(e, Embedding)]
        assert 0 <= emb.x <= 1 and 0 <= emb.y <= 1 and emb.z is not None and emb.cluster in range(4)
        assert emb.predicted == primary[0].predicted and emb.phase == "armed"
        (ph,) = [e for e in s.events if isinstance(e, PhaseEvent)]
        assert ph.phase == "armed" and ph.episode_id == "ep-1"


def test_batched_scoring_equals_one_window_at_a_time(modelset) -> None:
    streams = _streams(episode_members(duration_s=40, seed=5))
    engine = Engine(modelset)
    together = engine.score([_job(streams, w) for w in range(5)])
    alone = [engine.score([_job(streams, w)])[0] for w in range(5)]
    for a, b in zip(together, alone):
        assert [msgspec.json.encode(e) for e in a.all_events] == [
            msgspec.json.encode(e) for e in b.all_events
        ]


def test_oracle_models_skip_a_window_without_the_guest_agent(modelset) -> None:
    streams = _streams(episode_members(duration_s=30, seed=1), sources=("proc", "qmp", "netflow"))
    (s,) = Engine(modelset).score([_job(streams, 1)])
    models = {p.model for p in [e for e in s.events if isinstance(e, Prediction)] + s.others}
    assert models == {f"{m}-realistic" for m in MODELS}


def test_unusable_window_gives_its_phase_and_an_unscored_cell(modelset) -> None:
    # issue 14 item 6: it used to give only its phase, and the window vanished from the deck
    streams = _streams(episode_members(duration_s=30, seed=1), sources=("guest",))  # no proc at all
    (s,) = Engine(modelset).score([_job(streams, 1, actual="clean")])
    assert not s.usable and s.others == []
    assert [type(e) for e in s.all_events] == [PhaseEvent, Prediction]
    cell = s.all_events[1]
    assert isinstance(cell, Prediction) and cell.predicted is None and cell.actual == "clean"
    assert cell.unscored == "no proc, no qmp, no netflow" and cell.window_no == 1


def test_startup_events_from_manifest_and_bench(modelset) -> None:
    events = startup_events(modelset)
    metrics = [e for e in events if isinstance(e, ModelMetric)]
    assert len(metrics) == N_GRAPHS
    # oracle first, realistic last: a deck keyed by model name keeps the realistic figure
    assert [m.threat_model for m in metrics[: len(MODELS)]] == ["oracle"] * len(MODELS)
    gru = [m for m in metrics if m.model == "gru"]
    assert gru[-1].threat_model == "realistic" and gru[-1].accuracy == pytest.approx(0.83)
    assert gru[-1].ci_low == pytest.approx(0.81) and gru[-1].ci_high == pytest.approx(0.85)
    perf = [e for e in events if isinstance(e, ModelPerf)]
    assert len(perf) == N_GRAPHS and perf[-1].threat_model == "realistic"
    assert {p.model for p in perf} == set(MODELS)
    assert any(e for e in events if type(e).__name__ == "AttackProfile")


def test_heldout_metrics_have_one_shape_and_clamp_the_interval() -> None:
    # what replaced the key-guessing metric_value: one Struct, CI bounds clamped to 0-1,
    # a bound that is not finite leaves the CI out
    assert estimate(0.9) == Estimate(0.9, None)
    assert estimate(0.9, 0.8, 1.2) == Estimate(0.9, (0.8, 1.0))
    assert estimate(0.7, 0.6, 0.75) == Estimate(0.7, (0.6, 0.75))
    assert estimate(0.5, float("nan"), 0.6).ci is None
    raw = msgspec.json.encode(estimate(0.9, 0.8, 1.0))
    assert msgspec.json.decode(raw, type=Estimate) == Estimate(0.9, (0.8, 1.0))


def test_a_manifest_with_another_metrics_layout_is_refused_naming_the_field(tmp_path: Path) -> None:
    out = build_models_dir(tmp_path / "m", bench=False)
    doc = json.loads((out / MANIFEST_FILE).read_text())
    doc["models"][3]["metrics"]["accuracy"] = 0.9  # the flat layout some exporters wrote
    (out / MANIFEST_FILE).write_text(json.dumps(doc))
    sums = {n: h for h, n in (line.split("  ") for line in (out / SUMS_FILE).read_text().splitlines())}
    sums[MANIFEST_FILE] = hashlib.sha256((out / MANIFEST_FILE).read_bytes()).hexdigest()
    (out / SUMS_FILE).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    with pytest.raises(ModelSetError, match=r"manifest\.json: .*\$\.models\[3\]\.metrics\.accuracy"):
        load_models(out, schema_hash())


def test_bench_json_that_does_not_decode_gives_no_points_and_names_the_field(
    modelset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = json.loads((modelset.directory / BENCH_FILE).read_text())
    doc["models"][0]["ort_p50_us"] = None
    (tmp_path / BENCH_FILE).write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="edge.infer"):
        events = startup_events(modelset, bench_file=tmp_path / BENCH_FILE)
    assert not [e for e in events if isinstance(e, ModelPerf)]
    assert "$.models[0].ort_p50_us" in caplog.text and str(tmp_path / BENCH_FILE) in caplog.text
    assert len([e for e in events if isinstance(e, ModelMetric)]) == N_GRAPHS  # the rest still goes out


def test_sticky_model_metric_keeps_both_threat_models_of_a_model(modelset) -> None:
    from edge.broadcast import Broadcaster

    b = Broadcaster()
    b.publish_many(startup_events(modelset))
    replay = [e for e in b.sticky_events() if isinstance(e, ModelMetric)]
    assert sorted((e.model, e.threat_model) for e in replay) == sorted(
        (m, t) for m in MODELS for t in THREAT_MODELS
    )
    # a deck keyed by model name alone ends on the realistic figure, as on the live stream
    last = {e.model: e for e in replay}
    assert all(e.threat_model == "realistic" for e in last.values())
    b.publish(ModelMetric(model="gru", accuracy=0.5, threat_model="oracle"))  # latest wins per pair
    again = [e for e in b.sticky_events() if isinstance(e, ModelMetric) and e.model == "gru"]
    assert [(e.threat_model, e.accuracy) for e in again][-1] == ("oracle", 0.5) and len(again) == 2


def test_predictions_carry_the_ood_score_and_move_the_drift_gauge(modelset) -> None:
    from edge.metrics import Metrics
    from schema.ood import FLAG_AT, ood_score

    assert sorted(modelset.ood) == sorted(THREAT_MODELS)
    streams = _streams(episode_members(duration_s=40, seed=3))
    metrics = Metrics()
    engine = Engine(modelset, metrics)
    scored = engine.score([_job(streams, w) for w in range(4)])
    flagged = 0
    for s in scored:
        summ = summarize(extract_window(s.job.streams, s.job.t0_ns, s.job.w).tensor)[None]
        for p in [e for e in s.events if isinstance(e, Prediction)] + s.others:
            if p.unscored is not None:  # no prediction, so no ood either
                assert p.ood is None
                continue
            threat = p.model.rsplit("-", 1)[1]
            want = float(ood_score(modelset.ood[threat], summ)[0])
            assert p.ood == pytest.approx(want, abs=1e-6) and 0 <= p.ood <= 1
        flagged += float(ood_score(modelset.ood["realistic"], summ)[0]) >= FLAG_AT
    # The drift gauge is the moving share of flagged windows; the counter counts them.
    body = metrics.render()
    assert 'phasewatch_ood_drift{threat_model="realistic"}' in body
    assert f'phasewatch_windows_ood_total{{threat_model="realistic"}} {flagged}' in body
    assert 0.0 <= engine.drift["realistic"] <= 1.0
    # the event round-trips with its ood on the wire
    p = next(e for e in scored[0].events if isinstance(e, Prediction) and e.ood is not None)
    assert (
        isinstance(p, Prediction)
        and msgspec.json.decode(msgspec.json.encode(p), type=Prediction).ood == p.ood
    )


def test_drift_gauge_follows_a_run_of_flagged_windows(tmp_path: Path) -> None:
    """A detector that flags everything drives the gauge towards 1 window by window."""
    from edge.metrics import Metrics

    d = build_models_dir(tmp_path / "m", ood_threshold=1e-6)  # every window is far beyond it
    ms = load_models(d, schema_hash())
    streams = _streams(episode_members(duration_s=40, seed=4))
    engine = Engine(ms, Metrics())
    engine.drift["realistic"] = 0.0
    engine.score([_job(streams, w) for w in range(3)])
    assert engine.drift["realistic"] == pytest.approx(1 - 0.99**3)


def test_a_bad_ood_file_refuses_the_set_naming_the_field(tmp_path: Path) -> None:
    d = build_models_dir(tmp_path / "m", ood_center={"oracle": [1.0] * (46 * K - 1)})
    with pytest.raises(ModelSetError, match=r"ood-oracle\.json: center/scale: expected 368 values"):
        load_models(d, schema_hash())


@pytest.mark.parametrize(
    ("run", "want"),
    [
        ("primary", set()),
        ("realistic", {f"{m}-realistic" for m in MODELS}),
        ("all", {f"{m}-{t}" for m in MODELS for t in ("realistic", "oracle")}),
    ],
)
def test_run_selects_the_models_scored(modelset, run: str, want: set[str]) -> None:
    streams = _streams(episode_members(duration_s=30, seed=2))
    engine = Engine(modelset, run=run)
    (s,) = engine.score([_job(streams, 1)])
    scored = {p.model for p in [e for e in s.events if isinstance(e, Prediction)] + s.others}
    assert scored - {engine.primary.key} == want - {engine.primary.key} and engine.primary.key in scored
    assert bool(s.late) == (run != "primary")  # the projector runs unless only the primary does
    with pytest.raises(ValueError, match="run must be one of"):
        Engine(modelset, run="some")


def test_a_set_loaded_for_its_run_scores_the_same_and_keeps_every_bar(tmp_path: Path, modelset) -> None:
    """load_models(run=...) opens only what Engine(run=...) scores: the same events, fewer sessions;
    the deck still gets every model's accuracy (oracle included) from the manifest."""
    small = load_models(build_models_dir(tmp_path / "m"), schema_hash(), run="realistic")
    assert {m.threat_model for m in small.models} == {"realistic"} and set(small.projectors) == {"realistic"}
    streams = _streams(episode_members(duration_s=30, seed=2))
    (a,) = Engine(modelset, run="realistic").score([_job(streams, 1)])
    (b,) = Engine(small, run="realistic").score([_job(streams, 1)])
    assert [msgspec.json.encode(e) for e in a.all_events] == [msgspec.json.encode(e) for e in b.all_events]
    metrics = [e for e in startup_events(small) if isinstance(e, ModelMetric)]
    assert {m.threat_model for m in metrics} == {"realistic", "oracle"}
    assert metrics == [e for e in startup_events(modelset) if isinstance(e, ModelMetric)]


def test_rest_of_several_ticks_merged_equals_each_tick_alone(modelset) -> None:
    """The daemon runs the non-primary models on several ticks' batches at once (Batch.merge)."""
    from edge.infer import Batch

    streams = _streams(episode_members(duration_s=40, seed=5))
    engine = Engine(modelset)
    ticks = [engine.score_primary([_job(streams, w) for w in ws]) for ws in ([0, 1], [2], [3, 4])]
    engine.score_rest(Batch.merge(ticks))
    merged = [s for b in ticks for s in b.scored]
    alone = [engine.score([_job(streams, w)])[0] for w in range(5)]
    assert len(merged) == 5
    for a, b in zip(merged, alone):
        assert [msgspec.json.encode(e) for e in a.all_events] == [
            msgspec.json.encode(e) for e in b.all_events
        ]
