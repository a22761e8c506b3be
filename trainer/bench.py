"""`phasewatch bench`: what one window costs on the edge, per model, and how far that is from the core's limit.

    phasewatch bench --models models [--run runs/latest] [--store data/store] [--pin [CORE]] [--publish URL]

Every model of the directory is opened exactly as the daemon opens it
(:func:`edge.modelset.load_models`: SHA256SUMS, schema hash, one ORT session with one
intra-op thread, sequential, no spinning) and timed at batch 1 on real held-out windows,
side by side with its native twin from the run directory (torch in eval mode with one
thread under ``inference_mode``; XGBoost ``inplace_predict`` with ``nthread=1``). The
two are timed interleaved, repeat by repeat, so drift on this shared machine hits both
alike. Each call is timed alone with ``time.perf_counter_ns`` with the garbage collector
off; p50 and p99 are taken per repeat, the reported figure is the median over repeats,
and the spread is max - min of the repeat p50s.

The same run measures the extractor per window (``extract_window`` + ``summarize``), the
whole per-window path (extract + summarize + every model + the knn projector the daemon
runs), the reader's telemetry rows per second, this core's float32 GEMM peak and the
floor cost of one ``session.run`` (an Identity graph): together they say where a model's
time goes. ``--pin`` puts the calling thread on one core (all work runs on it: one ORT
thread, one torch thread, one XGBoost thread) to stand in for one core of a Pi.

``bench.json`` (written into the models directory; the daemon turns its rows into
``model_perf`` events at start)::

    {
      "format": 1,
      "schema_hash": str, "created": "YYYY-MM-DDTHH:MM:SSZ",
      "machine": {"cpu": str, "arch": str, "cores": int, "pinned": int | null,
                  "peak_gflops": float, "peak_by_size": {"<n>": float}, "blas": str,
                  "ort_floor_us": float, "loadavg": [float, float, float],
                  "onnxruntime": str, "torch": str | null, "xgboost": str | null},
      "method": {"batch": 1, "warmup": int, "repeats": int, "calls": int,
                 "spread": "max-min of repeat p50s"},
      "run": str | null,                    # where the native models came from
      "models": [{
          "model": str, "threat_model": str, "file": str, "input_kind": str,
          "ort_p50_us": float, "ort_p99_us": float, "ort_spread_us": float,
          "latency_us": float, "p99_us": float,      # = ort_p50_us / ort_p99_us, model_perf's names
          "native": "torch" | "xgboost" | null,      # null: no checkpoint, ORT only
          "native_p50_us": float | null, "native_p99_us": float | null,
          "native_spread_us": float | null,
          "ratio": float | null,            # ort_p50_us / native_p50_us (< 1: ORT is faster)
          "flops": float | null,            # per window; for gbt: comparisons (see work_unit)
          "work_unit": "flop" | "comparison" | null,
          "achieved_gflops": float | null,  # flops / ort_p50 (G comparisons/s for gbt)
          "share_of_peak": float | null,    # achieved / machine.peak_gflops (FLOPs only)
          "bound": str,                     # where the time goes, in words
          "kernel_share": float | null,      # ORT profiler: share of run time inside node kernels
          "top_ops": [[op_type, share]],    # ORT profiler: the op types that take the most time
          "ort_floor_us": float,            # session.run of an Identity graph of the same input
          "accuracy": float | null, "macro_f1": float | null,
          "accuracy_source": "heldout" | "manifest" | null, "heldout_windows": int
      }],
      "extractor_us": float | null,         # p50 per window; details in "extractor"
      "path_us": float | null,              # p50 per window; details in "path"
      "reader_rows_per_s": float | null,    # median over repeats; details in "reader"
      "extractor": {...} | null, "path": {...} | null, "reader": {...} | null,
      "notes": [str]
    }

``model_perf`` events (``--publish``): the deck draws one point per ``model`` name, so
only the deployable ``realistic`` models are published, named plainly (``gru``), with
``threat_model`` set; a directory with no realistic model publishes its oracle ones.
``latency_us`` is the ORT p50 (what the Pi pays), ``p99_us`` the ORT p99.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.modelset import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME, LoadedModel, ModelSet, load_models
from schema.channels import N_CHANNELS, SUMMARY_STATS, WINDOW_STEPS
from schema.hashing import schema_hash as current_schema_hash

BENCH_FILE = "bench.json"
PLOT_FILE = "bench.png"
BENCH_FORMAT = 1
_K = len(SUMMARY_STATS)
_DISTINCT_INPUTS = 256  # held-out windows cycled through at batch 1
_ACC_BATCH = 256  # accuracy is measured in batches: it is not a latency figure


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message names the file or option."""


# --- timing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    warmup: int = 20
    repeats: int = 5
    calls: int = 200


@dataclass(frozen=True)
class Timing:
    p50_us: float  # median over repeats of each repeat's p50
    p99_us: float  # median over repeats of each repeat's p99
    spread_us: float  # max - min of the repeat p50s
    repeat_p50_us: list[float]
    calls: int  # timed calls in all

    @classmethod
    def of(cls, repeats: Sequence[np.ndarray]) -> Timing:
        p50 = [float(np.percentile(r, 50)) / 1e3 for r in repeats]
        p99 = [float(np.percentile(r, 99)) / 1e3 for r in repeats]
        return cls(
            p50_us=float(np.median(p50)),
            p99_us=float(np.median(p99)),
            spread_us=max(p50) - min(p50),
            repeat_p50_us=[round(v, 3) for v in p50],
            calls=int(sum(len(r) for r in repeats)),
        )


def _time_calls(fn: Callable[[int], object], calls: int) -> np.ndarray:
    out = np.empty(calls, np.int64)
    clock = time.perf_counter_ns
    for i in range(calls):
        t = clock()
        fn(i)
        out[i] = clock() - t
    return out


def measure(fns: Mapping[str, Callable[[int], object]], method: Method) -> dict[str, Timing]:
    """Time each ``fn(i)`` (i = call number) per call; the functions take turns, repeat by repeat."""
    if method.repeats < 1 or method.calls < 1 or method.warmup < 0:
        raise BenchError(f"repeats and calls must be >= 1 and warmup >= 0, got {method}")
    for fn in fns.values():
        for i in range(method.warmup):
            fn(i)
    samples: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one call is noise, not the model's cost
    try:
        for _ in range(method.repeats):
            for k, fn in fns.items():
                samples[k].append(_time_calls(fn, method.calls))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: Timing.of(v) for k, v in samples.items()}


# --- the machine -----------------------------------------------------------------------------


def pin_to_core(core: int) -> int:
    """Run this thread on one core (a negative core: the last one this process may use). -> the core."""
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if core < 0 else core
    if core not in allowed:
        raise BenchError(
            f"--pin {core}: not one of the cores this process may use ({', '.join(map(str, allowed))})"
        )
    os.sched_setaffinity(0, {core})
    return core


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware", "cpu model"):  # x86, Raspberry Pi, other ARM
        for line in text.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def ort_floor_us(shape: tuple[int, ...], method: Method) -> float:
    """p50 of ``session.run`` on an Identity graph: the fixed cost every model pays per call."""
    import onnx
    from onnx import TensorProto, helper

    from edge.modelset import open_session  # the daemon's own session options, not a copy of them

    graph = helper.make_graph(
        [helper.make_node("Identity", [MODEL_INPUT_NAME], [MODEL_OUTPUT_NAME])],
        "floor",
        [helper.make_tensor_value_info(MODEL_INPUT_NAME, TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info(MODEL_OUTPUT_NAME, TensorProto.FLOAT, ["batch", *shape])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.onnx"
        onnx.save(proto, str(path))
        session = open_session(path, 1)
    x = np.zeros((1, *shape), np.float32)
    return measure({"floor": lambda i: session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: x})}, method)[
        "floor"
    ].p50_us


@dataclass(frozen=True)
class OpProfile:
    kernel_share: float  # share of session.run time spent inside node kernels
    top_ops: list[tuple[str, float]]  # op type -> share of session.run time, largest first
    nodes: int  # nodes run per call


def ort_profile(path: Path, xs: Sequence[np.ndarray], calls: int) -> OpProfile:
    """Where a graph's time goes, from ONNX Runtime's own profiler (a separate session with
    the daemon's options plus profiling, so the timed session is never slowed by it)."""
    import onnxruntime as ort

    from edge.modelset import session_options

    opts = session_options(1)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        for i in range(calls):
            session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: xs[i % len(xs)]})
        events = json.loads(Path(session.end_profiling()).read_text())
    # Medians per node over calls, not sums: one preempted call must not name the wrong op.
    runs = [e.get("dur", 0) for e in events if e.get("name") == "model_run"]
    per_node: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            per_node.setdefault(name, (e.get("args", {}).get("op_name", "?"), []))[1].append(e.get("dur", 0))
    run_us = float(np.median(runs)) if runs else 0.0
    if run_us <= 0:
        return OpProfile(0.0, [], len(per_node))
    by_op: dict[str, float] = {}
    for op, durs in per_node.values():
        by_op[op] = by_op.get(op, 0.0) + float(np.median(durs))
    top = sorted(((op, us / run_us) for op, us in by_op.items()), key=lambda t: -t[1])
    return OpProfile(min(1.0, sum(by_op.values()) / run_us), top[:3], len(per_node))


# --- inputs: held-out windows ----------------------------------------------------------------


def _slice(full: np.ndarray, m: LoadedModel) -> np.ndarray:
    """Full 46-channel windows (N, 46, T) / (N, 46*k) -> the channels this graph reads."""
    if m.input_kind == "tensor":
        return full[:, list(m.channels), :]
    return full.reshape(len(full), N_CHANNELS, _K)[:, list(m.channels), :].reshape(len(full), -1)


def model_inputs(x: np.ndarray, m: LoadedModel, where: Path | str) -> np.ndarray:
    """A batch of windows as this graph reads them; accepts the graph's view or full width."""
    x = np.asarray(x, np.float32)
    c = len(m.channels)
    view = (c, WINDOW_STEPS) if m.input_kind == "tensor" else (c * _K,)
    full = (N_CHANNELS, WINDOW_STEPS) if m.input_kind == "tensor" else (N_CHANNELS * _K,)
    if tuple(x.shape[1:]) == view:
        return np.ascontiguousarray(x)
    if tuple(x.shape[1:]) == full:
        return np.ascontiguousarray(_slice(x, m))
    raise BenchError(
        f"{where}: {m.input_kind} windows are {tuple(x.shape[1:])}, {m.key} reads {view} (or the full {full})"
    )


@dataclass
class Heldout:
    path: Path
    arrays: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> Heldout | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in ("tensor", "summary", "y")}
        except (ValueError, OSError) as e:
            raise BenchError(f"{path}: unreadable npz ({e})") from None
        if "y" not in arrays:
            raise BenchError(f"{path}: no array 'y' (has {sorted(arrays)})")
        return cls(path, arrays)

    def windows(self, m: LoadedModel) -> tuple[np.ndarray, np.ndarray] | None:
        """(inputs, labels) of the labelled held-out windows for this graph."""
        x = self.arrays.get(m.input_kind)
        if x is None:
            return None
        y = np.asarray(self.arrays["y"]).astype(np.int64)
        if len(y) != len(x):
            raise BenchError(f"{self.path}: {len(x)} {m.input_kind} windows but {len(y)} labels")
        keep = y >= 0
        return model_inputs(x[keep], m, self.path), y[keep]


def heldout_accuracy(m: LoadedModel, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro F1) of the exported graph itself on the held-out windows."""
    from trainer.evaluate import macro_f1

    probs = np.concatenate(
        [
            m.session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: x[i : i + _ACC_BATCH]})[0]
            for i in range(0, len(x), _ACC_BATCH)
        ]
    )
    pred = probs.argmax(axis=1)
    return float((pred == y).mean()), float(macro_f1(y, pred))


def _manifest_metric(m: LoadedModel, names: tuple[str, ...]) -> float | None:
    from edge.infer import metric_value

    got = metric_value(m.metrics, names)
    return None if got is None else got[0]


# --- native twins ----------------------------------------------------------------------------


@dataclass
class Native:
    kind: str  # "torch" | "xgboost"
    call: Callable[[np.ndarray], Any]  # one (1, ...) window -> probabilities
    work: float  # FLOPs (torch) or comparisons (xgboost) per window
    unit: str  # "flop" | "comparison"
    detail: str = ""


def native_of(model: Any, input_shape: tuple[int, ...]) -> Native:
    """The timed native call of a trained ``trainer.models`` model, one thread."""
    booster = getattr(model, "booster", None)
    if booster is not None:
        from trainer.flops import xgb_comparisons

        booster.set_param({"nthread": 1})
        work = xgb_comparisons(booster)
        return Native(
            "xgboost",
            lambda x: booster.inplace_predict(x),
            work.comparisons,
            "comparison",
            f"{work.trees} trees, mean path {work.mean_depth:.1f}",
        )
    net = getattr(model, "net", None)
    if net is not None:
        import torch

        from trainer.flops import torch_flops
        from trainer.models.torch_base import WithSoftmax

        wrapped = WithSoftmax(net).eval()  # the exported graph ends in softmax too
        flops = torch_flops(wrapped, torch.zeros((1, *input_shape), dtype=torch.float32))
        return Native("torch", lambda x: wrapped(torch.from_numpy(x)), float(flops), "flop")
    raise BenchError(f"{type(model).__name__}: neither a booster nor a torch net to time")


def resolve_run(models_dir: Path, modelset: ModelSet, run: Path | None) -> Path:
    """--run, else the run the manifest names (as given or beside the models dir), else runs/latest."""
    if run is not None:
        return run
    named = modelset.manifest.run.get("path")
    if isinstance(named, str) and named:
        for cand in (Path(named), models_dir.parent / named):
            if cand.is_dir():
                return cand
    return Path("runs/latest")


def load_native(run: Path, m: LoadedModel, schema: str) -> tuple[Native | None, str]:
    """(native twin or None, why not)."""
    ckpt = run / m.key
    if not (ckpt / "model.json").is_file():
        return None, f"{m.key}: no native checkpoint at {ckpt}"
    try:
        from trainer.models import load_model

        model = load_model(ckpt, expected_schema_hash=schema)
        return native_of(model, tuple(model.input_shape)), ""
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        return None, f"{m.key}: native checkpoint {ckpt} unusable: {e}"


# --- one model -------------------------------------------------------------------------------


def _bound(unit: str | None, share: float | None, prof: OpProfile | None, p50: float, floor: float) -> str:
    """Where one call's time goes, in words: a verdict, then ORT's profile behind it."""
    ops = ""
    if prof is not None and prof.top_ops:
        top = ", ".join(f"{op} {v:.0%}" for op, v in prof.top_ops[:2])
        ops = f"; kernels {prof.kernel_share:.0%} of run ({top})"
    if floor >= 0.5 * p50:
        # most of the call is what an empty graph costs too
        ops += f"; ORT call floor {floor:.0f} of {p50:.0f} µs"
    if unit == "comparison":
        return f"tree walks, not FLOPs{ops}"
    if share is None:
        return f"no FLOP count{ops}"
    if share >= 0.25:
        verdict = "compute-bound"
    elif prof is not None and prof.kernel_share < 0.5:
        verdict = "overhead-bound (time outside kernels)"
    else:
        verdict = "small ops (too small or sequential to fill the core)"
    return verdict + ops


def bench_model(
    m: LoadedModel,
    inputs: np.ndarray,
    native: Native | None,
    method: Method,
    peak: float,
    floor: float,
    graph: Path | None = None,
) -> dict[str, Any]:
    xs = [np.ascontiguousarray(inputs[i : i + 1]) for i in range(min(len(inputs), _DISTINCT_INPUTS))]
    n = len(xs)
    session = m.session
    fns: dict[str, Callable[[int], object]] = {
        "ort": lambda i: session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: xs[i % n]}),
    }
    if native is not None:
        call = native.call
        fns["native"] = lambda i: call(xs[i % n])
    with contextlib.ExitStack() as stack:
        if native is not None and native.kind == "torch":
            import torch

            stack.enter_context(torch.inference_mode())
        t = measure(fns, method)
    ort, nat = t["ort"], t.get("native")
    prof = ort_profile(graph, xs, min(method.calls, 100)) if graph is not None else None
    work = native.work if native else None
    unit = native.unit if native else None
    achieved = work / (ort.p50_us * 1e-6) / 1e9 if work is not None and ort.p50_us > 0 else None
    share = achieved / peak if achieved is not None and unit == "flop" and peak > 0 else None
    return {
        "model": m.name,
        "threat_model": m.threat_model,
        "file": m.file,
        "input_kind": m.input_kind,
        "ort_p50_us": ort.p50_us,
        "ort_p99_us": ort.p99_us,
        "ort_spread_us": ort.spread_us,
        # model_perf's own field names, which edge.infer.bench_events reads
        "latency_us": ort.p50_us,
        "p99_us": ort.p99_us,
        "native": native.kind if native else None,
        "native_p50_us": nat.p50_us if nat else None,
        "native_p99_us": nat.p99_us if nat else None,
        "native_spread_us": nat.spread_us if nat else None,
        "ratio": ort.p50_us / nat.p50_us if nat and nat.p50_us > 0 else None,
        "flops": work,
        "work_unit": unit,
        "work_detail": native.detail if native else "",
        "achieved_gflops": achieved,
        "share_of_peak": share,
        "bound": _bound(unit, share, prof, ort.p50_us, floor),
        "ort_floor_us": floor,
        "kernel_share": prof.kernel_share if prof else None,
        "top_ops": [[op, v] for op, v in prof.top_ops] if prof else [],
        "nodes": prof.nodes if prof else None,
        "ort_repeat_p50_us": ort.repeat_p50_us,
    }


# --- the extractor, the whole path, the reader ----------------------------------------------


@dataclass
class StoreSample:
    archives: list[Path]
    rows: int  # telemetry rows in those archives
    windows: list[tuple[Mapping[str, Any], int, int]] = field(default_factory=list)  # (streams, t0, w)


def sample_store(store: Path, episodes: int) -> StoreSample | None:
    """A few readable archives spread over the store, and every window of them."""
    from schema.extract import n_windows
    from schema.reader import read_episode

    paths = sorted(store.glob("*/*.tar.zst"))
    if not paths or episodes < 1:
        return None
    step = max(1, len(paths) // episodes)
    order = paths[::step] + [p for i, p in enumerate(paths) if i % step]
    sample = StoreSample([], 0)
    for path in order:
        ep = read_episode(path)
        proc = ep.streams.get("proc")
        if ep.fatal or ep.meta is None or proc is None or len(proc.t_wall_ns) == 0:
            continue
        t0 = ep.meta.started_ns
        ws = range(n_windows(t0, int(proc.t_wall_ns.max())))
        if not len(ws):
            continue
        sample.archives.append(path)
        sample.rows += sum(len(s.t_wall_ns) for s in ep.streams.values())
        sample.windows += [(ep.streams, t0, w) for w in ws]
        if len(sample.archives) == episodes:
            break
    return sample if sample.archives else None


def bench_store(sample: StoreSample, modelset: ModelSet, method: Method) -> dict[str, Any]:
    """Extractor and whole-path µs per window, reader rows per second."""
    from schema.extract import extract_window, summarize
    from schema.reader import read_episode

    wins = sample.windows
    n = len(wins)
    projector = modelset.projectors.get("realistic") or next(iter(modelset.projectors.values()), None)

    def extract(i: int) -> object:
        streams, t0, w = wins[i % n]
        return summarize(extract_window(streams, t0, w).tensor)

    def path(i: int) -> object:
        # The daemon's per-window work at batch 1; every model runs (the worst case: a
        # window usable for both threat models).
        streams, t0, w = wins[i % n]
        win = extract_window(streams, t0, w)
        summary = summarize(win.tensor)
        out = modelset.run(win.tensor, summary)
        if projector is not None:
            projector.project(summary)
        return out

    t = measure({"extract": extract, "path": path}, method)
    rates: list[float] = []
    for _ in range(method.repeats):
        start = time.perf_counter_ns()
        for p in sample.archives:
            read_episode(p)
        rates.append(sample.rows / ((time.perf_counter_ns() - start) / 1e9))
    what = f"extract + summarize + {len(modelset.models)} models" + (
        f" + {projector.file}" if projector else ""
    )
    return {
        "extractor": {**_timing_dict(t["extract"]), "windows": n, "episodes": len(sample.archives)},
        "path": {**_timing_dict(t["path"]), "what": what},
        "reader": {
            "rows_per_s": float(np.median(rates)),
            "spread_rows_per_s": max(rates) - min(rates),
            "rows": sample.rows,
            "archives": [str(p) for p in sample.archives],
        },
    }


def _timing_dict(t: Timing) -> dict[str, Any]:
    return {"p50_us": t.p50_us, "p99_us": t.p99_us, "spread_us": t.spread_us, "calls": t.calls}


# --- the whole benchmark ---------------------------------------------------------------------


def _shape(m: LoadedModel) -> tuple[int, ...]:
    """One window as this graph reads it, without the batch axis."""
    c = len(m.channels)
    return (c, WINDOW_STEPS) if m.input_kind == "tensor" else (c * _K,)


def _select(models: Sequence[LoadedModel], only: Sequence[str] | None) -> list[LoadedModel]:
    if not only:
        return list(models)
    picked = [m for m in models if m.key in only or m.name in only or m.threat_model in only]
    if not picked:
        raise BenchError(f"--only {','.join(only)}: matches none of {', '.join(m.key for m in models)}")
    return picked


def _inputs_and_scores(
    m: LoadedModel, held: Heldout | None, sample: StoreSample | None, notes: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The windows to time one graph on, and its accuracy: held-out windows when the run has
    them (accuracy of this very graph), else store or random windows and the manifest's figures."""
    got = held.windows(m) if held is not None else None
    if got is not None and len(got[0]):
        x, y = got
        acc, f1 = heldout_accuracy(m, x, y)
        return x, {"accuracy": acc, "macro_f1": f1, "accuracy_source": "heldout", "heldout_windows": len(y)}
    acc = _manifest_metric(m, ("accuracy", "acc"))
    scores = {
        "accuracy": acc,
        "macro_f1": _manifest_metric(m, ("macro_f1",)),
        "accuracy_source": "manifest" if acc is not None else None,
        "heldout_windows": 0,
    }
    if sample is not None:
        from schema.extract import extract_window, summarize

        full = np.stack([extract_window(s, t0, w).tensor for s, t0, w in sample.windows[:_DISTINCT_INPUTS]])
        full = summarize(full) if m.input_kind == "summary" else full
        notes.append(f"{m.key}: no held-out windows; timed on store windows, accuracy from manifest.json")
        # an unusable source is NaN in the tensor; the daemon never scores such a window
        return model_inputs(np.nan_to_num(full), m, sample.archives[0]), scores
    notes.append(f"{m.key}: no held-out windows and no store; timed on random windows")
    return np.random.default_rng(0).lognormal(2.0, 1.5, size=(64, *_shape(m))).astype(np.float32), scores


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_bench(
    models_dir: Path | str,
    *,
    run: Path | None = None,
    store: Path | None = Path("data/store"),
    episodes: int = 3,
    method: Method = Method(),
    pin: int | None = None,
    only: Sequence[str] | None = None,
    plot: bool = True,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """Benchmark a models directory; writes ``bench.json`` (and ``bench.png``) into it. -> the document.

    ``pin``: None runs where the OS likes; a core number pins to it; -1 to the last allowed core."""
    from trainer.flops import peak_gflops

    models_dir = Path(models_dir)
    # Pinned before any session or thread pool is made, so everything is born on that core.
    pinned = pin_to_core(pin) if pin is not None else None
    schema = current_schema_hash()
    modelset = load_models(models_dir, expected_schema_hash=schema, threads=1)
    chosen = _select(modelset.models, only)
    notes: list[str] = []
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        notes.append("torch is not installed: torch models are benched with ORT only")

    progress("peak probe (single-thread float32 matmul)")
    peak = peak_gflops()
    floors = {shape: ort_floor_us(shape, method) for shape in sorted({_shape(m) for m in chosen})}

    run_dir = resolve_run(models_dir, modelset, run)
    if not run_dir.is_dir():
        notes.append(f"no run directory at {run_dir}: ORT only, accuracy from manifest.json")
    heldouts = {
        t: Heldout.load(run_dir / f"heldout-{t}.npz") for t in sorted({m.threat_model for m in chosen})
    }
    sample = sample_store(store, episodes) if store is not None and store.is_dir() else None
    if sample is None:
        notes.append(f"no readable archives under {store}: no extractor, path or reader figures")

    rows: list[dict[str, Any]] = []
    for m in chosen:
        progress(f"{m.key}")
        x, scores = _inputs_and_scores(m, heldouts.get(m.threat_model), sample, notes)
        native, why = load_native(run_dir, m, schema) if run_dir.is_dir() else (None, "")
        if why:
            notes.append(why + ": ORT only")
        row = bench_model(m, x, native, method, peak.gflops, floors[_shape(m)], models_dir / m.file)
        row.update(scores)
        rows.append(row)

    store_figs: dict[str, Any] = {"extractor": None, "path": None, "reader": None}
    if sample is not None:
        progress(f"extractor, path and reader on {len(sample.archives)} archives")
        store_figs = bench_store(sample, modelset, method)

    doc: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "schema_hash": schema,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": cpu_name(),
            "arch": platform.machine(),
            "cores": os.cpu_count() or 1,
            "pinned": pinned,
            "peak_gflops": peak.gflops,
            "peak_by_size": {str(k): v for k, v in peak.by_size.items()},
            "blas": peak.library,
            "ort_floor_us": min(floors.values()),
            "loadavg": list(os.getloadavg()),
            "onnxruntime": _version("onnxruntime"),
            "torch": _version("torch"),
            "xgboost": _version("xgboost") or _version("xgboost-cpu"),
        },
        "method": {"batch": 1, **asdict(method), "spread": "max-min of repeat p50s"},
        "run": str(run_dir) if run_dir.is_dir() else None,
        "models": rows,
        "extractor_us": store_figs["extractor"]["p50_us"] if store_figs["extractor"] else None,
        "path_us": store_figs["path"]["p50_us"] if store_figs["path"] else None,
        "reader_rows_per_s": store_figs["reader"]["rows_per_s"] if store_figs["reader"] else None,
        **store_figs,
        "notes": notes,
    }
    _write_json(models_dir / BENCH_FILE, doc)
    if plot:
        plot_bench(doc, models_dir / PLOT_FILE)
    return doc


def _clean(v: Any) -> Any:
    """JSON has no NaN: an undefined figure is null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)  # the daemon never reads half a file


# --- outputs: table, plot, events ------------------------------------------------------------


def _us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _work(v: float | None, unit: str | None) -> str:
    if v is None:
        return "—"
    if unit == "comparison":
        return f"{v:,.0f} cmp"
    for scale, suffix in ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if v >= scale:
            return f"{v / scale:.2f} {suffix}"
    return f"{v:.0f} FLOP"


def _rate(g: float | None, unit: str | None) -> str:
    if g is None:
        return "—"
    name = "cmp/s" if unit == "comparison" else "FLOP/s"
    return f"{g:.2f} G{name}" if g >= 1 else f"{g * 1e3:.1f} M{name}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f} %"


def format_table(doc: dict[str, Any]) -> str:
    """The report: one markdown row per model, then the per-window path and the machine."""
    head = (
        "| model | threat | ORT p50 µs | ORT p99 µs | spread µs | native p50 µs | ORT/native "
        "| work/window | achieved | % of peak | where time goes | accuracy | macro F1 |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in doc["models"]:
        native = f"{_us(r['native_p50_us'])} ({r['native']})" if r["native"] else "— (no checkpoint)"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        achieved = _rate(r["achieved_gflops"], r["work_unit"])
        lines.append(
            f"| {r['model']} | {r['threat_model']} | {_us(r['ort_p50_us'])} | {_us(r['ort_p99_us'])} "
            f"| {_us(r['ort_spread_us'])} | {native} | {ratio} | {_work(r['flops'], r['work_unit'])} "
            f"| {achieved} | {_pct(r['share_of_peak'], 2)} | {r['bound']} | {_pct(r['accuracy'])} "
            f"| {_pct(r['macro_f1'])} |"
        )
    mach, meth = doc["machine"], doc["method"]
    pinned = f", pinned to core {mach['pinned']}" if mach["pinned"] is not None else ""
    lines += [
        "",
        f"- machine: {mach['cpu']} ({mach['arch']}, {mach['cores']} cores{pinned}), "
        f"load average {mach['loadavg'][0]:.1f}; peak {mach['peak_gflops']:.1f} GFLOP/s "
        f"(one thread, float32 GEMM, {mach['blas']}); ORT call floor {mach['ort_floor_us']:.1f} µs",
    ]
    ex, path, rd = doc.get("extractor"), doc.get("path"), doc.get("reader")
    if ex:
        lines.append(
            f"- extractor (extract_window + summarize): {_us(ex['p50_us'])} µs/window p50, "
            f"{_us(ex['p99_us'])} p99, spread {_us(ex['spread_us'])} "
            f"({ex['windows']} windows of {ex['episodes']} archives)"
        )
    if path:
        lines.append(
            f"- whole per-window path ({path['what']}): {_us(path['p50_us'])} µs/window p50, "
            f"{_us(path['p99_us'])} p99, spread {_us(path['spread_us'])}"
        )
    if rd:
        lines.append(
            f"- reader: {rd['rows_per_s']:,.0f} telemetry rows/s "
            f"(spread {rd['spread_rows_per_s']:,.0f}; {rd['rows']:,} rows in {len(rd['archives'])} archives)"
        )
    lines.append(
        f"- method: batch 1, one thread everywhere; {meth['warmup']} warm-up calls, then "
        f"{meth['repeats']} repeats x {meth['calls']} calls, interleaved ORT/native; p50/p99 are "
        f"medians over repeats; spread = {meth['spread']}; ratio = ORT p50 / native p50"
    )
    lines += [f"- note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)


def plot_bench(doc: dict[str, Any], path: Path) -> Path:
    """Accuracy vs ORT µs per window (log x), one colour per model, a marker per threat model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schema.vocab import MODELS

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for r in doc["models"]:
        if r["accuracy"] is None:
            continue
        i = MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS)
        c = colours(i % 10)
        realistic = r["threat_model"] == "realistic"
        x, y = r["ort_p50_us"], r["accuracy"]
        # the p50 -> p99 tail as a whisker: how bad the slow calls are
        ax.plot([x, r["ort_p99_us"]], [y, y], color=c, alpha=0.5, lw=1.5)
        ax.scatter(
            [x],
            [y],
            s=70,
            marker="o" if realistic else "^",
            color=c if realistic else "none",
            edgecolors=c,
            linewidths=1.8,
            zorder=3,
        )
        # realistic labels above, oracle below: twins of one model sit close together
        ax.annotate(
            r["model"] if realistic else f"{r['model']}·{r['threat_model']}",
            (x, y),
            textcoords="offset points",
            xytext=(7, 5) if realistic else (7, -13),
            fontsize=9,
            color=c,
        )
    ax.set_xscale("log")
    ax.set_xlabel("ONNX Runtime µs per window (p50, whisker to p99; batch 1, one thread; log scale)")
    ax.set_ylabel("held-out accuracy")
    mach = doc["machine"]
    pinned = f", core {mach['pinned']}" if mach["pinned"] is not None else ""
    ax.set_title(
        f"accuracy vs latency — {mach['cpu']}{pinned}\n"
        f"filled: realistic, hollow: oracle; peak {mach['peak_gflops']:.0f} GFLOP/s",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def perf_events(doc: dict[str, Any]) -> list[Any]:
    """One model_perf per model name: the realistic rows (the oracle ones if there are none)."""
    from schema.events import ModelPerf

    rows = [r for r in doc["models"] if r["accuracy"] is not None]
    realistic = [r for r in rows if r["threat_model"] == "realistic"]
    return [
        ModelPerf(
            model=r["model"],
            latency_us=float(r["ort_p50_us"]),
            accuracy=min(1.0, max(0.0, float(r["accuracy"]))),
            p99_us=float(r["ort_p99_us"]),
            threat_model=r["threat_model"],
        )
        for r in (realistic or rows)
    ]


def publish(doc: dict[str, Any], url: str, token: str | None = None) -> int:
    """POST the model_perf points to a running daemon. -> how many points."""
    from schema.publisher import Publisher

    events = perf_events(doc)
    if events:
        Publisher(url, token=token).publish(events)
    return len(events)


# --- CLI -------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", type=Path, default=Path("models"), help="exported models directory (default models)"
    )
    p.add_argument(
        "--run",
        type=Path,
        default=None,
        help="training run with the native models and held-out windows "
        "(default: the run manifest.json names, else runs/latest)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=Path("data/store"),
        help="receiver store for the extractor, path and reader figures (default data/store)",
    )
    p.add_argument("--episodes", type=int, default=3, help="archives of the store to use (default 3)")
    p.add_argument(
        "--repeats", type=int, default=Method.repeats, help=f"timed repeats (default {Method.repeats})"
    )
    p.add_argument(
        "--calls", type=int, default=Method.calls, help=f"calls per repeat (default {Method.calls})"
    )
    p.add_argument(
        "--warmup", type=int, default=Method.warmup, help=f"untimed warm-up calls (default {Method.warmup})"
    )
    p.add_argument(
        "--pin",
        type=int,
        nargs="?",
        const=-1,
        default=None,
        metavar="CORE",
        help="run on one core (default: the last one allowed) to stand in for a Pi core",
    )
    p.add_argument(
        "--only",
        type=_csv,
        default=None,
        metavar="KEYS",
        help="comma-separated models to bench: gru, gru-realistic or a threat model",
    )
    p.add_argument(
        "--publish",
        metavar="URL",
        default=None,
        help="POST the model_perf points to a running edge daemon, e.g. http://127.0.0.1:8080",
    )
    p.add_argument("--token", default=None, help="bearer token for --publish")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")


def cli_bench(args: argparse.Namespace) -> int:
    from edge.modelset import ModelSetError
    from schema.publisher import PublishError

    try:
        doc = run_bench(
            args.models,
            run=args.run,
            store=args.store,
            episodes=args.episodes,
            method=Method(warmup=args.warmup, repeats=args.repeats, calls=args.calls),
            pin=args.pin,
            only=args.only,
            plot=not args.no_plot,
        )
    except (BenchError, ModelSetError) as e:
        print(f"phasewatch bench: {e}", file=sys.stderr)
        return 2
    print(format_table(doc))
    print(f"\nwrote {args.models / BENCH_FILE}" + ("" if args.no_plot else f" and {args.models / PLOT_FILE}"))
    if args.publish:
        try:
            n = publish(doc, args.publish, args.token)
        except PublishError as e:
            print(f"phasewatch bench: publish failed: {e}", file=sys.stderr)
            return 1
        print(f"published {n} model_perf points to {args.publish}")
    return 0
