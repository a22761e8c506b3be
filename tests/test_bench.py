"""`phasewatch bench` on a tiny real models directory: small trained models exported by
`trainer.export`, a two-archive store, a real HTTP endpoint for --publish."""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import msgspec
import numpy as np
import pytest
from archive_kit import episode_members, make_store
from export_kit import Corpus, make_run

from schema.artifacts import BenchDoc
from schema.events import ModelPerf, decode_events
from trainer import bench
from trainer.export import export_run
from trainer.flops import peak_gflops, rnn_flops, torch_flops, xgb_comparisons

MODELS = ("gbt", "mlp", "gru", "lstm", "rocket")
FAST = ["--repeats", "2", "--calls", "15", "--warmup", "3", "--episodes", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    run, models, store = root / "run", root / "models", root / "store"
    arrays = make_run(run, models=MODELS, threats=("realistic",), real=True)
    export_run(run, models, progress=False, windows=Corpus(arrays))
    make_store(store, {f"ep-{i}": episode_members(f"ep-{i}", duration_s=40, seed=i) for i in range(2)})
    return {"run": run, "models": models, "store": store}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_bench_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def doc(tiny: dict[str, Path]) -> dict:
    # no --run: the run is found through manifest.json, as `make bench` finds it
    rc = bench.cli_bench(_args(["--models", str(tiny["models"]), "--store", str(tiny["store"]), *FAST]))
    assert rc == 0
    return json.loads((tiny["models"] / bench.BENCH_FILE).read_text())


def _typed(doc: dict) -> BenchDoc:
    return msgspec.convert(doc, BenchDoc)


def test_bench_json_decodes_with_its_struct_and_a_wrong_field_is_refused(
    doc: dict, tiny: dict[str, Path], tmp_path: Path
) -> None:
    from schema.artifacts import ArtifactError, read_doc

    typed = read_doc(tiny["models"] / bench.BENCH_FILE, BenchDoc)
    assert [r.model for r in typed.models] == [r["model"] for r in doc["models"]]
    assert typed.machine.peak_gflops == doc["machine"]["peak_gflops"] > 0
    bad = json.loads(json.dumps(doc))
    bad["models"][1]["ort_p50_us"] = "fast"
    (tmp_path / "bench.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"bench\.json.*\$\.models\[1\]\.ort_p50_us"):
        read_doc(tmp_path / "bench.json", BenchDoc)


def test_bench_json_has_every_model_with_sane_numbers(doc: dict, tiny: dict[str, Path]) -> None:
    assert sorted(r["model"] for r in doc["models"]) == sorted(MODELS)
    assert doc["run"] == str(tiny["run"])
    for r in doc["models"]:
        assert r["threat_model"] == "realistic" and (tiny["models"] / r["file"]).is_file()
        assert 0 < r["ort_p50_us"] <= r["ort_p99_us"]
        assert 0 < r["native_p50_us"] <= r["native_p99_us"]
        assert r["ort_spread_us"] >= 0 and r["ratio"] == pytest.approx(r["ort_p50_us"] / r["native_p50_us"])
        assert r["native"] == ("xgboost" if r["model"] == "gbt" else "torch")
        assert r["flops"] > 0 and r["achieved_gflops"] > 0
        assert r["work_unit"] == ("comparison" if r["model"] == "gbt" else "flop")
        if r["work_unit"] == "flop":
            assert (
                0 < r["share_of_peak"] == pytest.approx(r["achieved_gflops"] / doc["machine"]["peak_gflops"])
            )
        assert r["accuracy_source"] == "heldout" and r["heldout_windows"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["bound"]
    assert doc["machine"]["peak_gflops"] > 0 and doc["machine"]["ort_floor_us"] > 0
    # the whole path runs every model plus extraction, so it costs more than any one part
    assert doc["path_us"] > doc["extractor_us"] > 0
    assert doc["path_us"] > max(r["ort_p50_us"] for r in doc["models"])
    assert doc["reader_rows_per_s"] > 0 and doc["extractor"]["episodes"] == 2


def test_lstm_flops_are_counted_like_gru(doc: dict) -> None:
    # FlopCounterMode sees no LSTM op; the analytic count must make it 4/3 of the GRU's
    # recurrent work (same shapes, 4 gates instead of 3), not zero.
    by = {r["model"]: r["flops"] for r in doc["models"]}
    assert by["lstm"] > by["gru"] > 0


def test_where_time_goes_comes_from_the_ort_profile(doc: dict) -> None:
    by = {r["model"]: r for r in doc["models"]}
    for r in doc["models"]:
        assert 0 < r["kernel_share"] <= 1 and r["nodes"] >= 1 and r["top_ops"]
        assert "kernels" in r["bound"]
    assert by["gbt"]["top_ops"][0][0].startswith("TreeEnsemble") and by["gbt"]["bound"].startswith(
        "tree walks"
    )
    assert any(op == "LSTM" for op, _ in by["lstm"]["top_ops"])


def test_heldout_accuracy_is_the_graphs_own(doc: dict, tiny: dict[str, Path]) -> None:
    import onnxruntime as ort

    held = np.load(tiny["run"] / "heldout-realistic.npz")
    row = next(r for r in doc["models"] if r["model"] == "mlp")
    from schema import extract
    from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME

    # the graph reads the full-width summary and gathers its own channels
    x = held["summary"]
    assert x.shape[1] == 46 * 8 and extract.view(x, "realistic", "summary").shape[1] == 30 * 8
    s = ort.InferenceSession(str(tiny["models"] / row["file"]), providers=["CPUExecutionProvider"])
    pred = s.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: x})[0].argmax(1)
    assert row["accuracy"] == pytest.approx(float((pred == held["y"]).mean()))


def test_png_is_written(doc: dict, tiny: dict[str, Path]) -> None:
    png = (tiny["models"] / bench.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_table_names_every_model_and_the_path(doc: dict) -> None:
    table = bench.format_table(_typed(doc))
    lines = table.splitlines()
    assert lines[0].startswith("| model | threat | ORT p50 µs")
    for m in MODELS:
        assert any(line.startswith(f"| {m} | realistic |") for line in lines)
    assert "extractor" in table and "whole per-window path" in table and "rows/s" in table


class _Sink(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        n = int(self.headers["Content-Length"])
        _Sink.bodies.append(self.rfile.read(n))
        body = b'{"delivered": 1}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Sink.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_publish_posts_one_model_perf_per_model(doc: dict, endpoint: str) -> None:
    assert bench.publish(_typed(doc), endpoint) == len(MODELS)
    assert len(_Sink.bodies) == 1
    events = decode_events(_Sink.bodies[0])
    assert all(isinstance(e, ModelPerf) for e in events)
    by = {e.model: e for e in events}
    assert sorted(by) == sorted(MODELS)
    for r in doc["models"]:
        e = by[r["model"]]
        assert e.latency_us == pytest.approx(r["ort_p50_us"]) and e.p99_us == pytest.approx(r["ort_p99_us"])
        assert e.accuracy == pytest.approx(r["accuracy"]) and e.threat_model == "realistic"


def test_the_daemon_reads_bench_json_into_one_point_per_model(
    doc: dict, tiny: dict[str, Path], tmp_path: Path
) -> None:
    from edge.infer import startup_events
    from edge.modelset import load_models

    (tmp_path / "bench.json").write_text(json.dumps(doc))  # this document, whatever later tests rewrite
    events = startup_events(load_models(tiny["models"]), bench_file=tmp_path / "bench.json")
    perf = [e for e in events if isinstance(e, ModelPerf)]
    assert sorted(e.model for e in perf) == sorted(MODELS)
    by = {r["model"]: r for r in doc["models"]}
    for e in perf:
        assert e.latency_us == pytest.approx(by[e.model]["ort_p50_us"]) and e.threat_model == "realistic"


def test_publish_to_a_dead_daemon_fails_after_writing(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc = bench.cli_bench(
        _args(
            [
                "--models",
                str(tiny["models"]),
                "--store",
                str(tiny["store"]),
                "--only",
                "gbt",
                "--no-plot",
                "--publish",
                dead,
                *FAST,
            ]
        )
    )
    assert rc == 1 and "publish failed" in capsys.readouterr().err
    assert [r["model"] for r in json.loads((tiny["models"] / bench.BENCH_FILE).read_text())["models"]] == [
        "gbt"
    ]


def test_pin_sets_the_affinity_and_is_recorded(tiny: dict[str, Path]) -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    try:
        got = bench.run_bench(
            tiny["models"],
            store=None,
            only=["mlp"],
            pin=core,
            plot=False,
            method=bench.Method(warmup=2, repeats=2, calls=10),
            progress=lambda _: None,
        )
        assert os.sched_getaffinity(0) == {core}
        assert got.machine.pinned == core
        assert got.extractor_us is None and any("no readable archives" in n for n in got.notes)
    finally:
        os.sched_setaffinity(0, before)
    try:
        assert bench.pin_to_core(-1) == max(before) and os.sched_getaffinity(0) == {max(before)}
    finally:
        os.sched_setaffinity(0, before)
    with pytest.raises(bench.BenchError, match="--pin 4096"):
        bench.pin_to_core(4096)


def test_without_the_run_it_benches_ort_alone_and_says_so(tiny: dict[str, Path], tmp_path: Path) -> None:
    got = bench.run_bench(
        tiny["models"],
        run=tmp_path / "gone",
        store=tiny["store"],
        episodes=1,
        only=["gru"],
        plot=False,
        method=bench.Method(warmup=2, repeats=2, calls=10),
        progress=lambda _: None,
    )
    (r,) = got.models
    assert r.native is None and r.native_p50_us is None and r.ratio is None
    assert r.ort_p50_us > 0 and r.accuracy_source == "manifest" and r.accuracy == pytest.approx(0.6)
    assert any("no run directory" in n for n in got.notes)
    assert "— (no checkpoint)" in bench.format_table(got)


def test_only_that_matches_nothing_is_refused(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = bench.cli_bench(_args(["--models", str(tiny["models"]), "--only", "cnn", *FAST]))
    assert rc == 2 and "--only cnn" in capsys.readouterr().err


def test_timing_statistics() -> None:
    ns = [np.array([1000] * 98 + [50_000, 90_000]), np.array([3000] * 100)]
    t = bench.Timing.of(ns)
    assert t.p50_us == pytest.approx(2.0) and t.spread_us == pytest.approx(2.0)
    assert t.p99_us >= t.p50_us and t.calls == 200
    calls: list[int] = []
    got = bench.measure({"f": calls.append}, bench.Method(warmup=3, repeats=2, calls=5))
    assert len(calls) == 3 + 2 * 5 and got["f"].calls == 10


def test_flop_counts_and_peak_probe() -> None:
    import torch
    from torch import nn

    gru = nn.GRU(30, 64, batch_first=True)
    assert rnn_flops(gru, 50) == 2 * 3 * (30 + 64) * 64 * 50
    # the counter's own GRU count agrees with the formula; the LSTM one has 4 gates
    assert torch_flops(gru, torch.zeros(1, 50, 30)) == rnn_flops(gru, 50)
    assert (
        torch_flops(nn.LSTM(30, 64, batch_first=True), torch.zeros(1, 50, 30)) == 2 * 4 * (30 + 64) * 64 * 50
    )
    assert torch_flops(nn.Linear(100, 10), torch.zeros(1, 100)) == 2 * 100 * 10
    probe = peak_gflops(sizes=(64, 128), min_seconds=0.01, rounds=1)
    assert probe.gflops > 0 and probe.gflops == max(probe.by_size.values())


def test_tree_comparisons_follow_the_depth() -> None:
    import xgboost as xgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    shallow = xgb.train(
        {"max_depth": 1, "objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, label=y), 5
    )
    work = xgb_comparisons(shallow)
    assert work.trees == 5 and work.comparisons == pytest.approx(5.0) and work.max_depth == 1
    deep = xgb.train(
        {"max_depth": 4, "objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, label=y), 5
    )
    assert 5.0 < xgb_comparisons(deep).comparisons <= 20.0
