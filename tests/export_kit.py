"""Build small training runs for the export and model-set tests.

`synthetic_windows` makes windows of infected and clean episodes whose profile's
signature channel rises while the payload runs; `make_run` writes a run directory the
way `phasewatch train` does (run.json, checkpoints, heldout-<threat>.npz, report.json)
with real small models from `trainer.models` (profile "demo"), or with `StandIn`
models (a log-linear softmax with its own ONNX graph) where a test needs to control
what the exported graph computes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from schema import extract
from schema.artifacts import (
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    REPORT_FILE,
    RUN_FILE,
    HeldoutMetrics,
    RunDoc,
    SplitDoc,
    encode_doc,
    estimate,
    heldout_file,
)
from schema.channels import CHANNEL_NAMES, N_CHANNELS, WINDOW_STEPS
from schema.hashing import schema_hash
from schema.vocab import MODEL_INPUT, PHASE_INDEX, PROFILES, THREAT_MODELS
from trainer.heldout import save_heldout

WINDOWS_PER_EPISODE = 16
SIGNAL = {
    "cpu-saturate": ["proc.utime_ticks", "qmp.vcpu_time_ns", "guest.cpu_user_pct"],
    "bursty-c2": ["netflow.bytes_out", "netflow.pkts_out"],
    "scan-and-dial": ["netflow.syn_out", "netflow.uniq_dst_ports"],
    "exfil-trickle": ["netflow.bytes_out", "guest.net_tx_bytes"],
    "disk-encrypt": ["qmp.blk_rd_bytes", "qmp.blk_wr_bytes", "proc.write_bytes"],
    "mem-inflate": ["proc.rss_kb", "guest.mem_used_kb"],
}


def _phase_of(w: int) -> int:
    if w < 4:
        return PHASE_INDEX["clean"]
    if w < 6:
        return PHASE_INDEX["armed"]
    if w < 8:
        return PHASE_INDEX["infecting"]
    return PHASE_INDEX["infected_running"] if (w - 8) % 4 < 3 else PHASE_INDEX["dormant"]


def synthetic_windows(
    episodes_per_profile: int = 2, clean_episodes: int = 2, seed: int = 0, hosts: Sequence[str] = ("h1", "h2")
) -> dict[str, np.ndarray]:
    """Arrays of a small corpus: tensor (N, 46, 100), summary, y, episode, host, profile, window."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("tensor", "y", "episode", "host", "profile", "window")}
    plan = [(p, i) for p in PROFILES for i in range(episodes_per_profile)] + [
        ("none", i) for i in range(clean_episodes)
    ]
    for n, (prof, i) in enumerate(plan):
        ep = f"ep-{prof}-{i}"
        host = hosts[n % len(hosts)]
        base = rng.lognormal(3.0, 1.5, size=N_CHANNELS)
        for w in range(WINDOWS_PER_EPISODE):
            y = _phase_of(w) if prof != "none" else PHASE_INDEX["clean"]
            x = base[:, None] * rng.lognormal(0.0, 0.3, size=(N_CHANNELS, WINDOW_STEPS))
            if prof != "none" and y in (PHASE_INDEX["infected_running"], PHASE_INDEX["infecting"]):
                for name in SIGNAL[prof]:
                    x[CHANNEL_NAMES.index(name)] *= 20.0 if y == PHASE_INDEX["infected_running"] else 4.0
            rows["tensor"].append(x.astype(np.float32))
            rows["y"].append(y)
            rows["episode"].append(ep)
            rows["host"].append(host)
            rows["profile"].append(prof)
            rows["window"].append(w)
    tensor = np.stack(rows["tensor"])
    return {
        "tensor": tensor,
        "summary": extract.summarize(tensor),
        "y": np.array(rows["y"], np.int64),
        "episode": np.array(rows["episode"]),
        "host": np.array(rows["host"]),
        "profile": np.array(rows["profile"]),
        "window": np.array(rows["window"], np.int32),
    }


# --- stand-in models --------------------------------------------------------------------------


def _slog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log(1.0 + np.abs(x))


class StandIn:
    """softmax(flatten(signed_log(x)) @ W): small, native in numpy, exported by hand.

    `onnx_skew` is added to class 0's weights in the exported graph only, to make parity fail on purpose.
    """

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        seed: int = 0,
        onnx_skew: float = 0.0,
        weights: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.input_kind = MODEL_INPUT[name]
        self.input_shape = tuple(input_shape)
        self.onnx_skew = onnx_skew
        f = int(np.prod(self.input_shape))
        self.w = (
            weights
            if weights is not None
            else (np.random.default_rng(seed).normal(0, 1.0 / np.sqrt(f), (f, 5)).astype(np.float32))
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = _slog(np.asarray(x, np.float32)).reshape(len(x), -1) @ self.w
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def to_onnx(self, path: Path | str, opset: int = 17) -> Path:
        w = self.w.copy()
        w[:, 0] += self.onnx_skew  # one class only: a skew of every logit alike would cancel in softmax
        inits = [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(w.astype(np.float32), "W"),
        ]
        nodes = [
            helper.make_node("Abs", [MODEL_INPUT_NAME], ["a"]),
            helper.make_node("Add", ["a", "one"], ["a1"]),
            helper.make_node("Log", ["a1"], ["l"]),
            helper.make_node("Sign", [MODEL_INPUT_NAME], ["s"]),
            helper.make_node("Mul", ["s", "l"], ["sl"]),
            helper.make_node("Flatten", ["sl"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [MODEL_OUTPUT_NAME], axis=-1),
        ]
        graph = helper.make_graph(
            nodes,
            self.name,
            [
                helper.make_tensor_value_info(
                    MODEL_INPUT_NAME, TensorProto.FLOAT, ["batch", *self.input_shape]
                )
            ],
            [helper.make_tensor_value_info(MODEL_OUTPUT_NAME, TensorProto.FLOAT, ["batch", 5])],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        # stamped with this onnx's IR version, as real exporters do; export lowers it
        model = helper.make_model(graph, opset_imports=opsets)
        path = Path(path)
        onnx.save(model, path)
        return path

    def save(self, directory: Path, *, schema_hash: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "w.npy", self.w)
        (directory / "model.json").write_text(
            json.dumps(
                {
                    "model": self.name,
                    "input_shape": list(self.input_shape),
                    "schema_hash": schema_hash,
                    "onnx_skew": self.onnx_skew,
                }
            )
        )
        return directory


def load_standin(directory: Path, expected_schema_hash: str) -> StandIn:
    doc = json.loads((Path(directory) / "model.json").read_text())
    if doc["schema_hash"] != expected_schema_hash:
        raise RuntimeError(f"{directory}: schema hash {doc['schema_hash']} != {expected_schema_hash}")
    return StandIn(
        doc["model"],
        tuple(doc["input_shape"]),
        onnx_skew=doc["onnx_skew"],
        weights=np.load(Path(directory) / "w.npy"),
    )


# --- the run directory -----------------------------------------------------------------------


def _split(arrays: dict[str, np.ndarray], held_host: str) -> tuple[np.ndarray, np.ndarray]:
    test = arrays["host"] == held_host
    return np.flatnonzero(~test), np.flatnonzero(test)


def make_run(
    run: Path,
    models: Sequence[str] = ("gbt", "mlp", "cnn"),
    threats: Sequence[str] = THREAT_MODELS,
    real: bool = False,
    seed: int = 0,
    onnx_skew: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Write a run directory; returns the corpus arrays it was made from (all full width)."""
    arrays = synthetic_windows(seed=seed)
    train, test = _split(arrays, "h2")
    sh = schema_hash()
    run.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"models": {}}
    metrics: dict[str, HeldoutMetrics] = {}
    for threat in threats:
        save_heldout(
            run / heldout_file(threat),
            **{k: v[test] for k, v in arrays.items()},
            sample=arrays["profile"][test],
            index=test,
        )
        for name in models:
            kind = MODEL_INPUT[name]
            x = extract.view(arrays[kind], threat, kind)
            shape = tuple(x.shape[1:])
            if real:
                from trainer.models import build_model

                # a couple of epochs / rounds: the model only has to exist and be exported, not be good
                fast = {"rounds": 8} if name == "gbt" else {"epochs": 2, "max_seconds": 10}
                model = build_model(name, shape, n_classes=5, profile="demo", seed=seed, **fast)
                tr, va = train[: len(train) // 2], train[len(train) // 2 :]
                model.fit(x[tr], arrays["y"][tr], x[va], arrays["y"][va])
            else:
                model = StandIn(
                    name, shape, seed=seed, onnx_skew=(onnx_skew or {}).get(f"{name}-{threat}", 0.0)
                )
            model.save(run / f"{name}-{threat}", schema_hash=sh)
            report["models"][f"{name}-{threat}"] = {
                "macro_f1": 0.5,
                "macro_f1_ci": [0.4, 0.6],
                "accuracy": 0.6,
                "n_windows": int(len(test)),
            }
            metrics[f"{name}-{threat}"] = HeldoutMetrics(
                accuracy=estimate(0.6),
                macro_f1=estimate(0.5, 0.4, 0.6),
                n_windows=int(len(test)),
                n_episodes=len(set(arrays["episode"][test])),
            )
    doc = RunDoc(
        schema_hash=sh,
        split=SplitDoc(kind="host", test_groups=["h2"]),
        profile="demo",
        seed=seed,
        models=[f"{m}-{t}" for t in threats for m in models],
        threat_models=list(threats),
        metrics=metrics,
    )
    (run / RUN_FILE).write_bytes(encode_doc(doc))
    (run / REPORT_FILE).write_text(json.dumps(report))
    return arrays


class Corpus:
    """The corner of `trainer.dataset.WindowSet` that export reads, from `synthetic_windows` arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.__dict__.update(arrays)

    def mask(self, threat_model: str) -> np.ndarray:
        return np.ones(len(self.y), bool)

    def view(self, threat_model: str, kind: str) -> np.ndarray:
        return extract.view(self.tensor if kind == "tensor" else self.summary, threat_model, kind)
