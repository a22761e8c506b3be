"""Out-of-distribution score of a live window: how unlike the training hosts its summary looks.

The trainer fits an :class:`~schema.artifacts.OodDetector` per threat model
(``trainer/ood.py``) and export ships it as ``ood-<threat>.json`` in the models directory;
the daemon decodes it with :func:`read_detector` and scores every window with
:func:`ood_score`. Both sides run this module's code, so the live score is the one the
report evaluated.

The score: each summary feature of the threat model's channels goes through the models'
``sign(x) * log(1 + |x|)``, then a robust z against the training windows (median, and
1.4826 * MAD, floored), clipped at ``clip``; the raw score is the root mean
square of those z. ``ood = s^2 / (s^2 + threshold^2)`` maps it into 0-1 with 0.5 exactly at
the threshold, which is the ``quantile`` of the raw score on training-host windows that the
statistics never saw. A window at ``ood >= 0.5`` is flagged.

Pi-safe: numpy and msgspec only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np

from schema.artifacts import (
    OOD_FORMAT,
    ArtifactError,
    OodDetector,
    OodEvaluation,
    encode_doc,
    ood_file,
    read_doc,
)
from schema.channels import CHANNEL_NAMES, SUMMARY_STATS

__all__ = ["FLAG_AT", "OodDetector", "OodError", "OodEvaluation", "ood_file", "ood_score", "read_detector"]

FLAG_AT: Final = 0.5  # ood >= FLAG_AT: the window is flagged
_K = len(SUMMARY_STATS)


class OodError(ValueError):
    """An ood file that cannot be used; the message names the file and the field."""


def read_detector(path: Path | str) -> OodDetector:
    path = Path(path)
    try:
        det = read_doc(path, OodDetector)
    except (OSError, ArtifactError) as e:
        raise OodError(f"{path}: not a usable OOD detector ({e})") from None
    check_detector(det, str(path))
    return det


def check_detector(det: OodDetector, where: str) -> None:
    if det.format != OOD_FORMAT:
        raise OodError(f"{where}: format {det.format}, this code reads {OOD_FORMAT}")
    if list(det.stats) != list(SUMMARY_STATS):
        raise OodError(f"{where}: stats {det.stats} differ from this code's {list(SUMMARY_STATS)}")
    unknown = [c for c in det.channels if c not in CHANNEL_NAMES]
    if unknown:
        raise OodError(f"{where}: channels: unknown {unknown}")
    n = len(det.channels) * _K
    if len(det.center) != n or len(det.scale) != n:
        raise OodError(f"{where}: center/scale: expected {n} values, got {len(det.center)}/{len(det.scale)}")
    if not det.threshold > 0:
        raise OodError(f"{where}: threshold: must be > 0, got {det.threshold}")


def feature_index(channels: list[str]) -> np.ndarray:
    """Columns of a full-width (N, 46 * k) summary holding ``channels``' features, in order."""
    ch = np.array([CHANNEL_NAMES.index(c) for c in channels])
    return (ch[:, None] * _K + np.arange(_K)[None, :]).reshape(-1)


def signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def raw_score(det: OodDetector, summary: np.ndarray) -> np.ndarray:
    """(N, 46 * k) full-width summaries -> (N,) RMS of clipped robust z. NaN features count as 0."""
    x = np.asarray(summary, np.float64)
    if x.ndim != 2 or x.shape[1] != len(CHANNEL_NAMES) * _K:
        raise ValueError(f"ood: expected full-width summaries (N, {len(CHANNEL_NAMES) * _K}), got {x.shape}")
    z = (signed_log(x[:, feature_index(det.channels)]) - np.asarray(det.center)) / np.asarray(det.scale)
    z = np.clip(np.nan_to_num(z, nan=0.0), -det.clip, det.clip)
    return np.sqrt((z * z).mean(axis=1))


def ood_from_raw(raw: np.ndarray, threshold: float) -> np.ndarray:
    s2 = np.asarray(raw, np.float64) ** 2
    return s2 / (s2 + threshold**2)


def ood_score(det: OodDetector, summary: np.ndarray) -> np.ndarray:
    """(N, 46 * k) -> (N,) in [0, 1): 0.5 at the threshold, flagged at >= FLAG_AT."""
    return ood_from_raw(raw_score(det, summary), det.threshold)


def encode(det: OodDetector) -> bytes:
    return encode_doc(det)
