"""transformer: a small encoder over time patches of the (N, C, T) tensor (nanoGPT-style blocks).

Attention is written out (Linear, MatMul, Softmax) rather than through
``nn.MultiheadAttention``'s fused fast path, so the ONNX graph is plain standard ops.

Any length builds: the window is zero-padded (in normalised units, i.e. at the channel
mean) at its end to a whole number of patches inside the graph (one ONNX Pad), and the
patch shrinks for short windows so there are at least ``MIN_TOKENS`` tokens to attend over.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.models.torch_base import TorchModel

PROFILE_CONFIG: dict[str, dict[str, Any]] = {
    "demo": {
        "gain_jitter": 0.3,
        "d_model": 32,
        "heads": 2,
        "layers": 1,
        "patch": 10,
        "dropout": 0.1,
        "epochs": 6,
        "batch_size": 128,
        "lr": 2e-3,
        "patience": 3,
        "min_steps": 150,
        "max_seconds": 25,
    },
    "quick": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "d_model": 64,
        "heads": 4,
        "layers": 2,
        "patch": 5,
        "stem": 5,  # conv stem (kernel, steps) before patching; 0: linear patches only
        "dropout": 0.1,
        "epochs": 25,
        "batch_size": 128,
        "lr": 1e-3,
        "patience": 6,
        "min_steps": 600,
        "max_seconds": 150,
    },
    "full": {
        "ema": 0.99,  # weight average over ~100 steps: validates, stops and ships (trainer.loop)
        "gain_jitter": 0.3,
        "d_model": 128,
        "heads": 4,
        "layers": 4,
        "patch": 5,
        "stem": 5,  # conv stem (kernel, steps) before patching; 0: linear patches only
        "dropout": 0.1,
        "epochs": 80,
        "batch_size": 128,
        "lr": 5e-4,
        "patience": 12,
        "min_steps": 2000,
        "max_seconds": None,
    },
}
MIN_TOKENS = 4


def patch_plan(steps: int, patch: int) -> tuple[int, int, int]:
    """(patch, pad, tokens) for a window of ``steps``: at least MIN_TOKENS tokens, pad at the end."""
    if steps < 1:
        raise ValueError(f"transformer: need at least one time step, got {steps}")
    patch = max(1, min(patch, steps // MIN_TOKENS))
    pad = (-steps) % patch
    return patch, pad, (steps + pad) // patch


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), SelfAttention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerBody(nn.Module):
    def __init__(
        self,
        channels: int,
        steps: int,
        n_classes: int,
        d_model: int,
        heads: int,
        layers: int,
        patch: int,
        dropout: float,
        stem: int = 0,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"transformer: d_model {d_model} is not a multiple of heads {heads}")
        patch, pad, tokens = patch_plan(steps, patch)
        self.pad = nn.ConstantPad1d((0, pad), 0.0) if pad else nn.Identity()
        # Conv stem: a same-length convolution (BatchNorm, GELU) before patching, so each
        # token already summarises a few steps of local shape across patch borders; a bare
        # linear patch embedding left the transformer 5-10 points behind the cnn on small sets.
        self.stem: nn.Module = nn.Identity()
        if stem:
            self.stem = nn.Sequential(
                nn.Conv1d(channels, d_model, stem, padding=stem // 2), nn.BatchNorm1d(d_model), nn.GELU()
            )
        # One token per patch of steps: a strided conv is a linear patch embedding.
        self.embed = nn.Conv1d(d_model if stem else channels, d_model, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(Block(d_model, heads, dropout) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.pad(x))  # (N, C, T+pad) -> (N, d_model or C, T+pad)
        h = self.embed(h).transpose(1, 2) + self.pos  # -> (N, tokens, d_model)
        return self.head(self.ln(self.blocks(h)).mean(dim=1))


class Transformer(TorchModel):
    name = "transformer"
    input_kind = "tensor"
    profiles = PROFILE_CONFIG

    def build_body(self) -> nn.Module:
        c = self.config
        return TransformerBody(
            self.input_shape[0],
            self.input_shape[1],
            self.n_classes,
            c["d_model"],
            c["heads"],
            c["layers"],
            c["patch"],
            c["dropout"],
            c.get("stem", 0),
        )
