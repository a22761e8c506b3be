"""rocket's ONNX graph, old against new, side by side in one process (issue 13).

    nice -n 10 python benchmarks/bench_rocket.py [--profile quick] [--channels 30] [--batches 1,8]
        [--rounds 15] [--level all|extended] [--variants "k=v,k=v;..."] [--ops] [--onnx NAME=PATH ...]
        [--out runs/bench-rocket.json]

Fits rockets (``--profile``, 300 random windows: timing does not depend on what the
kernels learnt) and exports:

    sigmoid-1d   the graph before issue 13: per dilation a 1x1 Conv, a 1-D grouped Conv,
                 Sub, Mul, Sigmoid and ReduceMean on (N, 84, B, T); rebuilt here from the
                 buffers of a ``ppv=sigmoid`` model of the profile's sizes (``--legacy``
                 overrides them), so it computes what that model computes
    one graph per ``--variants`` entry: today's code with those config overrides. The
                 default: ``ppv=sigmoid``, the new layout (one select Conv, width and
                 standardisation folded in, 2-D grouped Convs, one Sub/step/mean) with the
                 old step; ``default``, today's profile (the ramp step); and
                 ``features=2016,max_dilations=4``, the smaller model DECISIONS weighs

``--onnx NAME=PATH`` adds exported files (e.g. an old and a new ``rocket-realistic.onnx``).
Every graph runs under the daemon's own ORT options (``edge.modelset.session_options``, one
thread) on the same windows; rounds interleave the graphs so that load on a shared box hits
all of them alike. Prints the median microseconds per window and each graph's ratio to the
first, per batch size; ``--ops`` adds ORT's per-op profile at batch 1.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def legacy_module(net: Any) -> Any:
    """The pre-issue-13 graph of ``net`` (a fitted RocketNet), built from its buffers."""
    import torch
    from torch import nn

    from trainer.models.rocket import KERNEL_LENGTH, N_KERNELS

    class Legacy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.net
            z = n.norm(x)
            out = []
            for i, d in enumerate(n.dilations):
                summed = nn.functional.conv1d(z, getattr(n, f"select{i}"))
                pad = (KERNEL_LENGTH - 1) // 2 * d
                v = nn.functional.conv1d(summed, n.kernels, dilation=d, padding=pad, groups=N_KERNELS)
                v = v.unsqueeze(2)
                s = torch.sigmoid((v - getattr(n, f"bias{i}")) * getattr(n, f"inv_tau{i}"))
                out.append(s.mean(dim=3).flatten(1))
            return n.head(torch.cat(out, dim=1))

    return Legacy().eval()


def onnx_bytes(module: Any, input_shape: tuple[int, ...]) -> bytes:
    """The same export call as ``trainer.models.torch_base.export_onnx`` (softmax and beta aside)."""
    import torch

    from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros((2, *input_shape)),),
            buf,
            input_names=[MODEL_INPUT_NAME],
            output_names=[MODEL_OUTPUT_NAME],
            dynamic_axes={MODEL_INPUT_NAME: {0: "batch"}, MODEL_OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )
    return buf.getvalue()


def parse_variant(spec: str) -> dict[str, Any]:
    """ "ppv=ramp,features=2016" -> {"ppv": "ramp", "features": 2016}: rocket config overrides."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def build_graphs(
    profile: str, channels: int, steps: int, seed: int, variants: list[str], legacy: str
) -> tuple[dict[str, bytes], np.ndarray]:
    import torch

    from trainer.models.rocket import Rocket

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    # Channels of very different scales, as the store's are; labels with some structure.
    x = (rng.standard_normal((300, channels, steps)) * np.exp(rng.standard_normal((1, channels, 1)))).astype(
        np.float32
    )
    y = (x[:, 0].mean(axis=1) > 0).astype(np.int64) + 2 * (x[:, 1].std(axis=1) > 1)

    def fitted(**overrides: Any) -> Any:
        m = Rocket((channels, steps), 5, profile=profile, seed=seed, threads=1, **overrides)
        m.fit(x[:200], y[:200], x[200:], y[200:])
        return m.net.eval()

    old = {**parse_variant(legacy), "ppv": "sigmoid"}
    graphs = {"sigmoid-1d": onnx_bytes(legacy_module(fitted(**old)), (channels, steps))}
    for spec in variants:
        graphs[spec or "default"] = onnx_bytes(fitted(**parse_variant(spec)), (channels, steps))
    return graphs, x


def op_counts(blob: bytes) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load_from_string(blob).graph.node))


def options(level: str) -> Any:
    """The daemon's options; ``extended`` stops ORT short of its x86-only NCHWc layout, as on a Pi."""
    import onnxruntime as ort

    from edge.modelset import session_options

    opts = session_options(1)
    if level == "extended":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return opts


def per_op_profile(blob: bytes, x: np.ndarray, level: str = "all", runs: int = 200) -> dict[str, float]:
    """ORT's own profile: microseconds per run in each op type, at batch 1. Each node's median
    over the runs, so that a run preempted by another process on a shared box counts little."""
    import onnxruntime as ort

    opts = options(level)
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "rocket")
        sess = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: fit_width(x[:1], sess)}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node[(e["args"]["op_name"], e["name"])].append(float(e["dur"]))
    agg: dict[str, float] = collections.defaultdict(float)
    for (op, _), durations in per_node.items():
        agg[op] += statistics.median(durations)
    agg["total"] = sum(agg.values())
    return {op: round(us, 1) for op, us in sorted(agg.items(), key=lambda kv: -kv[1])}


def fit_width(x: np.ndarray, sess: Any) -> np.ndarray:
    """``x`` with as many channels as the graph reads: an exported file takes the full
    46-channel window (and gathers its view), the graphs built here the view itself."""
    want = sess.get_inputs()[0].shape[1]
    if isinstance(want, int) and want != x.shape[1]:
        x = np.resize(x, (x.shape[0], want, x.shape[2]))
    return np.ascontiguousarray(x, np.float32)


def time_graphs(
    graphs: dict[str, bytes],
    x: np.ndarray,
    batches: list[int],
    rounds: int,
    budget_s: float,
    level: str = "all",
) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    sessions = {
        k: ort.InferenceSession(b, sess_options=options(level), providers=["CPUExecutionProvider"])
        for k, b in graphs.items()
    }
    result: dict[str, dict[str, float]] = {}
    for bs in batches:
        feeds = {k: {s.get_inputs()[0].name: fit_width(x[:bs], s)} for k, s in sessions.items()}
        samples: dict[str, list[float]] = {k: [] for k in sessions}
        for k, s in sessions.items():  # warm-up: arena grown, pages touched
            for _ in range(5):
                s.run(None, feeds[k])
        for _ in range(rounds):
            for k, s in sessions.items():
                n, t0 = 0, time.perf_counter()
                while True:
                    s.run(None, feeds[k])
                    n += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= budget_s:
                        break
                samples[k].append(elapsed / n / bs * 1e6)
        result[str(bs)] = {k: statistics.median(v) for k, v in samples.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--channels", type=int, default=30, help="the realistic view's 30; oracle is 46")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per batch size")
    ap.add_argument("--round-s", type=float, default=0.1, help="seconds each graph runs per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--legacy",
        default="",
        help="config overrides of the sigmoid-1d graph (default: the profile's own sizes)",
    )
    ap.add_argument(
        "--variants",
        default="ppv=sigmoid;;features=2016,max_dilations=4",
        help="today's graphs to time, ';'-separated rocket config overrides (empty: the profile's)",
    )
    ap.add_argument(
        "--level",
        choices=("all", "extended"),
        default="all",
        help="ORT graph optimisation: the daemon's (all), or extended: no NCHWc, as on ARM",
    )
    ap.add_argument("--ops", action="store_true", help="also ORT's per-op profile at batch 1")
    ap.add_argument("--onnx", nargs="*", default=[], metavar="NAME=PATH", help="exported graphs to add")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    variants = [v.strip() for v in args.variants.split(";")]
    graphs, x = build_graphs(args.profile, args.channels, args.steps, args.seed, variants, args.legacy)
    for spec in args.onnx:
        name, _, path = spec.partition("=")
        graphs[name] = Path(path).read_bytes()
    doc: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "profile": args.profile,
        "input": [args.channels, args.steps],
        "ops": {k: op_counts(b) for k, b in graphs.items()},
    }
    base = next(iter(graphs))
    for k, counts in doc["ops"].items():
        print(f"{k:<12} {sum(counts.values()):>3} nodes  {counts}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    doc["level"] = args.level
    doc["us_per_window"] = time_graphs(graphs, x, batches, args.rounds, args.round_s, args.level)
    print(
        f"\nmedian us per window over {args.rounds} interleaved rounds (1 ORT thread, optimisation "
        f"{args.level}); ratio = {base} / graph"
    )
    for bs, row in doc["us_per_window"].items():
        for k, us in row.items():
            print(f"  batch {bs:>2}  {k:<12} {us:8.1f} us   x{row[base] / us:.2f}")
    if args.ops:
        doc["ops_us_batch1"] = {k: per_op_profile(b, x, args.level) for k, b in graphs.items()}
        print("\nORT per-op profile, us per run at batch 1:")
        for k, row in doc["ops_us_batch1"].items():
            print(f"  {k:<12} {row}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
