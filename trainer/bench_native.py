"""The native twins `phasewatch bench` times beside each ONNX graph: torch in eval mode with one
thread under ``inference_mode``, XGBoost ``inplace_predict`` with ``nthread=1``, loaded from the
run directory the models were exported from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.modelset import LoadedModel, ModelSet
from trainer.errors import BenchError


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
    named = modelset.manifest.run.path if modelset.manifest.run is not None else ""
    if named:
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
