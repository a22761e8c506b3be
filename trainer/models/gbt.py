"""gbt: gradient-boosted trees (XGBoost, hist) on the summary features (N, F).

Trees are invariant to monotone rescaling, so gbt reads raw features with no
normalisation. Trained through ``xgb.train`` with ``multi:softprob`` and a fixed
``num_class`` so the output always has ``n_classes`` columns, even when a class is
absent from the training split (XGBClassifier would refuse non-contiguous labels).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME
from trainer.evaluate import macro_f1
from trainer.loop import class_weights
from trainer.models.base import FitResult, Model, ProgressFn, check_inputs, check_labels, check_rows
from trainer.rows import Rows, as_rows, chunk_rows, chunks

WEIGHTS_FILE = "booster.ubj"

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "rounds": 60,
        "max_depth": 4,
        "eta": 0.3,
        "early_stopping": 10,
        "subsample": 0.9,
        "colsample_bytree": 0.8,
        "max_bin": 64,
    },
    "quick": {
        "rounds": 300,
        "max_depth": 6,
        "eta": 0.15,
        "early_stopping": 25,
        "subsample": 0.9,
        # Features drawn per split, not per tree: on a few hundred windows a tree that drew
        # the wrong 60 % of the features wasted its round (JapaneseVowels +1.3, BasicMotions
        # +6 points, synthetic 300 windows +1).
        "colsample_bytree": 1.0,
        "colsample_bynode": 0.3,
        "max_bin": 128,
        # Below ``small_rows`` training rows (a few hundred series: the UEA sets, the
        # small-data check) these replace the settings above, unless passed explicitly.
        # Fewer features per split decorrelate the trees, shallower trees overfit less,
        # and a lower min_child_weight lets a leaf hold a handful of series: with
        # softprob hessians p(1-p) <= 0.25, the default 1.0 needs >= 4 well-fitted rows
        # per leaf, which blocks splits on 8 rows a class (BasicMotions). Measured mean of
        # seeds 0-2, macro F1: JapaneseVowels 0.956 -> 0.969, BasicMotions 0.966 -> 1.000;
        # on the 7k-window store they cost gbt-oracle 2 points (realistic +1), hence the threshold.
        "small_rows": 1000,
        "small": {"max_depth": 4, "colsample_bynode": 0.1, "min_child_weight": 0.1},
    },
    "full": {
        "rounds": 1500,
        "max_depth": 8,
        "eta": 0.05,
        "early_stopping": 60,
        "subsample": 0.8,
        "colsample_bytree": 0.5,
        "max_bin": 256,
    },
}
REPORT_EVERY = 10  # boosting rounds between progress reports


class _Progress(xgb.callback.TrainingCallback):
    def __init__(self, rounds: int, progress: ProgressFn | None) -> None:
        self.rounds, self.progress = rounds, progress

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        if self.progress and (epoch + 1) % REPORT_EVERY == 0:
            loss = evals_log.get("val", {}).get("mlogloss", [float("nan")])[-1]
            self.progress({"epoch": epoch + 1, "epochs": self.rounds, "val_mlogloss": float(loss)})
        return False


class RowsIter(xgb.DataIter):
    """Rows (with labels and weights) to XGBoost ``step`` rows at a time, in order."""

    def __init__(
        self, rows: Rows, y: np.ndarray, w: np.ndarray, step: int, cache_prefix: str | None = None
    ) -> None:
        self.rows, self.y, self.w, self.step, self._at = rows, y, w, max(1, step), 0
        super().__init__(cache_prefix=cache_prefix, release_data=True)

    def next(self, input_data: Any) -> bool:
        if self._at >= len(self.rows):
            return False
        hi = min(self._at + self.step, len(self.rows))
        x = self.rows.take(np.arange(self._at, hi))
        if not np.isfinite(x).all():
            raise ValueError("gbt inputs: rows contain NaN or inf; the extractor must skip such windows")
        input_data(data=x, label=self.y[self._at : hi], weight=self.w[self._at : hi])
        self._at = hi
        return True

    def reset(self) -> None:
        self._at = 0


class GBT(Model):
    name = "gbt"
    input_kind = "summary"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int = 5,
        profile: str = "quick",
        seed: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(input_shape, n_classes, profile, seed, **overrides)
        self.booster: xgb.Booster | None = None
        self._explicit = frozenset(overrides)  # settings the small-data ones never replace

    profiles = PROFILE_CONFIG

    @classmethod
    def default_config(cls, profile: str) -> dict[str, Any]:
        return {**super().default_config(profile), "threads": None}

    def _params(self) -> dict[str, Any]:
        c = self.config
        return {
            "objective": "multi:softprob",
            "num_class": self.n_classes,
            "eval_metric": "mlogloss",
            "tree_method": "hist",
            "max_depth": c["max_depth"],
            "eta": c["eta"],
            "subsample": c["subsample"],
            "colsample_bytree": c["colsample_bytree"],
            "colsample_bynode": c.get("colsample_bynode", 1.0),  # demo/full and older checkpoints: off
            "max_bin": c["max_bin"],
            "min_child_weight": c.get("min_child_weight", 1.0),  # xgboost's default
            "seed": self.seed,
            "nthread": c["threads"] or os.cpu_count() or 1,
            "verbosity": 0,
        }

    def fit(
        self,
        x_tr: np.ndarray,
        y_tr: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        started = time.perf_counter()
        x_tr = check_rows(x_tr, self.input_shape, "train inputs")
        x_val = check_rows(x_val, self.input_shape, "validation inputs")
        y_tr = check_labels(y_tr, len(x_tr), self.n_classes, "train labels")
        y_val = check_labels(y_val, len(x_val), self.n_classes, "validation labels")
        if len(x_tr) < int(self.config.get("small_rows") or 0):
            # Into the config, so the checkpoint records what was trained.
            small = self.config.get("small") or {}
            self.config.update({k: v for k, v in small.items() if k not in self._explicit})
        # The same class balancing as the torch models' weighted cross-entropy.
        weight = class_weights(y_tr, self.n_classes).numpy()[y_tr]
        # Validation weighted the same way, so early stopping tracks the balanced loss that
        # macro F1 rewards rather than the majority classes' loss.
        w_val = class_weights(y_val, self.n_classes).numpy()[y_val]
        if isinstance(x_tr, np.ndarray):
            dtr = xgb.DMatrix(x_tr, label=y_tr, weight=weight)
            dval = xgb.DMatrix(x_val, label=y_val, weight=w_val)
        else:
            dtr, dval = self._streamed_matrices(x_tr, y_tr, weight, x_val, y_val, w_val)
        rounds = int(self.config["rounds"])
        log: dict[str, dict[str, list[float]]] = {}
        booster = xgb.train(
            self._params(),
            dtr,
            num_boost_round=rounds,
            evals=[(dval, "val")],
            evals_result=log,
            early_stopping_rounds=int(self.config["early_stopping"]),
            verbose_eval=False,
            callbacks=[_Progress(rounds, progress)],
        )
        best = int(getattr(booster, "best_iteration", booster.num_boosted_rounds() - 1))
        # Keep only the best-on-validation trees: predict, save and ONNX all see the same model.
        self.booster = booster[: best + 1]
        val_f1 = macro_f1(y_val, self.predict_rows(x_val).argmax(axis=1)) if len(x_val) else float("nan")
        losses = log.get("val", {}).get("mlogloss", [])
        history = [{"epoch": i + 1, "val_mlogloss": float(v)} for i, v in enumerate(losses)]
        if progress:
            progress({"epoch": best + 1, "epochs": rounds, "val_f1": val_f1, "best_val_f1": val_f1})
        self.fit_result = FitResult(
            best_epoch=best + 1,
            epochs_run=len(losses),
            best_val_f1=float(val_f1),
            seconds=time.perf_counter() - started,
            stopped="early_stopping" if len(losses) < rounds else "max_epochs",
            history=history,
        )
        self.calibrate(x_val, y_val)
        return self.fit_result

    def _streamed_matrices(
        self,
        x_tr: Rows,
        y_tr: np.ndarray,
        w_tr: np.ndarray,
        x_val: Rows,
        y_val: np.ndarray,
        w_val: np.ndarray,
    ) -> tuple[xgb.DMatrix, xgb.DMatrix]:
        """Train and validation matrices built chunk by chunk through ``xgboost.DataIter``.

        QuantileDMatrix keeps only the quantised matrix (one byte per feature at max_bin
        <= 256); when even that would pass half the memory budget, ExtMemQuantileDMatrix
        pages it to disk under a temporary directory."""
        budget = float(self.config.get("memory_mb") or 384) * 2**20
        step = chunk_rows(x_tr, budget / 8)
        threads = self.config.get("threads") or os.cpu_count() or 1
        ext = self.config.get("external_memory")
        if ext is None:
            ext = len(x_tr) * x_tr.row_shape[0] > budget / 2
        max_bin = int(self.config["max_bin"])
        if ext:
            self._ext_dir = tempfile.TemporaryDirectory(prefix="phasewatch-xgb-")
            prefix = os.path.join(self._ext_dir.name, "cache")
            it_tr = RowsIter(x_tr, y_tr, w_tr, step, cache_prefix=prefix + "-train")
            dtr = xgb.ExtMemQuantileDMatrix(it_tr, max_bin=max_bin, nthread=threads)
            it_val = RowsIter(x_val, y_val, w_val, step, cache_prefix=prefix + "-val")
            dval = xgb.ExtMemQuantileDMatrix(it_val, max_bin=max_bin, ref=dtr, nthread=threads)
        else:
            dtr = xgb.QuantileDMatrix(RowsIter(x_tr, y_tr, w_tr, step), max_bin=max_bin, nthread=threads)
            dval = xgb.QuantileDMatrix(
                RowsIter(x_val, y_val, w_val, step), max_bin=max_bin, ref=dtr, nthread=threads
            )
        return dtr, dval

    def predict_rows(self, x: np.ndarray | Rows, chunk: int = 65536) -> np.ndarray:
        """predict_proba over an array or Rows, ``chunk`` rows at a time."""
        rows = as_rows(x)
        parts = [self.predict_proba(c) for c in chunks(rows, chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def _need_booster(self) -> xgb.Booster:
        if self.booster is None:
            raise RuntimeError("gbt: not fitted or loaded yet")
        return self.booster

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self.input_shape, "gbt inputs")
        if len(x) == 0:
            return np.zeros((0, self.n_classes), np.float32)
        p = self._need_booster().predict(xgb.DMatrix(x))
        p = np.asarray(p, dtype=np.float32).reshape(len(x), self.n_classes)
        if self.inverse_temperature == 1.0:
            return p
        # softmax(beta * log p) = softmax(beta * margin): the graph's Log, Mul, Softmax in float32.
        with np.errstate(divide="ignore"):
            z = np.log(p) * np.float32(self.inverse_temperature)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def _save_weights(self, directory: Path) -> None:
        self._need_booster().save_model(str(directory / WEIGHTS_FILE))

    def _load_weights(self, directory: Path) -> None:
        self.booster = xgb.Booster()
        self.booster.load_model(str(directory / WEIGHTS_FILE))
        self.booster.set_param({"nthread": self.config.get("threads") or os.cpu_count() or 1})

    def to_onnx(self, path: Path | str, opset: int = 17) -> Path:
        """onnxmltools' converter (a Booster gives a plain float tensor, no ZipMap); one output."""
        import onnx
        from onnx import helper
        from onnxmltools import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # onnxmltools 1.16 refuses target_opset > 15 with onnx 1.23 (its version table ends
        # there); the graph it emits lives in ai.onnx.ml, so convert at its maximum and
        # declare the default domain (for our Identity rename) at the requested opset.
        model = convert_xgboost(
            self._need_booster(),
            initial_types=[(MODEL_INPUT_NAME, FloatTensorType([None, self.input_shape[0]]))],
        )
        default = [imp for imp in model.opset_import if imp.domain in ("", "ai.onnx")]
        if default:
            default[0].version = max(default[0].version, opset)
        else:  # a pure ai.onnx.ml graph; our Identity rename needs the default domain
            model.opset_import.append(helper.make_opsetid("", opset))
        graph = model.graph
        prob_out = next(o for o in graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
        source = prob_out.name
        if self.inverse_temperature != 1.0 and source == MODEL_OUTPUT_NAME:
            # The converter's own output takes the name; calibration's Softmax gets it instead.
            source = "uncalibrated_probabilities"
            for node in graph.node:
                node.output[:] = [source if o == prob_out.name else o for o in node.output]
                node.input[:] = [source if i == prob_out.name else i for i in node.input]
        if self.inverse_temperature != 1.0:
            # Temperature scaling folded into the graph: softmax(beta * log p).
            graph.initializer.append(
                helper.make_tensor("calibration_beta", onnx.TensorProto.FLOAT, [], [self.inverse_temperature])
            )
            graph.node.extend(
                [
                    helper.make_node("Log", [source], ["calibration_logp"], name="calibration_log"),
                    helper.make_node(
                        "Mul",
                        ["calibration_logp", "calibration_beta"],
                        ["calibration_z"],
                        name="calibration_mul",
                    ),
                    helper.make_node(
                        "Softmax", ["calibration_z"], ["calibration_p"], axis=1, name="calibration"
                    ),
                ]
            )
            source = "calibration_p"
        if source != MODEL_OUTPUT_NAME:
            graph.node.append(
                helper.make_node("Identity", [source], [MODEL_OUTPUT_NAME], name=MODEL_OUTPUT_NAME)
            )
        # One output, as for the torch models: the class label is argmax(probabilities).
        del graph.output[:]
        graph.output.append(
            helper.make_tensor_value_info(MODEL_OUTPUT_NAME, onnx.TensorProto.FLOAT, [None, self.n_classes])
        )
        onnx.checker.check_model(model)
        path.write_bytes(model.SerializeToString())
        return path
