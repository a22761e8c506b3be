"""Timing for `phasewatch bench`: per-call clocks taken in turns, the machine, ORT's floor and profile.

Each call is timed alone with ``time.perf_counter_ns`` with the garbage collector off; p50
and p99 are taken per repeat, the reported figure is the median over repeats, and the
spread is max - min of the repeat p50s. Functions timed together take turns repeat by
repeat, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME, TimingFigures
from trainer.errors import BenchError


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


def figures(t: Timing) -> TimingFigures:
    return TimingFigures(p50_us=t.p50_us, p99_us=t.p99_us, spread_us=t.spread_us, calls=t.calls)
