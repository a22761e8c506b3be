"""The one training loop for every torch model.

Class-weighted cross-entropy, AdamW with linear warm-up then cosine decay, gradient
clipping, mixed precision when CUDA is present, early stopping on validation macro F1
(a tie goes to the lower validation loss) and the best-on-validation weights kept; with
``ema`` set, those are the exponential moving average of the weights.

The budget fits the data (:func:`plan_budget`): the batch shrinks so an epoch is at least
``min_batches`` optimiser steps, and the epochs (and patience with them) stretch so a small
set still gets ``min_steps`` updates. The wall-clock budget ``max_seconds`` never stops a
run before that floor: 40 steps on 200 windows is not a trained model.

Seeded and deterministic on CPU: the same seed, data and thread count give the same
weights bit for bit.

Data comes in as :class:`trainer.rows.Rows`: held in RAM when the split fits in the
memory budget (one global permutation per epoch), else read block by block from the
window store through :func:`trainer.rows.epoch_plan`. Either way the same seed and the
same rows give the same batches, whether the rows live in RAM or on disk.

Under torch DDP (``torchrun --nproc-per-node N -m trainer.cli train ...``: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment) each rank trains a
``DistributedDataParallel`` copy on its share of each epoch's shuffled order, validates the
whole validation set, and follows rank 0's validation score and time budget, so every rank
stops at the same epoch with the same weights. One process (no WORLD_SIZE, or 1) is the
loop as it always was. See docs/SCALE.md.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.evaluate import macro_f1
from trainer.models.base import FitResult, ProgressFn
from trainer.rows import Rows, as_rows, chunk_rows, chunks, epoch_plan, materialize, row_bytes


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.05  # share of all optimiser steps spent warming up
    patience: int = 6  # epochs without a better val macro F1 before stopping
    clip_norm: float = 1.0
    label_smoothing: float = 0.0
    # Exponential moving average of the weights, per optimiser step (0: off). Validation,
    # early stopping and the kept weights use the average: on a few hundred windows the
    # raw weights' validation F1 swings by several points from one epoch to the next, the
    # average's much less, and it lands in a flatter minimum that travels to new hosts.
    ema: float = 0.0
    max_seconds: float | None = None  # safety net for `make train`'s wall-clock target
    # Budgets in optimiser steps, so 200 windows train as well as 200,000 (see plan_budget).
    min_steps: int = 0  # floor: epochs stretch until the run has this many updates
    min_batches: int = 8  # the batch shrinks until an epoch holds this many steps...
    min_batch_size: int = 16  # ...but never below this many rows
    # Hosts differ in CPU speed, disk and NIC: the same activity reads as a different
    # rate. Training multiplies each channel of each window by exp(N(0, gain_jitter)) so
    # the models learn shapes and ratios more than one host's absolute levels.
    gain_jitter: float = 0.0
    gain_group: int = 1  # summary input: consecutive features of one channel share a gain
    seed: int = 0
    threads: int | None = None  # None: torch's default (all cores)
    # Windows held in RAM at once (MB): half for the shuffle buffer, a quarter for the
    # validation set (streamed in chunks when larger), a quarter for prediction chunks.
    memory_mb: float = 384.0

    @classmethod
    def from_config(cls, config: dict, seed: int) -> LoopConfig:
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in config.items() if k in keys and k != "seed"}, seed=seed)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present; absent classes get 1."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def jitter_gain(xb: torch.Tensor, sigma: float, group: int, gen: torch.Generator) -> torch.Tensor:
    """Multiply each channel by a random gain: (B, C, T) per channel, (B, F) per group of features."""
    n_gains = xb.shape[1] if xb.ndim == 3 else xb.shape[1] // group
    gain = torch.exp(torch.randn(xb.shape[0], n_gains, generator=gen) * sigma).to(xb.device)
    if xb.ndim == 3:
        return xb * gain[:, :, None]
    return xb * gain.repeat_interleave(group, dim=1)


@dataclass(frozen=True)
class Budget:
    """What one run will do, fixed before the first step."""

    batch_size: int
    steps_per_epoch: int
    epochs: int
    patience: int  # epochs without improvement before stopping (stretched with the epochs)
    total_steps: int


def plan_budget(n_rows: int, cfg: LoopConfig) -> Budget:
    """Batch size, epochs and patience for ``n_rows`` training rows under ``cfg``.

    Large sets keep the configured batch and epochs. A small set gets a smaller batch
    (at least ``min_batches`` steps per epoch, at least ``min_batch_size`` rows a batch)
    and more epochs, until it reaches ``min_steps`` optimiser steps; patience stretches by
    the same factor, so early stopping waits the same share of the run.
    """
    n = max(1, int(n_rows))
    batch = min(cfg.batch_size, max(cfg.min_batch_size, n // max(1, cfg.min_batches)))
    batch = max(2, min(batch, n))  # a batch of one breaks BatchNorm
    steps_per_epoch = max(1, math.ceil(n / batch))
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    patience = max(cfg.patience, math.ceil(cfg.patience * epochs / max(1, cfg.epochs)))
    return Budget(batch, steps_per_epoch, epochs, patience, steps_per_epoch * epochs)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def predict_logits(
    net: nn.Module, x: torch.Tensor | Rows, device: torch.device, batch_size: int = 1024, chunk: int = 8192
) -> np.ndarray:
    """Logits of a tensor in RAM or of Rows read ``chunk`` rows at a time."""
    net.eval()
    if isinstance(x, torch.Tensor):
        parts = [x]
    else:
        parts = (torch.from_numpy(c) for c in chunks(x, chunk))
    out = [
        net(p[i : i + batch_size].to(device)).float().cpu()
        for p in parts
        for i in range(0, len(p), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed's once initialised, else RANK / WORLD_SIZE as
    torchrun sets them, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group (nccl on CUDA, else gloo) when WORLD_SIZE > 1; (rank, world)."""
    import torch.distributed as dist

    _, world = dist_rank_world()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_rank_world()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (extraction fills the window store), the others after it
    (they find the shards cached). One process: just the block."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if on and dist.get_rank() != 0:
        dist.barrier()
    yield
    if on and dist.get_rank() == 0:
        dist.barrier()


def _sync_buffers(net: nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them
    before each forward, so after an epoch's last step each rank holds its own batch's
    update; validation and the kept weights must be the same everywhere."""
    if world == 1:
        return
    import torch.distributed as dist

    for b in net.buffers():
        dist.broadcast(b, src=0)


def _follow_rank_zero(
    val_f1: float, val_loss: float, over_time: bool, world: int, device: torch.device
) -> tuple[float, float, bool]:
    """Every rank takes rank 0's validation score, loss and time verdict: one decision, no rank
    left waiting at an all-reduce for a step the others never take."""
    if world == 1:
        return val_f1, val_loss, over_time
    import torch.distributed as dist

    t = torch.tensor([val_f1, val_loss, float(over_time)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t[0]), float(t[1]), bool(t[2])


def train_loop(
    net: nn.Module,
    x_tr: np.ndarray | Rows,
    y_tr: np.ndarray,
    x_val: np.ndarray | Rows,
    y_val: np.ndarray,
    cfg: LoopConfig,
    n_classes: int,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Train ``net`` (which maps raw float32 inputs to logits) in place; keep the best weights."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = init_distributed()
    device = pick_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Dropout and augmentation draws differ by rank (as the rows do); the batch order's rng is
    # the same on every rank: the sampler deals each rank its share of one shuffled order.
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout draws
    rng = np.random.default_rng(cfg.seed)  # batch order
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * rank)  # augmentation draws

    net.to(device)
    model: nn.Module = net  # what the training steps run; under DDP it all-reduces the gradients
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    rows_tr, rows_val = as_rows(x_tr), as_rows(x_val)
    mem_bytes = cfg.memory_mb * 2**20
    buffer_rows = max(cfg.batch_size, int(mem_bytes / 2 // row_bytes(rows_tr)))
    # The whole train side in RAM when it fits the shuffle buffer (as before streaming existed).
    x_all = materialize(rows_tr, mem_bytes / 2)
    xt = torch.from_numpy(x_all) if x_all is not None else None
    yt = torch.from_numpy(np.asarray(y_tr, np.int64))
    x_val_ram = materialize(rows_val, mem_bytes / 4)
    xv: torch.Tensor | Rows = torch.from_numpy(x_val_ram) if x_val_ram is not None else rows_val
    val_chunk = chunk_rows(rows_val, mem_bytes / 4)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(y_tr, n_classes).to(device), label_smoothing=cfg.label_smoothing
    )
    # No weight decay on norms, biases and the frozen normalisation buffers.
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    n_tr = len(rows_tr)
    budget = plan_budget(n_tr, cfg)
    batch_size = budget.batch_size
    steps_per_epoch = max(1, budget.steps_per_epoch // world)
    total = steps_per_epoch * budget.epochs
    warmup = max(1, int(cfg.warmup_frac * total))
    if x_all is None:  # block mode: the block-packing rarely adds a step per block
        buffer_rows = min(buffer_rows, n_tr - 1)

    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # The EMA copy averages BatchNorm's running statistics too (use_buffers), so it is a
    # whole network that validates and ships as is.
    ema = (
        AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    )
    judged: nn.Module = ema.module if ema is not None else net  # what validation scores and we keep
    best_f1, best_nll, best_epoch = -1.0, math.inf, 0
    gained_epoch = 0  # last epoch that raised val F1: patience counts from here, not from a tie
    best_state = copy.deepcopy(net.state_dict())
    y_val_t = torch.from_numpy(np.asarray(y_val, np.int64))
    history: list[dict[str, float]] = []
    stopped, step, epoch = "max_epochs", 0, 0
    try:
        for epoch in range(1, budget.epochs + 1):
            model.train()
            loss_sum, seen = 0.0, 0
            for xb, yb in _batches(rows_tr, xt, yt, batch_size, buffer_rows, rng, rank, world):
                if len(yb) < 2:  # a batch of one breaks BatchNorm; its sample comes back next epoch
                    continue
                yb = yb.to(device, non_blocking=True)
                if cfg.gain_jitter > 0:
                    xb = jitter_gain(xb, cfg.gain_jitter, cfg.gain_group, aug_gen)
                xb = xb.to(device, non_blocking=True)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warmup, cfg.lr)
                ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
                with ctx:
                    loss = loss_fn(model(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_norm)
                scaler.step(opt)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(net)
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
                step += 1
            _sync_buffers(net, world)
            if ema is not None:  # each rank averaged its own BatchNorm statistics
                _sync_buffers(ema.module, world)
            val_logits = predict_logits(judged, xv, device, chunk=val_chunk)
            val_nll = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), y_val_t))
            over_time = cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds
            val_f1, val_nll, over_time = _follow_rank_zero(
                macro_f1(y_val, val_logits.argmax(axis=1)), val_nll, over_time, world, device
            )
            # A tie on F1 goes to the lower validation loss: a small clean validation set
            # (8 series on BasicMotions) reaches F1 1.0 within a few epochs, and keeping
            # that first epoch kept a half-trained net. Only a higher F1 resets patience, so
            # when a run stops is as before; which of its epochs is kept is what changes.
            gained = val_f1 > best_f1 + 1e-4
            if gained or (abs(val_f1 - best_f1) <= 1e-4 and val_nll < best_nll):
                best_f1, best_nll, best_epoch = max(val_f1, best_f1), val_nll, epoch
                gained_epoch = epoch if gained else gained_epoch
                best_state = copy.deepcopy(judged.state_dict())
            row = {
                "epoch": epoch,
                "epochs": budget.epochs,
                "train_loss": loss_sum / max(1, seen),
                "val_f1": val_f1,
                "val_loss": val_nll,
                "best_val_f1": best_f1,
                "lr": opt.param_groups[0]["lr"],
            }
            history.append(row)
            if progress:
                progress(row)
            if epoch - gained_epoch >= budget.patience:
                stopped = "early_stopping"
                break
            if over_time and step >= cfg.min_steps:
                stopped = "time_budget"
                break
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    net.load_state_dict(best_state)
    net.to("cpu").eval()
    return FitResult(
        best_epoch=best_epoch,
        epochs_run=epoch,
        best_val_f1=float(best_f1),
        seconds=time.perf_counter() - started,
        stopped=stopped,
        history=history,
    )


def _batches(
    rows: Rows,
    x_ram: torch.Tensor | None,
    y: torch.Tensor,
    batch_size: int,
    buffer_rows: int,
    rng: np.random.Generator,
    rank: int,
    world: int,
):
    """One epoch of (inputs, labels) batches: from RAM, or block by block from the store."""
    n = len(rows)
    plan = epoch_plan(n, rows.groups, batch_size, n if x_ram is not None else buffer_rows, rng, rank, world)
    for block in plan:
        if x_ram is not None:
            xs, ys = x_ram, y
        else:
            xs = torch.from_numpy(rows.take(block.positions))  # (B_block, *row_shape), read once
            ys = y[torch.from_numpy(block.positions)]
        for b in block.batches:
            idx = torch.from_numpy(b)
            yield xs[idx], ys[idx]
