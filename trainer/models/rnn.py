"""gru and lstm: a recurrent net over time on the (N, C, T) tensor.

The body: average steps in groups of ``pool`` (5 Hz still resolves every channel's dynamics
and halves the sequential work, which is what costs on a 2-core CPU), project each step to
``hidden`` and LayerNorm it (the recurrence sees a normalised input whatever the channel
mix), run a (bi)directional GRU/LSTM, then pool the outputs over time: mean ("what the
window held") and max ("did a burst happen"). The last state alone, as before, forgot the
start of a 100-step window and trailed the cnn by 10-30 points on small sets.
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
        "bidirectional": False,
        "dropout": 0.1,
        "epochs": 5,
        "batch_size": 128,
        "lr": 3e-3,
        "patience": 3,
        "min_steps": 150,
        "max_seconds": 30,
    },
    "quick": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "hidden": 64,
        "layers": 1,
        "pool": 2,
        "bidirectional": True,  # +2-10 points on small sets for 2x the recurrent work
        "dropout": 0.2,
        "epochs": 20,
        "batch_size": 128,
        "lr": 3e-3,
        "patience": 5,
        "min_steps": 600,
        "max_seconds": 150,
    },
    "full": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "hidden": 128,
        "layers": 2,
        "pool": 1,
        "bidirectional": True,
        "dropout": 0.3,
        "epochs": 60,
        "batch_size": 128,
        "lr": 1e-3,
        "patience": 10,
        "min_steps": 2000,
        "max_seconds": None,
    },
}
MIN_STEPS_AFTER_POOL = 10  # pooling never leaves fewer steps than this for the recurrence


class RNNBody(nn.Module):
    def __init__(
        self,
        cell: str,
        channels: int,
        steps: int,
        n_classes: int,
        hidden: int,
        layers: int,
        pool: int,
        dropout: float,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        # Short windows pool less: a 20-step input keeps 10 steps, not 5.
        pool = max(1, min(pool, steps // MIN_STEPS_AFTER_POOL))
        self.pool = nn.AvgPool1d(pool) if pool > 1 else nn.Identity()
        self.proj = nn.Linear(channels, hidden)
        self.ln_in = nn.LayerNorm(hidden)
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            hidden,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        width = hidden * (2 if bidirectional else 1)
        self.ln_out = nn.LayerNorm(2 * width)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(x).transpose(1, 2)  # (N, C, T) -> (N, T', C)
        h = torch.relu(self.ln_in(self.proj(h)))  # (N, T', hidden)
        seq, _ = self.rnn(h)  # (N, T', hidden * directions)
        pooled = torch.cat([seq.mean(dim=1), seq.amax(dim=1)], dim=1)  # (N, 2 * hidden * directions)
        return self.head(self.drop(self.ln_out(pooled)))


class _RNNModel(TorchModel):
    input_kind = "tensor"
    profiles = PROFILE_CONFIG

    def build_body(self) -> nn.Module:
        c = self.config
        return RNNBody(
            self.name,
            self.input_shape[0],
            self.input_shape[1],
            self.n_classes,
            c["hidden"],
            c["layers"],
            c["pool"],
            c["dropout"],
            c.get("bidirectional", False),
        )


class GRU(_RNNModel):
    name = "gru"


class LSTM(_RNNModel):
    name = "lstm"
