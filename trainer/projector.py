"""The knn scene's 3-D projector: summary features -> (x, y, z) in 0-1 and a cluster id.

Fitted once per threat model on training windows, exported as one small ONNX graph so
the Pi places every live window in the same space the deck shows:

    signed log1p -> z-score -> PCA(3) -> robust min-max to 0-1 (clipped) -> nearest k-means centroid

The affine steps are folded into one MatMul + Add in float64 before the cast to float32,
so the graph is six standard ops and agrees with the numpy reference to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from schema.artifacts import MODEL_INPUT_NAME, PROJECTOR_CLUSTER, PROJECTOR_XYZ
from schema.channels import CHANNEL_NAMES, SUMMARY_STATS
from schema.vocab import PHASES

K_STATS = len(SUMMARY_STATS)
# The 0-1 box spans these percentiles of the training points, so a few extreme windows do
# not squash everything else into a corner; points beyond are clipped to the faces.
BOX_PERCENTILES = (0.5, 99.5)


def signed_log1p(x: np.ndarray) -> np.ndarray:
    # log(1 + |x|), not log1p: it is what the graph computes (Log(Add(1, Abs))).
    return np.sign(x) * np.log(1.0 + np.abs(x))


@dataclass
class Projector:
    threat_model: str
    channels: tuple[int, ...]  # indices on the 46-channel axis, in input order
    mean: np.ndarray  # (F,) of signed_log1p(features)
    scale: np.ndarray  # (F,)
    components: np.ndarray  # (3, F) PCA axes in standardised space
    pca_mean: np.ndarray  # (F,)
    lo: np.ndarray  # (3,) box corner in PCA space
    hi: np.ndarray  # (3,)
    centroids: np.ndarray  # (k, 3) k-means centres in the 0-1 box
    explained_variance_ratio: np.ndarray
    n_fit: int
    fitted_on: str = "train"

    @property
    def n_features(self) -> int:
        return len(self.mean)

    @property
    def channel_names(self) -> list[str]:
        return [CHANNEL_NAMES[c] for c in self.channels]

    def _pca(self, x: np.ndarray) -> np.ndarray:
        z = (signed_log1p(np.asarray(x, dtype=np.float64)) - self.mean) / self.scale
        return (z - self.pca_mean) @ self.components.T

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The numpy reference, step by step in float64: (N, F) -> xyz (N, 3), cluster (N,)."""
        p = self._pca(x)
        xyz = np.clip((p - self.lo) / (self.hi - self.lo), 0.0, 1.0)
        d = ((xyz[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=2)
        return xyz.astype(np.float32), d.argmin(axis=1).astype(np.int64)

    def to_onnx(self, path: Path | str, opset: int = 17, metadata: dict[str, str] | None = None) -> Path:
        """Write the graph: input ``features`` (N, F) -> ``xyz`` (N, 3) float, ``cluster`` (N,) int64."""
        span = self.hi - self.lo
        # xyz = slog(x) @ W + b, all of standardise, PCA and box scaling folded together
        w = (self.components / self.scale[None, :]).T / span[None, :]
        b = (
            -(self.mean / self.scale) @ self.components.T - self.pca_mean @ self.components.T - self.lo
        ) / span
        # argmin |u - c|^2 = argmin (|c|^2 - 2 u.c): the |u|^2 term is the same for every c
        c_t = -2.0 * self.centroids.T
        c_sq = (self.centroids**2).sum(axis=1)
        inits = [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(b.astype(np.float32), "b"),
            numpy_helper.from_array(c_t.astype(np.float32), "Ct"),
            numpy_helper.from_array(c_sq.astype(np.float32), "c2"),
        ]
        nodes = [
            helper.make_node("Abs", [MODEL_INPUT_NAME], ["abs"]),
            helper.make_node("Add", ["abs", "one"], ["abs1"]),
            helper.make_node("Log", ["abs1"], ["log"]),
            helper.make_node("Sign", [MODEL_INPUT_NAME], ["sign"]),
            helper.make_node("Mul", ["sign", "log"], ["slog"]),
            helper.make_node("MatMul", ["slog", "W"], ["proj"]),
            helper.make_node("Add", ["proj", "b"], ["box"]),
            helper.make_node("Clip", ["box", "zero", "one"], [PROJECTOR_XYZ]),
            helper.make_node("MatMul", [PROJECTOR_XYZ, "Ct"], ["cross"]),
            helper.make_node("Add", ["cross", "c2"], ["dist"]),
            helper.make_node("ArgMin", ["dist"], [PROJECTOR_CLUSTER], axis=1, keepdims=0),
        ]
        graph = helper.make_graph(
            nodes,
            f"projector_{self.threat_model}",
            [helper.make_tensor_value_info(MODEL_INPUT_NAME, TensorProto.FLOAT, ["batch", self.n_features])],
            [
                helper.make_tensor_value_info(PROJECTOR_XYZ, TensorProto.FLOAT, ["batch", 3]),
                helper.make_tensor_value_info(PROJECTOR_CLUSTER, TensorProto.INT64, ["batch"]),
            ],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="phasewatch",
            ir_version=helper.find_min_ir_version_for(opsets),
        )
        if metadata:
            helper.set_model_props(model, metadata)
        onnx.checker.check_model(model, full_check=True)
        path = Path(path)
        onnx.save(model, path)
        return path


def fit_projector(
    summary: np.ndarray,
    threat_model: str,
    channels: tuple[int, ...],
    n_clusters: int = len(PHASES),
    seed: int = 0,
    max_fit: int = 20_000,
    fitted_on: str = "train",
) -> Projector:
    """Fit on a threat model's summary features (N, len(channels) * k)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = np.asarray(summary, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(channels) * K_STATS:
        raise ValueError(
            f"projector {threat_model}: expected (N, {len(channels) * K_STATS}) summary features, "
            f"got {x.shape}"
        )
    if len(x) < max(n_clusters, 4):
        raise ValueError(f"projector {threat_model}: {len(x)} windows are too few to fit a 3-D projection")
    if not np.isfinite(x).all():
        raise ValueError(f"projector {threat_model}: summary features contain NaN or inf")
    rng = np.random.default_rng(seed)
    # PCA and k-means need a few thousand points, not the whole corpus
    if len(x) > max_fit:
        x = x[np.sort(rng.choice(len(x), max_fit, replace=False))]
    s = signed_log1p(x)
    mean, std = s.mean(axis=0), s.std(axis=0)
    scale = np.where(std > 1e-6, std, 1.0)  # a constant feature is centred, not blown up
    z = (s - mean) / scale
    pca = PCA(n_components=3, random_state=seed).fit(z)
    p = pca.transform(z)
    lo, hi = np.percentile(p, BOX_PERCENTILES, axis=0)
    hi = np.where(hi - lo > 1e-9, hi, lo + 1.0)
    u = np.clip((p - lo) / (hi - lo), 0.0, 1.0)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(u)
    return Projector(
        threat_model=threat_model,
        channels=tuple(int(c) for c in channels),
        mean=mean,
        scale=scale,
        components=pca.components_.astype(np.float64),
        pca_mean=pca.mean_.astype(np.float64),
        lo=lo,
        hi=hi,
        centroids=km.cluster_centers_.astype(np.float64),
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
        n_fit=len(x),
        fitted_on=fitted_on,
    )
