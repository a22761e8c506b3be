"""Inference on tailed windows: real ONNX Runtime sessions on tiny graphs built here.

``build_models_dir`` writes a complete models directory (12 graphs, 2 projectors,
manifest.json, SHA256SUMS, bench.json) from small ``onnx.helper`` graphs whose maths is
reproduced in numpy, so a test can check every number the engine publishes."""

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

from edge.infer import Engine, metric_value, pick_primary, startup_events
from edge.modelset import Envelope, FileEntry, Manifest, ModelEntry, ProjectorEntry, load_models
from edge.tail import WindowJob
from schema.channels import CHANNEL_NAMES, SUMMARY_STATS, WINDOW_STEPS, view_channels
from schema.events import Embedding, ModelMetric, ModelPerf, PhaseEvent, Prediction
from schema.extract import extract_window, summarize
from schema.hashing import schema_hash
from schema.reader import decode_rows
from schema.vocab import MODEL_INPUT, MODELS, PHASES, SOURCE_MEMBER, SOURCES, THREAT_MODELS

K = len(SUMMARY_STATS)
ACCURACY = {"gbt": 0.81, "mlp": 0.78, "cnn": 0.84, "gru": 0.88, "lstm": 0.86, "transformer": 0.83}


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


def _model(key: str, kind: str, n_ch: int, meta: dict[str, str]) -> onnx.ModelProto:
    width = n_ch * K
    if kind == "tensor":
        inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_ch, WINDOW_STEPS])
        nodes = [helper.make_node("ReduceMean", ["features"], ["m"], axes=[2], keepdims=0)]
        w = _weights(key, n_ch, len(PHASES))
        src = "m"
    else:
        inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])
        nodes = []
        w = _weights(key, width, len(PHASES))
        src = "features"
    nodes += [
        helper.make_node("MatMul", [src, "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(PHASES)])
    graph = helper.make_graph(nodes, key, [inp], [out], [numpy_helper.from_array(w, "W")])
    return _finish(graph, meta)


def _projector(threat: str, n_ch: int, meta: dict[str, str]) -> onnx.ModelProto:
    width = n_ch * K
    inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])
    nodes = [
        helper.make_node("MatMul", ["features", "P"], ["p"]),
        helper.make_node("Sigmoid", ["p"], ["xyz"]),
        helper.make_node("MatMul", ["features", "C"], ["c"]),
        helper.make_node("ArgMax", ["c"], ["cluster"], axis=1, keepdims=0),
    ]
    outs = [
        helper.make_tensor_value_info("xyz", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("cluster", TensorProto.INT64, ["N"]),
    ]
    inits = [
        numpy_helper.from_array(_weights("P" + threat, width, 3), "P"),
        numpy_helper.from_array(_weights("C" + threat, width, 4), "C"),
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
) -> Path:
    """A complete, verifiable models directory of tiny graphs (what `phasewatch export` writes)."""
    out.mkdir(parents=True, exist_ok=True)
    schema = schema or schema_hash()
    files: dict[str, bytes] = {}
    entries: list[ModelEntry] = []
    projectors: list[ProjectorEntry] = []
    for threat in threats:
        chans = [CHANNEL_NAMES[i] for i in view_channels(threat)]
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
            files[f"{key}.onnx"] = _model(key, kind, len(chans), meta).SerializeToString()
            shape = [len(chans), WINDOW_STEPS] if kind == "tensor" else [len(chans) * K]
            entries.append(
                ModelEntry(
                    file=f"{key}.onnx",
                    model=name,
                    threat_model=threat,
                    input_kind=kind,
                    channels=chans,
                    input_shape=shape,
                    metrics={"accuracy": {"value": acc, "ci": [acc - 0.02, acc + 0.02]}},
                )
            )
        meta = {"schema_hash": schema, "threat_model": threat, "channels": json.dumps(chans)}
        files[f"projector-{threat}.onnx"] = _projector(threat, len(chans), meta).SerializeToString()
        projectors.append(
            ProjectorEntry(
                file=f"projector-{threat}.onnx",
                threat_model=threat,
                channels=chans,
                input_shape=[len(chans) * K],
                n_clusters=4,
                fitted_on="test",
                n_fit=1,
            )
        )
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
                kind="projector" if n.startswith("projector") else "model",
            )
            for n, d in files.items()
        ],
        models=entries,
        projectors=projectors,
        envelopes=[Envelope(name="cpu-saturate", curve=[0.0, 0.5, 1.0, 1.0], shape="one vCPU pegged")],
    )
    files["manifest.json"] = msgspec.json.encode(manifest)
    (out / "manifest.json").write_bytes(files["manifest.json"])
    (out / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    )
    if bench:
        rows = [
            {"model": m, "threat_model": t, "latency_us": 100.0 + i, "p99_us": 300.0 + i}
            for i, (m, t) in enumerate((m, t) for t in threats for m in models)
        ]
        (out / "bench.json").write_text(json.dumps({"models": rows}))
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
        assert len(preds) == 12 and s.usable
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


def test_unusable_window_gives_only_its_phase(modelset) -> None:
    streams = _streams(episode_members(duration_s=30, seed=1), sources=("guest",))  # no proc at all
    (s,) = Engine(modelset).score([_job(streams, 1, actual="clean")])
    assert not s.usable and s.others == []
    assert [type(e) for e in s.all_events] == [PhaseEvent]


def test_startup_events_from_manifest_and_bench(modelset) -> None:
    events = startup_events(modelset)
    metrics = [e for e in events if isinstance(e, ModelMetric)]
    assert len(metrics) == 12
    # oracle first, realistic last: a deck keyed by model name keeps the realistic figure
    assert [m.threat_model for m in metrics[:6]] == ["oracle"] * 6
    gru = [m for m in metrics if m.model == "gru"]
    assert gru[-1].threat_model == "realistic" and gru[-1].accuracy == pytest.approx(0.83)
    assert gru[-1].ci_low == pytest.approx(0.81) and gru[-1].ci_high == pytest.approx(0.85)
    perf = [e for e in events if isinstance(e, ModelPerf)]
    assert len(perf) == 12 and perf[-1].threat_model == "realistic"
    assert {p.model for p in perf} == set(MODELS)
    assert any(e for e in events if type(e).__name__ == "AttackProfile")


def test_metric_value_accepts_the_layouts_exporters_write() -> None:
    assert metric_value({"accuracy": 0.9}) == (0.9, None, None)
    assert metric_value({"accuracy": 0.9, "accuracy_ci": [0.8, 1.2]}) == (0.9, 0.8, 1.0)
    assert metric_value({"accuracy": {"mean": 0.7, "ci_low": 0.6, "ci_high": 0.75}}) == (0.7, 0.6, 0.75)
    assert metric_value({"macro_f1": 0.5}) == (0.5, None, None)
    assert metric_value({"accuracy": float("nan")}) is None
    assert metric_value({}) is None
