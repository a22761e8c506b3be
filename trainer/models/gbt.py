"""gbt: gradient-boosted trees (XGBoost, hist) on the summary features (N, F).

Trees are invariant to monotone rescaling, so gbt reads raw features with no
normalisation. Trained through ``xgb.train`` with ``multi:softprob`` and a fixed
``num_class`` so the output always has ``n_classes`` columns, even when a class is
absent from the training split (XGBClassifier would refuse non-contiguous labels).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME
from trainer.evaluate import macro_f1
from trainer.loop import class_weights
from trainer.models.base import FitResult, Model, ProgressFn, check_inputs, check_labels

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
        "colsample_bytree": 0.6,
        "max_bin": 128,
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
            "max_bin": c["max_bin"],
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
        x_tr = check_inputs(x_tr, self.input_shape, "train inputs")
        x_val = check_inputs(x_val, self.input_shape, "validation inputs")
        y_tr = check_labels(y_tr, len(x_tr), self.n_classes, "train labels")
        y_val = check_labels(y_val, len(x_val), self.n_classes, "validation labels")
        # The same class balancing as the torch models' weighted cross-entropy.
        weight = class_weights(y_tr, self.n_classes).numpy()[y_tr]
        dtr = xgb.DMatrix(x_tr, label=y_tr, weight=weight)
        # Validation weighted the same way, so early stopping tracks the balanced loss that
        # macro F1 rewards rather than the majority classes' loss.
        dval = xgb.DMatrix(x_val, label=y_val, weight=class_weights(y_val, self.n_classes).numpy()[y_val])
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
        val_f1 = macro_f1(y_val, self.predict(x_val)) if len(x_val) else float("nan")
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
