"""`phasewatch bench`: what one window costs on the edge, per model, and how far from the core's limit.

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
``model_perf`` events at start) is ``schema.artifacts.BenchDoc``, one ``BenchRow`` per
graph; ``schema.artifacts.perf_events`` makes the model_perf points, for the daemon and
for ``--publish`` alike: one per benched graph with an accuracy, oracle first and
realistic last (the deck keys points by model name, latest wins), ``latency_us`` the ORT
p50 (what the Pi pays), ``p99_us`` the ORT p99.

Every graph reads the full 46-channel window (it gathers its own channels), so ORT is
timed on full-width held-out windows and the native twin on the same windows' view.
Modules: ``bench_timing`` (clocks, machine, ORT floor and profile), ``bench_native``
(the twins), ``bench_report`` (table and plot); this one runs the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.modelset import LoadedModel, ModelSet, load_models
from schema.artifacts import (
    BENCH_FILE,
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    BenchDoc,
    BenchMethod,
    BenchRow,
    ExtractorFigures,
    Machine,
    PathFigures,
    ReaderFigures,
    encode_doc,
    heldout_file,
    perf_events,
)
from schema.artifacts import BENCH_PLOT_FILE as PLOT_FILE
from schema.extract import input_shape, select
from schema.hashing import schema_hash as current_schema_hash
from trainer.bench_native import Native, load_native, native_of, resolve_run
from trainer.bench_report import format_table, plot_bench
from trainer.bench_timing import (
    Method,
    OpProfile,
    Timing,
    _version,
    cpu_name,
    figures,
    measure,
    ort_floor_us,
    ort_profile,
    pin_to_core,
)
from trainer.errors import BenchError, TrainerError
from trainer.heldout import Heldout

__all__ = [
    "BENCH_FILE",
    "PLOT_FILE",
    "BenchError",
    "Method",
    "Native",
    "Timing",
    "format_table",
    "measure",
    "native_of",
    "pin_to_core",
    "plot_bench",
    "publish",
    "run_bench",
]

_DISTINCT_INPUTS = 256  # held-out windows cycled through at batch 1
_ACC_BATCH = 256  # accuracy is measured in batches: it is not a latency figure
_METHOD = Method()


# --- accuracy of the exported graph itself ---------------------------------------------------


def heldout_accuracy(m: LoadedModel, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro F1) of the exported graph itself on full-width held-out windows."""
    from trainer.evaluate import macro_f1

    probs = np.concatenate(
        [
            m.session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: x[i : i + _ACC_BATCH]})[0]
            for i in range(0, len(x), _ACC_BATCH)
        ]
    )
    pred = probs.argmax(axis=1)
    return float((pred == y).mean()), float(macro_f1(y, pred))


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
) -> BenchRow:
    """``inputs``: full-width windows (what the graph reads); the native twin gets their view."""
    xs = [np.ascontiguousarray(inputs[i : i + 1]) for i in range(min(len(inputs), _DISTINCT_INPUTS))]
    views = [np.ascontiguousarray(select(x, m.channels, m.input_kind)) for x in xs]
    n = len(xs)
    session = m.session
    fns: dict[str, Callable[[int], object]] = {
        "ort": lambda i: session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: xs[i % n]}),
    }
    if native is not None:
        call = native.call
        fns["native"] = lambda i: call(views[i % n])
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
    return BenchRow(
        model=m.name,
        threat_model=m.threat_model,
        file=m.file,
        input_kind=m.input_kind,
        ort_p50_us=ort.p50_us,
        ort_p99_us=ort.p99_us,
        ort_spread_us=ort.spread_us,
        ort_floor_us=floor,
        bound=_bound(unit, share, prof, ort.p50_us, floor),
        native=native.kind if native else None,
        native_p50_us=nat.p50_us if nat else None,
        native_p99_us=nat.p99_us if nat else None,
        native_spread_us=nat.spread_us if nat else None,
        ratio=ort.p50_us / nat.p50_us if nat and nat.p50_us > 0 else None,
        flops=work,
        work_unit=unit,
        work_detail=native.detail if native else "",
        achieved_gflops=achieved,
        share_of_peak=share,
        kernel_share=prof.kernel_share if prof else None,
        top_ops=list(prof.top_ops) if prof else [],
        nodes=prof.nodes if prof else None,
        ort_repeat_p50_us=ort.repeat_p50_us,
    )


# --- the extractor, the whole path, the reader ----------------------------------------------


@dataclass
class StoreSample:
    archives: list[Path]
    rows: int  # telemetry rows in those archives
    windows: list[tuple[Mapping[str, Any], int, int]] = field(default_factory=list)  # (streams, t0, w)


def _windows_as_tailed(
    streams: Mapping[str, Any], t0: int, ws: range
) -> list[tuple[Mapping[str, Any], int, int]]:
    """Each window with its own rows, as the daemon's tailer hands them to the extractor: per
    stream a copy of the rows in the window's span (``ColumnBuilder.window``), not the whole
    episode, so the extractor figure is what a window costs on the edge."""
    from schema.channels import LOOKBACK_NS
    from schema.columns import ColumnBuilder
    from schema.extract import window_last_step_ns, window_start_ns

    builders = {}
    for source, c in streams.items():
        builders[source] = b = ColumnBuilder(source)
        b.append(c.t_wall_ns, c.t_mono_ns, c.values)
    out = []
    for w in ws:
        lo, hi = window_start_ns(t0, w) - LOOKBACK_NS, window_last_step_ns(t0, w)
        out.append(({s: b.window(lo, hi) for s, b in builders.items()}, t0, w))
    return out


def sample_store(store: Path, episodes: int) -> StoreSample | None:
    """A few readable archives spread over the store, and every window of them (its own rows)."""
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
        sample.windows += _windows_as_tailed(ep.streams, t0, ws)
        if len(sample.archives) == episodes:
            break
    return sample if sample.archives else None


def bench_store(
    sample: StoreSample, modelset: ModelSet, method: Method
) -> tuple[ExtractorFigures, PathFigures, ReaderFigures]:
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
    ex, pa = figures(t["extract"]), figures(t["path"])
    return (
        ExtractorFigures(**_fields(ex), windows=n, episodes=len(sample.archives)),
        PathFigures(**_fields(pa), what=what),
        ReaderFigures(
            rows_per_s=float(np.median(rates)),
            spread_rows_per_s=max(rates) - min(rates),
            rows=sample.rows,
            archives=[str(p) for p in sample.archives],
        ),
    )


def _fields(s: Any) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


# --- the whole benchmark ---------------------------------------------------------------------


def _select(models: Sequence[LoadedModel], only: Sequence[str] | None) -> list[LoadedModel]:
    if not only:
        return list(models)
    picked = [m for m in models if m.key in only or m.name in only or m.threat_model in only]
    if not picked:
        raise BenchError(f"--only {','.join(only)}: matches none of {', '.join(m.key for m in models)}")
    return picked


@dataclass
class Scores:
    accuracy: float | None
    macro_f1: float | None
    accuracy_source: str | None
    heldout_windows: int = 0


def _inputs_and_scores(
    m: LoadedModel, held: Heldout | None, sample: StoreSample | None, notes: list[str]
) -> tuple[np.ndarray, Scores]:
    """The full-width windows to time one graph on, and its accuracy: held-out windows when the
    run has them (accuracy of this very graph), else store or random windows and the manifest's."""
    if held is not None and len(held):
        keep = held.y >= 0
        x, y = held.inputs(m.input_kind)[keep], held.y[keep]
        if len(y):
            acc, f1 = heldout_accuracy(m, x, y)
            return x, Scores(acc, f1, "heldout", len(y))
    acc = m.metrics.accuracy.value if m.metrics is not None else None
    f1 = m.metrics.macro_f1.value if m.metrics is not None else None
    scores = Scores(acc, f1, "manifest" if acc is not None else None)
    if sample is not None:
        from schema.extract import extract_window, summarize

        full = np.stack([extract_window(s, t0, w).tensor for s, t0, w in sample.windows[:_DISTINCT_INPUTS]])
        full = summarize(full) if m.input_kind == "summary" else full
        notes.append(f"{m.key}: no held-out windows; timed on store windows, accuracy from manifest.json")
        # an unusable source is NaN in the tensor; the daemon never scores such a window
        return np.ascontiguousarray(np.nan_to_num(full), np.float32), scores
    notes.append(f"{m.key}: no held-out windows and no store; timed on random windows")
    shape = (64, *input_shape(m.input_kind))
    return np.random.default_rng(0).lognormal(2.0, 1.5, size=shape).astype(np.float32), scores


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_bench(
    models_dir: Path | str,
    *,
    run: Path | None = None,
    store: Path | None = Path("data/store"),
    episodes: int = 3,
    method: Method = _METHOD,
    pin: int | None = None,
    only: Sequence[str] | None = None,
    plot: bool = True,
    progress: Callable[[str], None] = _progress,
) -> BenchDoc:
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
    floors = {
        kind: ort_floor_us(input_shape(kind), method) for kind in sorted({m.input_kind for m in chosen})
    }

    run_dir = resolve_run(models_dir, modelset, run)
    if not run_dir.is_dir():
        notes.append(f"no run directory at {run_dir}: ORT only, accuracy from manifest.json")
    heldouts: dict[str, Heldout | None] = {}
    for t in sorted({m.threat_model for m in chosen}):
        path = run_dir / heldout_file(t)
        heldouts[t] = Heldout.load(path) if path.is_file() else None
    sample = sample_store(store, episodes) if store is not None and store.is_dir() else None
    if sample is None:
        notes.append(f"no readable archives under {store}: no extractor, path or reader figures")

    rows: list[BenchRow] = []
    for m in chosen:
        progress(f"{m.key}")
        x, scores = _inputs_and_scores(m, heldouts.get(m.threat_model), sample, notes)
        native, why = load_native(run_dir, m, schema) if run_dir.is_dir() else (None, "")
        if why:
            notes.append(why + ": ORT only")
        row = bench_model(m, x, native, method, peak.gflops, floors[m.input_kind], models_dir / m.file)
        row.accuracy, row.macro_f1 = scores.accuracy, scores.macro_f1
        row.accuracy_source, row.heldout_windows = scores.accuracy_source, scores.heldout_windows
        rows.append(row)

    ex = pa = rd = None
    if sample is not None:
        progress(f"extractor, path and reader on {len(sample.archives)} archives")
        ex, pa, rd = bench_store(sample, modelset, method)

    doc = BenchDoc(
        schema_hash=schema,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=Machine(
            cpu=cpu_name(),
            arch=platform.machine(),
            cores=os.cpu_count() or 1,
            pinned=pinned,
            peak_gflops=peak.gflops,
            peak_by_size={str(k): v for k, v in peak.by_size.items()},
            blas=peak.library,
            ort_floor_us=min(floors.values()),
            loadavg=list(os.getloadavg()),
            onnxruntime=_version("onnxruntime"),
            torch=_version("torch"),
            xgboost=_version("xgboost") or _version("xgboost-cpu"),
        ),
        method=BenchMethod(warmup=method.warmup, repeats=method.repeats, calls=method.calls),
        run=str(run_dir) if run_dir.is_dir() else None,
        models=rows,
        extractor_us=ex.p50_us if ex else None,
        path_us=pa.p50_us if pa else None,
        reader_rows_per_s=rd.rows_per_s if rd else None,
        extractor=ex,
        path=pa,
        reader=rd,
        notes=notes,
    )
    _write_doc(models_dir / BENCH_FILE, doc)
    if plot:
        plot_bench(doc, models_dir / PLOT_FILE)
    return doc


def _write_doc(path: Path, doc: BenchDoc) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_doc(doc))  # a figure that is not finite is written as null
    os.replace(tmp, path)  # the daemon never reads half a file


def publish(doc: BenchDoc, url: str, token: str | None = None) -> int:
    """POST the model_perf points (the daemon's own, ``perf_events``) to a running daemon. -> how many."""
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
    except (TrainerError, ModelSetError) as e:  # the code cli.py gives a TrainerError, here too
        print(f"phasewatch bench: {e}", file=sys.stderr)
        return TrainerError.exit_code
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
