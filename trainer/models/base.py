"""The one model interface: fit, predict_proba, save/load with a schema hash, to_onnx.

Models know nothing of episodes. They take any float32 ``(N, F)`` summary set or
``(N, C, T)`` tensor set with integer labels in ``range(n_classes)`` and raw feature
values: each torch model starts with :class:`SignedLogStandardize`, fitted on the train
set, so the exported graph takes exactly what the extractor produces.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

BUDGETS: tuple[str, ...] = ("demo", "quick", "full")  # training budgets (not schema.vocab.PROFILES)
CONFIG_FILE = "model.json"

# What a model reports after every epoch (torch) or every boosting checkpoint (gbt):
# {"epoch": int, "epochs": int, "train_loss": float, "val_f1": float, "best_val_f1": float, "lr": float}
ProgressFn = Callable[[dict[str, Any]], None]


class SchemaMismatch(RuntimeError):
    """A checkpoint was written under another schema hash than the one expected."""

    def __init__(self, path: Path, found: str, expected: str) -> None:
        super().__init__(
            f"{path}: checkpoint was trained under schema hash {found} but this code expects "
            f"schema hash {expected}; retrain the model (or use the matching code version)"
        )
        self.path, self.found, self.expected = path, found, expected


@dataclass
class FitResult:
    best_epoch: int  # 1-based epoch (gbt: boosting round) whose weights were kept
    epochs_run: int
    best_val_f1: float  # validation macro F1 of the kept weights
    seconds: float
    stopped: str  # "early_stopping" | "max_epochs" | "time_budget" | "closed_form" (rocket)
    history: list[dict[str, float]] = field(default_factory=list)
    # Temperature scaling on validation (Model.calibrate): temperature, val NLL/ECE before/after.
    calibration: dict[str, float] | None = None


def check_inputs(x: np.ndarray, input_shape: tuple[int, ...], what: str) -> np.ndarray:
    """Shape/dtype/finite checks with a message that says what was expected."""
    x = np.asarray(x)
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{what}: expected shape (N, {', '.join(map(str, input_shape))}), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} rows contain NaN or inf; the extractor must skip such windows")
    return x


def check_rows(x: Any, input_shape: tuple[int, ...], what: str) -> Any:
    """check_inputs for an array; for trainer.rows.Rows (read later, chunk by chunk) the row
    shape now, finiteness as the rows are read."""
    if isinstance(x, np.ndarray) or not hasattr(x, "take"):
        return check_inputs(x, input_shape, what)
    if tuple(x.row_shape) != tuple(input_shape):
        raise ValueError(
            f"{what}: expected rows of shape {tuple(input_shape)}, got rows of shape {tuple(x.row_shape)}"
        )
    return x


def check_labels(y: np.ndarray, n: int, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{what}: expected {n} labels, got shape {y.shape}")
    y = y.astype(np.int64, copy=False)
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what}: labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    return y


class Model(ABC):
    """Common state and the save/load envelope; subclasses add the learner."""

    name: ClassVar[str]
    input_kind: ClassVar[str]  # "summary" (N, F) or "tensor" (N, C, T)
    profiles: ClassVar[dict[str, dict[str, Any]]]  # profile -> config: sizes, epochs, budgets
    # Config keys added after checkpoints were written, with the value those checkpoints were
    # trained under: a loaded config that lacks one gets this, not today's profile default.
    legacy_config: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int = 5,
        profile: str = "quick",
        seed: int = 0,
        **overrides: Any,
    ) -> None:
        if profile not in BUDGETS:
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(BUDGETS)}")
        want = 1 if self.input_kind == "summary" else 2
        if len(input_shape) != want:
            raise ValueError(
                f"{self.name} reads {self.input_kind} input of {want} dims per row, "
                f"got input_shape {tuple(input_shape)}"
            )
        self.input_shape = tuple(int(d) for d in input_shape)
        self.n_classes = int(n_classes)
        self.profile = profile
        self.seed = int(seed)
        self.config: dict[str, Any] = {**self.default_config(profile), **overrides}
        self.fit_result: FitResult | None = None

    @classmethod
    def default_config(cls, profile: str) -> dict[str, Any]:
        return dict(cls.profiles[profile])

    @abstractmethod
    def fit(
        self,
        x_tr: np.ndarray,
        y_tr: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        progress: ProgressFn | None = None,
    ) -> FitResult: ...

    @abstractmethod
    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def to_onnx(self, path: Path | str, opset: int = 17) -> Path: ...

    @abstractmethod
    def _save_weights(self, directory: Path) -> None: ...

    @abstractmethod
    def _load_weights(self, directory: Path) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    @property
    def inverse_temperature(self) -> float:
        """beta = 1/T that predict_proba and the ONNX graph apply to the logits (1.0: uncalibrated)."""
        return float(self.config.get("inverse_temperature", 1.0))

    def predict_rows(self, x: Any, chunk: int | None = None) -> np.ndarray:
        """predict_proba over an array or trainer.rows.Rows, ``chunk`` rows at a time (default:
        a quarter of the memory budget, as the evaluation's chunks; 65,536 oracle tensor rows
        are 1.2 GB, so calibrating on a 39k-window validation split held all of it, 0.7 GB, at once)."""
        from trainer.rows import as_rows, chunk_rows, chunks

        rows = as_rows(x)
        if chunk is None:
            chunk = chunk_rows(rows, float(self.config.get("memory_mb") or 384) * 2**20 / 4)
        parts = [self.predict_proba(c) for c in chunks(rows, chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def calibrate(self, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        """Temperature scaling on the validation split (every ``fit`` ends with it).

        Fits beta on the log loss of ``softmax(beta * log p)``, where p is the uncalibrated
        output, i.e. ``softmax(beta * logits)``; accuracy and F1 do not move.
        """
        from trainer.calibrate import ece, fit_inverse_temperature, log_probs, nll, rescale

        self.config["inverse_temperature"] = 1.0
        p = self.predict_rows(x_val)
        beta = fit_inverse_temperature(log_probs(p), y_val)
        self.config["inverse_temperature"] = beta
        q = rescale(p, beta)  # what predict_proba now returns, without a second pass
        cal = {
            "temperature": 1.0 / beta,
            "val_nll_before": nll(p, y_val),
            "val_nll_after": nll(q, y_val),
            "val_ece_before": ece(p, y_val),
            "val_ece_after": ece(q, y_val),
        }
        if self.fit_result is not None:
            self.fit_result.calibration = cal
        return cal

    def save(self, directory: Path | str, *, schema_hash: str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_weights(directory)
        doc = {
            "model": self.name,
            "input_kind": self.input_kind,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "profile": self.profile,
            "seed": self.seed,
            "config": self.config,
            "schema_hash": schema_hash,
            "fit": asdict(self.fit_result) if self.fit_result else None,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        return directory


def read_checkpoint_doc(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint here (model.json missing)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
