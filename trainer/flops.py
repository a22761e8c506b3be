"""Work per window and this core's ceiling, for the benchmark's "how far from the limit".

- torch nets: matmul and convolution FLOPs of one batch-1 forward, counted by
  ``torch.utils.flop_counter.FlopCounterMode``. It counts a GRU (the CPU kernel is
  decomposed into ``addmm``) but not an LSTM (one fused ``aten.lstm`` it has no formula
  for), so every recurrent module is replaced by its analytic count: per step, per
  direction, ``gates * (in + hidden) * hidden`` multiply-adds, 2 FLOPs each.
- boosted trees: not FLOPs but comparisons, the expected root-to-leaf path length summed
  over trees, weighted by each leaf's training cover (the windows that really reach it).
- peak: the best single-thread float32 GEMM rate over a few sizes (numpy's BLAS, limited
  to one thread with threadpoolctl), i.e. what one core does when nothing but FLOPs count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PEAK_SIZES: tuple[int, ...] = (64, 128, 256, 512)
_RNN_GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}


def rnn_flops(module: Any, seq_len: int, batch: int = 1) -> int:
    """Analytic matmul FLOPs of one ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` forward."""
    gates = _RNN_GATES[type(module).__name__]
    dirs = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    total = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else hidden * dirs
        total += 2 * gates * (width + hidden) * hidden * dirs
    return total * seq_len * batch


def torch_flops(net: Any, example: Any) -> int:
    """Matmul/conv FLOPs of ``net(example)``; recurrent modules counted analytically."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    rnns: list[tuple[nn.Module, torch.Tensor]] = []

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        rnns.append((module, args[0]))

    hooks = [
        m.register_forward_pre_hook(grab) for m in net.modules() if isinstance(m, (nn.GRU, nn.LSTM, nn.RNN))
    ]
    with torch.inference_mode():
        try:
            with FlopCounterMode(display=False) as counter:
                net(example)
        finally:
            for h in hooks:  # before the modules run again on their own below
                h.remove()
        total = int(counter.get_total_flops())
        for module, x in rnns:
            # What the counter saw inside this module (all of a GRU, none of an LSTM) is
            # replaced by the formula, so both kinds are counted the same way.
            with FlopCounterMode(display=False) as inner:
                module(x)
            batch_first = getattr(module, "batch_first", False)
            steps = x.shape[1] if (batch_first and x.dim() == 3) else x.shape[0]
            batch = (x.shape[0] if batch_first else x.shape[1]) if x.dim() == 3 else 1
            total += rnn_flops(module, int(steps), int(batch)) - int(inner.get_total_flops())
    return total


@dataclass(frozen=True)
class TreeWork:
    trees: int
    comparisons: float  # expected comparisons per window, all trees
    mean_depth: float  # expected path length per tree
    max_depth: int


def _walk(node: dict[str, Any], depth: int, out: list[tuple[int, float]]) -> None:
    children = node.get("children")
    if not children:
        out.append((depth, float(node.get("cover", 1.0))))
        return
    for child in children:
        _walk(child, depth + 1, out)


def xgb_comparisons(booster: Any) -> TreeWork:
    """Cover-weighted expected root-to-leaf comparisons of an XGBoost booster, per window."""
    dumps = booster.get_dump(with_stats=True, dump_format="json")
    expected, deepest = 0.0, 0
    for text in dumps:
        leaves: list[tuple[int, float]] = []
        _walk(json.loads(text), 0, leaves)
        cover = sum(c for _, c in leaves)
        depths = np.array([d for d, _ in leaves], dtype=np.float64)
        weights = np.array([c for _, c in leaves], dtype=np.float64)
        expected += float((depths * weights).sum() / cover) if cover > 0 else float(depths.mean())
        deepest = max(deepest, int(depths.max()))
    n = len(dumps)
    return TreeWork(trees=n, comparisons=expected, mean_depth=expected / n if n else 0.0, max_depth=deepest)


@dataclass(frozen=True)
class PeakProbe:
    gflops: float  # best over sizes
    by_size: dict[int, float]  # n -> GFLOP/s of an n x n x n float32 matmul
    library: str  # which BLAS did the work


def peak_gflops(sizes: Sequence[int] = PEAK_SIZES, min_seconds: float = 0.05, rounds: int = 3) -> PeakProbe:
    """Best single-thread float32 matmul rate: this core's practical FLOPs ceiling.

    Each size runs for at least ``min_seconds`` per round and keeps its fastest call over
    ``rounds`` rounds, because on a shared machine the minimum is the least disturbed."""
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(0)
    by_size: dict[int, float] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            out = np.empty((n, n), np.float32)
            np.matmul(a, b, out=out)  # warm: page in, pick the kernel
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                while True:
                    t = time.perf_counter_ns()
                    np.matmul(a, b, out=out)
                    best = min(best, (time.perf_counter_ns() - t) / 1e9)
                    if time.perf_counter() - start >= min_seconds:
                        break
            by_size[n] = 2.0 * n**3 / best / 1e9
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    library = f"{blas[0].get('internal_api', '?')} {blas[0].get('version', '')}".strip() if blas else "numpy"
    return PeakProbe(gflops=max(by_size.values()), by_size=by_size, library=library)
