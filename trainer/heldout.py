"""The run's held-out windows (``heldout-<threat>.npz``): written by train, read by export and bench.

Full width, like every array that crosses a file boundary: ``tensor`` (N, 46, 100) and
``summary`` (N, 46 * k) hold all channels (a source the threat model does not use may be
NaN); a consumer takes its channels with ``schema.extract.select``, or hands the full
window to a graph, which gathers its own.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schema.extract import input_shape
from trainer.errors import DatasetError
from trainer.rows import Rows, chunk_rows

# Who each window is: one entry per window, saved beside the features.
_WHO = ("episode", "host", "profile", "sample")


@dataclass
class Heldout:
    path: Path
    tensor: np.ndarray  # float32 (N, 46, 100)
    summary: np.ndarray  # float32 (N, 46 * k)
    y: np.ndarray  # int64 (N,) phase index
    episode: np.ndarray  # str (N,)
    host: np.ndarray
    profile: np.ndarray
    sample: np.ndarray
    window: np.ndarray  # int32 (N,) window number in its episode
    index: np.ndarray  # int64 (N,) the window's index in the run's corpus

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, kind: str) -> np.ndarray:
        """The full-width windows of one view, float32 and contiguous."""
        return np.ascontiguousarray(self.tensor if kind == "tensor" else self.summary, dtype=np.float32)

    @classmethod
    def load(cls, path: Path) -> Heldout:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DatasetError(
                f"{path}: missing; export and bench need the held-out windows (run `phasewatch train`)"
            ) from None
        except (ValueError, OSError) as e:
            raise DatasetError(f"{path}: unreadable npz ({e}); rerun `phasewatch train`") from None
        need = ("tensor", "summary", "y", *_WHO, "window", "index")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise DatasetError(
                f"{path}: no array {', '.join(missing)} (has {sorted(arrays)}); rerun `phasewatch train`"
            )
        n = len(arrays["y"])
        for kind in ("tensor", "summary"):
            got = tuple(arrays[kind].shape)
            if got[1:] != input_shape(kind) or got[0] != n:
                raise DatasetError(
                    f"{path}: {kind} is {got}, expected ({n}, {', '.join(map(str, input_shape(kind)))}) "
                    f"(all channels; written by an older `phasewatch train`?): retrain"
                )
        short = [k for k in (*_WHO, "window", "index") if len(arrays[k]) != n]
        if short:
            raise DatasetError(f"{path}: {', '.join(short)} do not have one entry per window ({n})")
        return cls(
            path=path,
            tensor=arrays["tensor"],
            summary=arrays["summary"],
            y=arrays["y"].astype(np.int64),
            **{k: arrays[k].astype(str) for k in _WHO},
            window=arrays["window"],
            index=arrays["index"].astype(np.int64),
        )


def save_heldout(
    path: Path,
    *,
    tensor: np.ndarray,
    summary: np.ndarray,
    y: np.ndarray,
    episode: np.ndarray,
    host: np.ndarray,
    profile: np.ndarray,
    sample: np.ndarray,
    window: np.ndarray,
    index: np.ndarray,
) -> None:
    """Write the held-out windows, full width, whole or not at all."""
    for kind, x in (("tensor", tensor), ("summary", summary)):
        if tuple(x.shape[1:]) != input_shape(kind):
            raise ValueError(f"{path}: {kind} must be full width {input_shape(kind)}, got {x.shape[1:]}")
    arrays = {
        "tensor": np.ascontiguousarray(tensor, np.float32),
        "summary": np.ascontiguousarray(summary, np.float32),
        "y": np.asarray(y, np.int64),
        **{k: np.asarray(v).astype(str) for k, v in zip(_WHO, (episode, host, profile, sample))},
        "window": np.asarray(window),
        "index": np.asarray(index, np.int64),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _heldout_positions(episode: np.ndarray, max_windows: int | None, seed: int) -> np.ndarray:
    """Positions of the test windows the held-out file keeps: all, or whole episodes in a
    seeded order up to ``max_windows`` (parity and the benchmark need thousands, not millions)."""
    if max_windows is None or len(episode) <= max_windows:
        return np.arange(len(episode))
    eps, counts = np.unique(np.asarray(episode).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(eps))
    take = order[np.cumsum(counts[order]) <= max_windows]
    if not len(take):
        take = order[:1]
    return np.flatnonzero(np.isin(np.asarray(episode).astype(str), eps[take]))


def _write_npy_member(zf: zipfile.ZipFile, name: str, rows: Rows, pos: np.ndarray, step: int) -> None:
    """One float32 .npy member of an .npz, written ``step`` rows at a time."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header | {"shape": (len(pos), *rows.row_shape)})
        for lo in range(0, len(pos), step):
            f.write(np.ascontiguousarray(rows.take(pos[lo : lo + step]), "<f4").tobytes())


def save_heldout_rows(
    path: Path,
    ws: Any,
    full: dict[str, Rows],
    te: np.ndarray,
    max_windows: int | None = None,
    seed: int = 0,
    budget_bytes: float = 64 * 2**20,
) -> None:
    """The test windows (full width: ``full`` has "tensor" and "summary" Rows of ``te`` of the
    window table ``ws``) plus who they are, in the layout ``Heldout`` reads, written in bounded
    chunks: at most ``max_windows`` windows, whole episodes. Whole or not at all (temp file,
    rename)."""
    keep = _heldout_positions(np.asarray(ws.episode)[te], max_windows, seed)
    sel = te[keep]
    for kind, r in full.items():
        if tuple(r.row_shape) != input_shape(kind):
            raise ValueError(f"{path}: {kind} must be full width {input_shape(kind)}, got {r.row_shape}")
    small = {
        "y": np.asarray(ws.y, np.int64)[sel],
        "episode": np.asarray(ws.episode)[sel].astype(str),
        "host": np.asarray(ws.host)[sel].astype(str),
        "profile": np.asarray(ws.profile)[sel].astype(str),
        "sample": np.asarray(ws.sample)[sel].astype(str),
        "window": np.asarray(ws.window)[sel],
        "index": np.asarray(sel, np.int64),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for kind, r in full.items():
            _write_npy_member(zf, kind, r, keep, chunk_rows(r, budget_bytes))
        for name, arr in small.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    os.replace(tmp, path)
