"""gru and lstm: a recurrent net over time on the (N, C, T) tensor.

Steps are averaged in pairs first (``pool``): 5 Hz still resolves every channel's
dynamics and halves the sequential work, which is what costs on a 2-core CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.models.torch_base import TorchModel

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "gain_jitter": 0.3,
        "hidden": 32,
        "layers": 1,
        "pool": 4,
        "dropout": 0.1,
        "epochs": 5,
        "batch_size": 128,
        "lr": 3e-3,
        "patience": 3,
        "max_seconds": 30,
    },
    "quick": {
        "gain_jitter": 0.3,
        "hidden": 64,
        "layers": 1,
        "pool": 2,
        "dropout": 0.2,
        "epochs": 20,
        "batch_size": 128,
        "lr": 2e-3,
        "patience": 5,
        "max_seconds": 100,
    },
    "full": {
        "gain_jitter": 0.3,
        "hidden": 128,
        "layers": 2,
        "pool": 1,
        "dropout": 0.3,
        "epochs": 60,
        "batch_size": 128,
        "lr": 1e-3,
        "patience": 10,
        "max_seconds": None,
    },
}


class RNNBody(nn.Module):
    def __init__(
        self, cell: str, channels: int, n_classes: int, hidden: int, layers: int, pool: int, dropout: float
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool1d(pool) if pool > 1 else nn.Identity()
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            channels, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.drop = nn.Dropout(dropout)
        # Last state (where the window ends) and mean state (what the window held).
        self.head = nn.Linear(2 * hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.rnn(self.pool(x).transpose(1, 2))  # (N, T', hidden)
        return self.head(self.drop(torch.cat([seq[:, -1], seq.mean(dim=1)], dim=1)))


class _RNNModel(TorchModel):
    input_kind = "tensor"
    profiles = PROFILE_CONFIG

    def build_body(self) -> nn.Module:
        c = self.config
        return RNNBody(
            self.name, self.input_shape[0], self.n_classes, c["hidden"], c["layers"], c["pool"], c["dropout"]
        )


class GRU(_RNNModel):
    name = "gru"


class LSTM(_RNNModel):
    name = "lstm"
