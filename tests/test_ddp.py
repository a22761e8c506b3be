"""torch DDP readiness: the sampler shards each epoch by rank, and a real two-process run agrees.

The sampler: every rank computes the same epoch plan from the same seed and keeps its
share; the shares are disjoint, cover the epoch but a bounded remainder, give every rank the
same number of steps and leave every rank's rng in the same state. The loop: two processes
on CPU (gloo, as torchrun would start them) train one small network on a window store's
worth of rows read block by block and end with identical weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from trainer.rows import epoch_plan

EPISODES, PER_EPISODE = 41, 25  # an odd count of episodes: the ranks' shares differ by one


def rows_of(plan) -> np.ndarray:
    return np.concatenate([b.positions[np.concatenate(b.batches)] for b in plan if b.batches])


@pytest.mark.parametrize("buffer_rows", [EPISODES * PER_EPISODE, 200], ids=["global", "blocks"])
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_a_disjoint_share_of_one_shuffled_order(buffer_rows: int, world: int) -> None:
    groups = np.repeat(np.arange(EPISODES), PER_EPISODE)
    n, batch = len(groups), 64
    plans, states = [], []
    for rank in range(world):
        rng = np.random.default_rng(5)
        plans.append(epoch_plan(n, groups, batch, buffer_rows, rng, rank=rank, world=world))
        states.append(rng.bit_generator.state)
        again = epoch_plan(n, groups, batch, buffer_rows, np.random.default_rng(5), rank=rank, world=world)
        assert np.array_equal(rows_of(again), rows_of(plans[-1]))  # the same seed, the same share
    assert all(s == states[0] for s in states)  # every rank's rng stays in step for the next epoch
    shares = [rows_of(p) for p in plans]
    for r, share in enumerate(shares):
        assert len(np.unique(share)) == len(share), r  # no row twice within a rank
        for other in shares[r + 1 :]:
            assert not np.intersect1d(share, other).size  # disjoint across ranks
    steps = [sum(len(b.batches) for b in p) for p in plans]
    assert len(set(steps)) == 1 and steps[0] > 0  # no rank waits at an all-reduce
    assert all(len(b) >= 2 for p in plans for blk in p for b in blk.batches)  # BatchNorm-safe
    covered = np.unique(np.concatenate(shares))
    left_out = n - len(covered)
    assert left_out <= world * batch + PER_EPISODE, (left_out, steps)  # a remainder, not a share
    if buffer_rows < n:  # block mode: a rank reads only its own episodes' shards
        eps = [set(groups[np.concatenate([b.positions for b in p])].tolist()) for p in plans]
        assert all(not eps[a] & eps[b] for a in range(world) for b in range(a + 1, world))
        assert all(len(b.positions) <= buffer_rows for p in plans for b in p)
    # one process is the plan as it always was: the world=1 plan covers every row once
    solo = rows_of(epoch_plan(n, groups, batch, buffer_rows, np.random.default_rng(5)))
    assert np.array_equal(np.sort(solo), np.arange(n))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the real loop."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    import torch
    import torch.distributed as dist
    from torch import nn

    from trainer.loop import LoopConfig, train_loop
    from trainer.rows import ArrayRows

    rng = np.random.default_rng(0)  # the same data on every rank; the sampler picks each one's rows
    n = 30 * 40
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5).astype(np.int64)
    groups = np.repeat(np.arange(30), 40)
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    # memory_mb this small puts the loop in block mode: rows read block by block as from the store
    cfg = LoopConfig(epochs=8, batch_size=32, lr=1e-2, patience=20, seed=3, threads=1, memory_mb=0.01)
    fit = train_loop(net, ArrayRows(x[:900], groups[:900]), y[:900], x[900:], y[900:], cfg, 3)
    torch.save(
        {"state": net.state_dict(), "start": start, "epochs": fit.epochs_run, "f1": fit.best_val_f1},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_processes_on_gloo_end_with_identical_weights(tmp_path: Path) -> None:
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k  # parameters and BatchNorm buffers
    assert not torch.equal(a["start"]["0.weight"], b["start"]["0.weight"])  # they started apart
    assert not torch.equal(a["state"]["0.weight"], a["start"]["0.weight"])  # and it trained
    assert a["epochs"] == b["epochs"] and a["f1"] == b["f1"] > 0.6  # and learnt
