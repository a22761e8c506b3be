"""cnn: a 1-D convolutional net over time on the (N, C, T) tensor, channels as input planes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.models.torch_base import TorchModel

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "gain_jitter": 0.3,
        "width": 32,
        "blocks": 2,
        "kernel": 5,
        "dropout": 0.1,
        "epochs": 6,
        "batch_size": 128,
        "lr": 3e-3,
        "patience": 3,
        "min_steps": 150,
        "max_seconds": 25,
    },
    "quick": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "width": 64,
        "blocks": 3,
        "kernel": 5,
        "dropout": 0.2,
        "epochs": 25,
        "batch_size": 128,
        "lr": 2e-3,
        "patience": 6,
        "min_steps": 600,
        "max_seconds": 150,
    },
    "full": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "width": 96,
        "blocks": 4,
        "kernel": 7,
        "dropout": 0.3,
        "epochs": 80,
        "batch_size": 128,
        "lr": 1e-3,
        "patience": 12,
        "min_steps": 2000,
        "max_seconds": None,
    },
}


MIN_STEPS_TO_POOL = 8  # a block halves time only while at least this many steps remain


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, pool: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm1d(c_out)
        self.pool = nn.MaxPool1d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class CNNBody(nn.Module):
    def __init__(
        self,
        channels: int,
        n_classes: int,
        width: int,
        blocks: int,
        kernel: int,
        dropout: float,
        steps: int = 100,
    ) -> None:
        super().__init__()
        widths = [channels] + [width * min(2**i, 2) for i in range(blocks)]
        # Any length builds: short windows stop halving time before it runs out.
        pools = [steps // 2**i >= MIN_STEPS_TO_POOL for i in range(blocks)]
        self.blocks = nn.Sequential(
            *(ConvBlock(a, b, kernel, p) for a, b, p in zip(widths, widths[1:], pools))
        )
        self.drop = nn.Dropout(dropout)
        # Mean and max over time: "how much on average" and "did a burst happen".
        self.head = nn.Linear(2 * widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        return self.head(self.drop(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)))


class CNN(TorchModel):
    name = "cnn"
    input_kind = "tensor"
    profiles = PROFILE_CONFIG

    def build_body(self) -> nn.Module:
        c = self.config
        return CNNBody(
            self.input_shape[0],
            self.n_classes,
            c["width"],
            c["blocks"],
            c["kernel"],
            c["dropout"],
            self.input_shape[1],
        )
