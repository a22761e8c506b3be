"""The torch half of the model interface: input normalisation, fit via the one loop, ONNX."""

from __future__ import annotations

import io
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schema.artifacts import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME
from schema.channels import SUMMARY_STATS
from trainer.loop import LoopConfig, predict_logits, train_loop
from trainer.models.base import FitResult, Model, ProgressFn, check_inputs, check_labels, check_rows
from trainer.rows import Rows, as_rows, chunk_rows, sample_positions

WEIGHTS_FILE = "weights.pt"
NORM_MAX_ROWS = 200_000  # normalisation constants from at most this many train rows (a seeded sample)


def signed_log(x: torch.Tensor) -> torch.Tensor:
    # log(1 + |x|) rather than log1p: the ONNX graph computes Log(Add(1, Abs)) and the
    # two sides must agree to the last bit, not just to float32 rounding of log1p.
    return torch.sign(x) * torch.log(1.0 + torch.abs(x))


class SignedLogStandardize(nn.Module):
    """sign(x)*log(1+|x|), then (z - mean) / std with train-set constants kept as buffers.

    Raw channels span 0-100 % and 1e7 B/s; the log compresses rates, the standardisation
    centres each channel (tensor input: per channel over all steps; summary: per feature).
    The constants are buffers, so they travel in the checkpoint and the exported graph.
    """

    def __init__(self, n_features: int, tensor: bool) -> None:
        super().__init__()
        shape = (n_features, 1) if tensor else (n_features,)
        self.tensor = tensor
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("inv_std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: np.ndarray | Rows, max_rows: int | None = NORM_MAX_ROWS, seed: int = 0) -> None:
        """Constants from a streaming pass (chunks merged as Chan et al.) over the rows, or over
        a seeded sample of ``max_rows`` of them when there are more."""
        axes = (0, 2) if self.tensor else (0,)
        rows = as_rows(x)
        pos = sample_positions(len(rows), max_rows, seed)
        step = chunk_rows(rows, 64 * 2**20)
        n, mean, m2 = 0, None, None
        for lo in range(0, len(pos), step):
            chunk = rows.take(pos[lo : lo + step])
            if not np.isfinite(chunk).all():
                raise ValueError(
                    "train inputs: rows contain NaN or inf; the extractor must skip such windows"
                )
            z = signed_log(torch.from_numpy(chunk)).double()
            k = z.numel() // z.shape[1]
            c_mean, c_m2 = z.mean(dim=axes), z.var(dim=axes, correction=0) * k
            if mean is None:
                n, mean, m2 = k, c_mean, c_m2
            else:
                delta = c_mean - mean
                mean = mean + delta * k / (n + k)
                m2 = m2 + c_m2 + delta**2 * n * k / (n + k)
                n += k
        assert mean is not None and m2 is not None, "no rows to fit the normalisation on"
        std = torch.sqrt(m2 / n)
        # A constant feature (std 0) is passed through centred, not blown up.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.mean.copy_(mean.float().reshape(self.mean.shape))
        self.inv_std.copy_((1.0 / std).float().reshape(self.inv_std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (signed_log(x) - self.mean) * self.inv_std


class WithSoftmax(nn.Module):
    """What is exported: raw features in, calibrated class probabilities out.

    ``beta`` = 1/T of temperature scaling (trainer.calibrate), folded into the graph as one Mul.
    """

    def __init__(self, net: nn.Module, beta: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("beta", torch.tensor(float(beta)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(features) * self.beta, dim=-1)


class TorchWeights:
    """Weights on disk and the ONNX graph of any model whose network is ``self.net``
    (the loop-trained ones below and rocket); calibration folded in as ``beta``."""

    net: nn.Module
    input_shape: tuple[int, ...]
    inverse_temperature: float

    def _save_weights(self, directory: Path) -> None:
        torch.save(self.net.state_dict(), directory / WEIGHTS_FILE)

    def _load_weights(self, directory: Path) -> None:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval()

    def to_onnx(self, path: Path | str, opset: int = 17) -> Path:
        return export_onnx(self.net, self.input_shape, path, opset, beta=self.inverse_temperature)


class TorchModel(TorchWeights, Model):
    """A torch network ``norm -> body -> logits`` trained by :func:`trainer.loop.train_loop`."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int = 5,
        profile: str = "quick",
        seed: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(input_shape, n_classes, profile, seed, **overrides)
        if self.input_kind == "summary" and "gain_group" not in self.config:
            # The extractor's summary layout is channel-major (feature c*k + s), and every
            # statistic of a channel scales with its gain; other layouts jitter per feature.
            k = len(SUMMARY_STATS)
            self.config["gain_group"] = k if self.input_shape[0] % k == 0 else 1
        torch.manual_seed(self.seed)  # weight init is part of "same seed, same model"
        self.norm = SignedLogStandardize(self.input_shape[0], tensor=self.input_kind == "tensor")
        self.net = nn.Sequential(self.norm, self.build_body())

    @abstractmethod
    def build_body(self) -> nn.Module:
        """Standardised input (N, *input_shape) -> logits (N, n_classes)."""

    def fit(
        self,
        x_tr: np.ndarray,
        y_tr: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        x_tr = check_rows(x_tr, self.input_shape, "train inputs")
        x_val = check_rows(x_val, self.input_shape, "validation inputs")
        y_tr = check_labels(y_tr, len(x_tr), self.n_classes, "train labels")
        y_val = check_labels(y_val, len(x_val), self.n_classes, "validation labels")
        if len(x_tr) < 2 or len(x_val) < 1:
            raise ValueError(
                f"{self.name}: need at least 2 train and 1 validation rows, got {len(x_tr)} and {len(x_val)}"
            )
        self.norm.fit(x_tr, seed=self.seed)
        cfg = LoopConfig.from_config(self.config, seed=self.seed)
        self.fit_result = train_loop(self.net, x_tr, y_tr, x_val, y_val, cfg, self.n_classes, progress)
        self.calibrate(x_val, y_val)
        return self.fit_result

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self.input_shape, f"{self.name} inputs")
        if len(x) == 0:
            return np.zeros((0, self.n_classes), np.float32)
        logits = predict_logits(self.net, torch.from_numpy(np.ascontiguousarray(x)), torch.device("cpu"))
        scaled = torch.from_numpy(logits) * torch.tensor(self.inverse_temperature)  # as the graph's Mul
        return torch.softmax(scaled, dim=-1).numpy().astype(np.float32)


def export_onnx(
    net: nn.Module, input_shape: tuple[int, ...], path: Path | str, opset: int = 17, beta: float = 1.0
) -> Path:
    """Classic TorchScript exporter: plain ONNX ops (GRU/LSTM as the ONNX RNN ops), no onnxscript."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = WithSoftmax(net, beta).eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and its batch-size note for RNNs
        # (our initial states are built from the input's shape, so any batch works).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            buf,
            input_names=[MODEL_INPUT_NAME],
            output_names=[MODEL_OUTPUT_NAME],
            dynamic_axes={MODEL_INPUT_NAME: {0: "batch"}, MODEL_OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    path.write_bytes(buf.getvalue())
    return path
