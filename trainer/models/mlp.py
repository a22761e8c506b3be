"""mlp: a small residual-free multilayer perceptron on the summary features (N, F)."""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer.models.torch_base import TorchModel

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "hidden": 64,
        "depth": 2,
        "dropout": 0.1,
        "gain_jitter": 0.3,
        "epochs": 8,
        "batch_size": 256,
        "lr": 3e-3,
        "patience": 4,
        "min_steps": 150,
        "max_seconds": 20,
    },
    "quick": {
        "hidden": 256,
        "depth": 2,
        "dropout": 0.2,
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        # Stronger per-channel gain jitter and soft targets: the summary features carry a
        # host's absolute levels more than the tensor models' shapes do; on 300 windows
        # from other hosts these lifted macro F1 by 2-4 points (benchmarks/bench_small_data.py).
        "gain_jitter": 0.5,
        "label_smoothing": 0.1,
        "epochs": 40,
        "batch_size": 256,
        "lr": 2e-3,
        "patience": 8,
        "min_steps": 600,
        "max_seconds": 60,
    },
    "full": {
        "hidden": 512,
        "depth": 3,
        "dropout": 0.3,
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "epochs": 120,
        "batch_size": 256,
        "lr": 1e-3,
        "patience": 15,
        "min_steps": 2000,
        "max_seconds": None,
    },
}


class MLP(TorchModel):
    name = "mlp"
    input_kind = "summary"
    profiles = PROFILE_CONFIG

    def build_body(self) -> nn.Module:
        c = self.config
        layers: list[nn.Module] = []
        width = self.input_shape[0]
        for _ in range(c["depth"]):
            layers += [
                nn.Linear(width, c["hidden"]),
                nn.LayerNorm(c["hidden"]),
                nn.GELU(),
                nn.Dropout(c["dropout"]),
            ]
            width = c["hidden"]
        layers.append(nn.Linear(width, self.n_classes))
        return nn.Sequential(*layers)
