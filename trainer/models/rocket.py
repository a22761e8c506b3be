"""rocket: MiniRocket-style random convolution features with a ridge head on the (N, C, T) tensor.

After Dempster et al., *MiniRocket* (KDD 2021): 84 fixed kernels of length 9 (weights -1
and 2, three 2s), each at several dilations and over a random subset of channels; every
kernel/dilation output is compared with biases drawn from quantiles of its own output on
training windows, and the feature is the proportion of positive values (PPV) over time.
Nothing in the transform is learnt by gradient descent; the head is a ridge regression on
the standardised features (class-weighted, closed form, streamed in batches so the number
of windows is not bounded by memory), alpha picked on validation macro F1, and (as for
every model) a softmax temperature fitted on validation log loss. Everything folds into one
torch module, so the ONNX graph is the signed log, one 1x1 Conv selecting the channels of
every kernel and dilation, then per dilation a grouped Conv, Sub, Clip and ReduceMean on
the (N, kernels, biases, T) tensor; Gemm, Softmax.

Two departures from the paper, both for the exported graph: the PPV is soft, a ramp
``mean(clip((conv - bias) / (4 tau) + 1/2, 0, 1))`` (the hard sigmoid with the slope of
``sigmoid((conv - bias) / tau)`` at the bias; ``ppv="sigmoid"`` is that sigmoid) with
``tau`` a small fraction (``soft``) of the output's spread, because a hard ``conv > bias``
flips on float rounding between torch and ONNX Runtime; and every convolution is
zero-padded to the window length (the paper alternates padded and unpadded), so any
length from 9 steps up builds. The standardisation and 1 / (4 tau) are folded into the
select Conv's weights, so the only work on the large tensors is a Sub, the Clip and the
mean (issue 13: benchmarks/bench_rocket.py times the graph against the one before).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from trainer.evaluate import macro_f1
from trainer.loop import class_weights
from trainer.models.base import FitResult, Model, ProgressFn, check_inputs, check_labels, check_rows
from trainer.models.torch_base import SignedLogStandardize, TorchWeights, signed_log
from trainer.rows import Gather

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "features": 1008,  # total PPV features (rounded to whole biases per kernel/dilation)
        "max_dilations": 3,  # dilations spread exponentially up to (T - 1) / 8
        "bias_windows": 32,  # training windows whose outputs set the biases
        "soft": 0.025,  # PPV width tau, as a share of each output's standard deviation (DECISIONS)
        "ppv": "ramp",  # the soft step: "ramp" (hard sigmoid, DECISIONS) or "sigmoid"
        "alphas": (0.1, 1.0, 10.0, 100.0),  # ridge penalties tried, times mean feature variance
        "batch_size": 256,
    },
    "quick": {
        # Not fewer (issue 13): 2016 over 4 dilations held the store's held-out F1 at ~1/3 of
        # the graph's time but lost ~0.05 F1 on 300-window training sets (DECISIONS).
        "features": 4032,
        "max_dilations": 8,
        "bias_windows": 64,
        "soft": 0.025,
        "ppv": "ramp",
        "alphas": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
        "batch_size": 256,
    },
    "full": {
        "features": 9996,  # the paper's default
        "max_dilations": 16,
        "bias_windows": 128,
        "soft": 0.025,
        "ppv": "ramp",
        "alphas": (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
        "batch_size": 256,
    },
}
KERNEL_LENGTH = 9
# The 84 kernels: every choice of 3 of 9 positions weighted 2, the other six -1 (sum 0).
KERNEL_INDICES = tuple(itertools.combinations(range(KERNEL_LENGTH), 3))
N_KERNELS = len(KERNEL_INDICES)  # 84
MAX_CHANNELS_PER_KERNEL = 9


def dilations_for(steps: int, max_dilations: int) -> list[int]:
    """Exponentially spaced dilations up to the one whose receptive field fits the window."""
    top = max(0.0, math.log2(max(1, steps - 1) / (KERNEL_LENGTH - 1)))
    grid = np.floor(2.0 ** np.linspace(0, top, max(1, max_dilations))).astype(int)
    return sorted({int(d) for d in grid if d >= 1})


def low_discrepancy(n: int) -> np.ndarray:
    """Quantile levels in (0, 1), evenly spread: the golden-ratio sequence MiniRocket uses."""
    return (np.arange(1, n + 1) * ((math.sqrt(5) + 1) / 2)) % 1


PPV_KINDS = ("ramp", "sigmoid")


class RocketNet(nn.Module):
    """Raw (N, C, T) -> logits (N, n_classes). Kernels, biases and widths are fixed buffers.

    ``ppv`` is the soft step each conv output is compared with its biases through: "ramp"
    (the default) is the hard sigmoid with the sigmoid's slope at the bias,
    ``clip((conv - bias) / (4 tau) + 1/2, 0, 1)``; "sigmoid" is ``sigmoid((conv - bias) / tau)``,
    kept for checkpoints written before the ramp (their config has no "ppv").
    """

    def __init__(
        self,
        channels: int,
        steps: int,
        n_classes: int,
        features: int,
        max_dilations: int,
        seed: int,
        ppv: str = "ramp",
    ) -> None:
        super().__init__()
        if ppv not in PPV_KINDS:
            raise ValueError(f"rocket: ppv {ppv!r} is not one of {', '.join(PPV_KINDS)}")
        self.ppv = ppv
        self.norm = SignedLogStandardize(channels, tensor=True)
        self.dilations = dilations_for(steps, max_dilations)
        self.n_bias = max(1, features // (N_KERNELS * len(self.dilations)))
        rng = np.random.default_rng(seed)
        base = np.full((N_KERNELS, KERNEL_LENGTH), -1.0, np.float32)
        for k, idx in enumerate(KERNEL_INDICES):
            base[k, list(idx)] = 2.0
        # One kernel's weights are the same on every channel it reads, so the convolution is the
        # 9-tap kernel over the sum of its channels: a 1x1 Conv (84 x C of 0/1) then a grouped
        # Conv, ~30x less work than a dense (84, C, 9) kernel that is mostly zeros.
        self.register_buffer("kernels", torch.from_numpy(base[:, None, :]))  # (84, 1, 9)
        for i, _ in enumerate(self.dilations):
            # Each kernel/dilation reads a random subset of 1 to 9 channels, log-uniform in size.
            sel = np.zeros((N_KERNELS, channels, 1), np.float32)
            top = math.log2(min(channels, MAX_CHANNELS_PER_KERNEL) + 1)
            for k in range(N_KERNELS):
                n_ch = int(2 ** rng.uniform(0, top))
                sel[k, rng.choice(channels, size=max(1, n_ch), replace=False)] = 1.0
            self.register_buffer(f"select{i}", torch.from_numpy(sel))
            self.register_buffer(f"bias{i}", torch.zeros(N_KERNELS, self.n_bias, 1))
            self.register_buffer(f"inv_tau{i}", torch.ones(N_KERNELS, 1, 1))
        self.head = nn.Linear(N_KERNELS * self.n_bias * len(self.dilations), n_classes)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def n_features(self) -> int:
        return self.head.in_features

    def conv(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Raw (N, C, T) -> every kernel's output at each dilation: D tensors (N, 84, 1, T).

        One 1x1 Conv selects the channels of all dilations at once, with the standardisation
        and ``scale`` (shape (D * 84,); the kernels are linear) folded into its weights and
        bias; then one grouped Conv per dilation. The grouped Convs are 2-D over (1, T): ONNX
        Runtime's x86 build runs a 2-D depthwise Conv in its blocked (NCHWc) layout, ~2x faster
        than the 1-D one; elsewhere both are the same code (benchmarks/bench_rocket.py).
        """
        sel = torch.cat([getattr(self, f"select{i}") for i in range(len(self.dilations))])[:, :, 0]
        if scale is not None:
            sel = sel * scale[:, None]
        weight = sel * self.norm.inv_std[:, 0]  # (D * 84, C): sel @ ((g - mean) * inv_std)
        offset = -(weight @ self.norm.mean[:, 0])
        summed = nn.functional.conv1d(signed_log(x), weight[:, :, None], offset).unsqueeze(2)
        kernels = self.kernels.unsqueeze(2)  # (84, 1, 1, 9)
        out = []
        for i, d in enumerate(self.dilations):
            part = summed[:, i * N_KERNELS : (i + 1) * N_KERNELS]
            pad = (KERNEL_LENGTH - 1) // 2 * d
            out.append(nn.functional.conv2d(part, kernels, None, 1, (0, pad), (1, d), groups=N_KERNELS))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> soft PPVs (N, D * 84 * B), dilation-major, then kernel, then bias."""
        d = len(self.dilations)
        inv_tau = torch.cat([getattr(self, f"inv_tau{i}") for i in range(d)])  # (D * 84, 1, 1)
        # The width folds into the kernels and the biases, so only a Sub, the step and the
        # mean touch the (N, 84, B, T) tensor of each dilation, the bulk of the graph's work.
        # One dilation at a time, not all at once: the wall time was ~15 % lower (fewer bytes
        # in flight; bench_rocket.py), and a Pi's 1 MB L2 holds one dilation's, not all six.
        ramp = self.ppv == "ramp"
        outs = self.conv(x, inv_tau.flatten() / 4 if ramp else inv_tau.flatten())
        feats = []
        for i, v in enumerate(outs):  # v: (N, 84, 1, T)
            it, bias = getattr(self, f"inv_tau{i}"), getattr(self, f"bias{i}")  # (84, 1, 1), (84, B, 1)
            if ramp:
                s = torch.clamp(v - (bias * it / 4 - 0.5), 0.0, 1.0)
            else:
                s = torch.sigmoid(v - bias * it)
            feats.append(s.mean(dim=3))  # (N, 84, B)
        return torch.cat(feats, dim=1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Rocket(TorchWeights, Model):
    name = "rocket"
    input_kind = "tensor"
    profiles = PROFILE_CONFIG
    legacy_config: ClassVar[dict[str, Any]] = {"ppv": "sigmoid"}  # checkpoints before the ramp

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int = 5,
        profile: str = "quick",
        seed: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(input_shape, n_classes, profile, seed, **overrides)
        c = self.config
        self.config["alphas"] = [float(a) for a in c["alphas"]]  # JSON round trip keeps equality
        self.net = RocketNet(
            *self.input_shape,
            n_classes,
            c["features"],
            c["max_dilations"],
            self.seed,
            c["ppv"],
        )

    # --- fitting ---------------------------------------------------------------------------

    @torch.no_grad()
    def _fit_biases(self, x: np.ndarray, rng: np.random.Generator) -> None:
        net = self.net
        pick = rng.choice(len(x), size=min(len(x), int(self.config["bias_windows"])), replace=False)
        raw = torch.from_numpy(np.ascontiguousarray(x[np.sort(pick)]))
        levels = torch.from_numpy(low_discrepancy(net.n_bias)).float()
        for i, out in enumerate(net.conv(raw)):  # unscaled (windows, 84, 1, T)
            v = out.transpose(0, 1).reshape(N_KERNELS, -1)
            q = torch.quantile(v, levels, dim=1).T  # (84, B)
            std = v.std(dim=1).clamp_min(1e-3)  # a silent channel subset still gets a finite width
            getattr(net, f"bias{i}").copy_(q[:, :, None])
            getattr(net, f"inv_tau{i}").copy_((1.0 / (self.config["soft"] * std))[:, None, None])

    @torch.no_grad()
    def _features(self, x: np.ndarray) -> np.ndarray:
        bs = int(self.config["batch_size"])
        xt = torch.from_numpy(np.ascontiguousarray(x))
        parts = [self.net.features(xt[i : i + bs]).double().numpy() for i in range(0, len(x), bs)]
        return np.concatenate(parts) if parts else np.zeros((0, self.net.n_features))

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
        if not isinstance(x_val, np.ndarray):  # trainer.rows.Rows: validation is read once, whole
            x_val = x_val.take(np.arange(len(x_val)))
        y_tr = check_labels(y_tr, len(x_tr), self.n_classes, "train labels")
        y_val = check_labels(y_val, len(x_val), self.n_classes, "validation labels")
        if len(x_tr) < 2 or len(x_val) < 1:
            raise ValueError(
                f"rocket: need at least 2 train and 1 validation rows, got {len(x_tr)}, {len(x_val)}"
            )
        if self.config.get("threads"):
            torch.set_num_threads(int(self.config["threads"]))
        rng = np.random.default_rng(self.seed)
        self.net.norm.fit(x_tr)
        if not isinstance(x_tr, np.ndarray):  # Rows: the batches below read only their rows
            x_tr = Gather(x_tr)
        self._fit_biases(x_tr, rng)

        # Weighted sufficient statistics, one batch of features at a time.
        p, k = self.net.n_features, self.n_classes
        w_cls = class_weights(y_tr, k).numpy().astype(np.float64)
        gram, xty = np.zeros((p, p)), np.zeros((p, k))
        sx, sy, sw = np.zeros(p), np.zeros(k), 0.0
        bs = int(self.config["batch_size"])
        solver = self.config.get("solver", "auto")
        dual = solver == "dual" or (solver == "auto" and len(x_tr) < p)  # fewer windows than features
        kept: list[np.ndarray] = []
        for i in range(0, len(x_tr), bs):
            f = self._features(x_tr[i : i + bs])
            if dual:
                kept.append(f)
            yb = np.eye(k)[y_tr[i : i + bs]]
            w = w_cls[y_tr[i : i + bs]]
            fw = f * w[:, None]
            gram += fw.T @ f
            xty += fw.T @ yb
            sx += fw.sum(axis=0)
            sy += (yb * w[:, None]).sum(axis=0)
            sw += float(w.sum())
            if progress:
                progress({"epoch": min(i + bs, len(x_tr)), "epochs": len(x_tr), "stage": "features"})
        mu, my = sx / sw, sy / sw
        cov = gram / sw - np.outer(mu, mu)  # weighted feature covariance
        cxy = xty / sw - np.outer(mu, my)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        sd = np.where(sd > 1e-8, sd, 1.0)
        cov_s, cxy_s = cov / np.outer(sd, sd), cxy / sd[:, None]

        f_val = (self._features(x_val) - mu) / sd
        best: tuple[float, float, np.ndarray] | None = None
        history: list[dict[str, float]] = []
        if dual:
            # (A'A/sw + aI)^-1 A'B/sw = A'(AA'/sw + aI)^-1 B/sw, A = sqrt(w) * standardised features
            sqrt_w = np.sqrt(w_cls[y_tr])[:, None]
            a_mat = sqrt_w * ((np.concatenate(kept) - mu) / sd)  # (N, p)
            b_mat = sqrt_w * (np.eye(k)[y_tr] - my)  # (N, k)
            gram_n = a_mat @ a_mat.T / sw  # (N, N)
        for alpha in self.config["alphas"]:
            if dual:
                coef = a_mat.T @ np.linalg.solve(gram_n + alpha * np.eye(len(gram_n)), b_mat) / sw
            else:
                coef = np.linalg.solve(cov_s + alpha * np.eye(p), cxy_s)  # (p, k); mean variance 1
            f1 = macro_f1(y_val, (f_val @ coef + my).argmax(axis=1))
            history.append({"alpha": alpha, "val_f1": f1})
            if best is None or f1 > best[0] + 1e-9:
                best = (f1, alpha, coef)
        assert best is not None
        f1, alpha, coef = best
        intercept = my  # the centred regression's intercept on centred features
        # Fold standardisation and ridge into one Linear: logits = ridge scores.
        weight = (coef / sd[:, None]).T  # (k, p)
        bias = intercept - (mu / sd) @ coef
        self.net.head.weight.copy_(torch.from_numpy(weight).float())
        self.net.head.bias.copy_(torch.from_numpy(bias).float())
        self.config["alpha"] = float(alpha)
        if progress:
            progress({"epoch": 1, "epochs": 1, "val_f1": f1, "best_val_f1": f1, "alpha": alpha})
        self.fit_result = FitResult(
            best_epoch=1,
            epochs_run=1,
            best_val_f1=float(f1),
            seconds=time.perf_counter() - started,
            stopped="closed_form",
            history=history,
        )
        self.calibrate(x_val, y_val)  # ridge scores have no scale of their own: this sets it
        return self.fit_result

    # --- inference, checkpoints, export ----------------------------------------------------

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self.input_shape, "rocket inputs")
        if len(x) == 0:
            return np.zeros((0, self.n_classes), np.float32)
        bs = int(self.config["batch_size"])
        xt = torch.from_numpy(np.ascontiguousarray(x))
        self.net.eval()
        beta = torch.tensor(self.inverse_temperature)
        out = [torch.softmax(self.net(xt[i : i + bs]) * beta, dim=-1) for i in range(0, len(x), bs)]
        return torch.cat(out).numpy().astype(np.float32)
