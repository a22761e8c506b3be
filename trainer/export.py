"""`phasewatch export`: a training run -> the models directory the Pi loads (SPEC section 6).

    <out>/<model>-<threat>.onnx      x 12, raw features in, probabilities in phase order out
    <out>/projector-<threat>.onnx    summary features -> xyz in 0-1 + cluster id (knn scene)
    <out>/manifest.json              every file with sha256 and bytes, metrics, envelopes
    <out>/SHA256SUMS                 `sha256sum -c SHA256SUMS` after scp

Every graph is proven before it is written out: `onnx.checker` with full shape
inference, a ceiling on opset and IR version that the oldest supported onnxruntime
(1.17) runs, standard-domain ops only, and parity between ONNX Runtime and the native
model on the held-out windows. The directory is built beside its destination and
swapped in at the end, so an interrupted export leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edge.modelset import (
    MANIFEST_FILE,
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    ONNXRUNTIME_RANGE,
    SUMS_FILE,
    Envelope,
    FileEntry,
    Manifest,
    ModelEntry,
    Parity,
    ProjectorEntry,
    sha256_file,
)
from schema.channels import (
    CHANNEL_NAMES,
    N_CHANNELS,
    RATE_HZ,
    STRIDE_S,
    SUMMARY_STATS,
    WINDOW_S,
    view_channels,
)
from schema.hashing import schema_hash as current_schema_hash
from schema.vocab import MODEL_INPUT, MODELS, PHASES, THREAT_MODELS

EXPORT_OPSET = 17
# Ceilings of onnxruntime 1.17, the oldest release in ONNXRUNTIME_RANGE (ONNX 1.15):
# a graph above them loads on the workstation and fails on the Pi.
MAX_OPSET = {"": 20, "ai.onnx": 20, "ai.onnx.ml": 4}
MAX_IR_VERSION = 9
PARITY_MAX_ABS_DIFF = 1e-4
PARITY_MIN_AGREEMENT = 0.999
TIE = 1e-6  # native probabilities this close are a tie, whichever class argmax picks
K_STATS = len(SUMMARY_STATS)

Loader = Callable[..., Any]  # trainer.models.load_model(dir, expected_schema_hash=...)


class ExportError(RuntimeError):
    """The run cannot be exported as is; the message names the file or model and the numbers."""


# --- reading the run -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{path}: missing (is this a run directory written by `phasewatch train`?)"
        ) from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def find_checkpoints(run: Path, run_doc: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(model, threat, checkpoint dir) for every trained model, in MODELS x THREAT_MODELS order."""
    found = [
        (m, t, run / f"{m}-{t}")
        for t in THREAT_MODELS
        for m in MODELS
        if (run / f"{m}-{t}" / "model.json").is_file()
    ]
    listed = run_doc.get("models")
    keys = list(listed) if isinstance(listed, (list, dict)) else []
    have = {f"{m}-{t}" for m, t, _ in found}
    missing = [k for k in keys if isinstance(k, str) and "-" in k and k not in have]
    if missing:
        raise ExportError(
            f"{run / 'run.json'}: lists {', '.join(missing)} but {run} has no checkpoint for "
            f"{'it' if len(missing) == 1 else 'them'} (<model>-<threat>/model.json)"
        )
    if not found:
        raise ExportError(f"{run}: no checkpoints (<model>-<threat>/model.json) to export")
    return found


# What the manifest carries per model (report.json keeps the rest: confusion, per host, fit).
MANIFEST_METRICS = (
    "macro_f1",
    "macro_f1_ci",
    "accuracy",
    "per_class_f1",
    "n_windows",
    "n_episodes",
    "per_profile",
)
# What goes into the graph's metadata_props: small enough to read with any ONNX viewer.
GRAPH_METRICS = ("macro_f1", "macro_f1_ci", "accuracy", "per_class_f1", "n_windows", "n_episodes")


def _finite(v: Any) -> Any:
    """NaN / inf -> None, recursively: metadata must be strict JSON."""
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _find_metrics(report: dict[str, Any], model: str, threat: str) -> dict[str, Any]:
    """This model's held-out metrics from report.json (trainer/report.py: report["models"][key]).

    Other layouts are searched too ({"<threat>": {"<model>": ...}} or records carrying
    "model" and "threat_model"), so an older or hand-made report still exports.
    """
    key = f"{model}-{threat}"

    def walk(node: Any, depth: int) -> Iterator[dict[str, Any]]:
        if depth > 4:
            return
        if isinstance(node, dict):
            if isinstance(node.get(key), dict):
                yield node[key]
            if isinstance(node.get(threat), dict) and isinstance(node[threat].get(model), dict):
                yield node[threat][model]
            if node.get("model") == model and node.get("threat_model", node.get("threat")) == threat:
                yield node
            for v in node.values():
                yield from walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, depth + 1)

    models = report.get("models")
    hits = (
        [models[key]] if isinstance(models, dict) and isinstance(models.get(key), dict) else walk(report, 0)
    )
    for hit in hits:
        picked = {k: hit[k] for k in MANIFEST_METRICS if k in hit}
        return _finite(picked or hit)
    return {}


@dataclass
class Heldout:
    tensor: np.ndarray | None
    summary: np.ndarray | None
    y: np.ndarray
    arrays: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> Heldout:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ExportError(f"{path}: missing; parity needs the held-out windows") from None
        except (ValueError, OSError) as e:
            raise ExportError(f"{path}: unreadable npz ({e})") from None
        if "y" not in arrays or ("tensor" not in arrays and "summary" not in arrays):
            raise ExportError(f"{path}: needs arrays y and tensor/summary, has {sorted(arrays)}")
        return cls(arrays.get("tensor"), arrays.get("summary"), arrays["y"], arrays)

    def inputs(self, kind: str, threat: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
        """The held-out windows as the model reads them (full-width arrays are sliced to the view)."""
        x = self.tensor if kind == "tensor" else self.summary
        if x is None:
            raise ExportError(f"{where}: no {kind!r} array for a {kind} model")
        if tuple(x.shape[1:]) != shape:
            full = (N_CHANNELS, x.shape[-1]) if kind == "tensor" else (N_CHANNELS * K_STATS,)
            if tuple(x.shape[1:]) == full:
                from schema import extract

                x = extract.view(x, threat, kind)
        if tuple(x.shape[1:]) != shape:
            raise ExportError(f"{where}: {kind} windows are {x.shape[1:]}, the model reads {shape}")
        return np.ascontiguousarray(x, dtype=np.float32)


def _channel_names(kind: str, threat: str, shape: tuple[int, ...], key: str) -> list[str]:
    n = shape[0] if kind == "tensor" else shape[0] // K_STATS
    for chans in (view_channels(threat), tuple(range(N_CHANNELS))):
        if n == len(chans):
            return [CHANNEL_NAMES[c] for c in chans]
    raise ExportError(
        f"{key}: input shape {shape} matches neither the {threat} view "
        f"({len(view_channels(threat))} channels) nor all {N_CHANNELS}"
    )


# --- proving a graph ------------------------------------------------------------------------


def check_graph(proto: Any, where: str) -> dict[str, int]:
    """Standard domains only, opsets and IR the oldest supported onnxruntime runs. -> opsets."""
    from onnx import helper

    opsets = {o.domain: o.version for o in proto.opset_import}
    for domain, version in opsets.items():
        if domain not in MAX_OPSET:
            raise ExportError(
                f"{where}: uses opset domain {domain!r}; only standard ONNX domains "
                f"({', '.join(repr(d) for d in MAX_OPSET)}) run everywhere"
            )
        if version > MAX_OPSET[domain]:
            raise ExportError(
                f"{where}: opset {domain or 'ai.onnx'} {version} is above {MAX_OPSET[domain]}, "
                f"the highest onnxruntime 1.17 (the Pi's oldest supported) runs"
            )
    for node in proto.graph.node:
        if node.domain not in MAX_OPSET:
            raise ExportError(
                f"{where}: node {node.name or node.op_type} uses non-standard domain {node.domain!r}"
            )
    needed = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if needed > MAX_IR_VERSION:
        raise ExportError(
            f"{where}: its opsets need IR version {needed}, onnxruntime 1.17 reads up to {MAX_IR_VERSION}"
        )
    # Newer onnx stamps its own IR version; the graph itself needs only `needed`.
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return {d or "ai.onnx": v for d, v in opsets.items()}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run_batched(session: Any, x: np.ndarray, output: str, batch: int = 512) -> np.ndarray:
    return np.concatenate(
        [session.run([output], {MODEL_INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def measure_parity(native: np.ndarray, onnx_probs: np.ndarray) -> Parity:
    """Max abs probability difference and argmax agreement of two (N, classes) outputs.

    An undertrained tree ensemble can give two classes exactly the same probability;
    its argmax is then decided by float noise on either side, so a window where the
    native probabilities of both argmaxes lie within TIE of each other counts as agreeing
    (the plain figure is kept as argmax_agreement_raw).
    """
    native = np.asarray(native, np.float64)
    onnx_probs = np.asarray(onnx_probs, np.float64)
    if native.shape != onnx_probs.shape:
        raise ExportError(f"parity: native output {native.shape} vs ONNX output {onnx_probs.shape}")
    if not len(native):
        return Parity(windows=0, max_abs_diff=0.0, argmax_agreement=1.0)
    rows = np.arange(len(native))
    a, b = native.argmax(1), onnx_probs.argmax(1)
    same = a == b
    tie = ~same & (np.abs(native[rows, a] - native[rows, b]) <= TIE)
    return Parity(
        windows=len(native),
        max_abs_diff=float(np.abs(native - onnx_probs).max()),
        argmax_agreement=float((same | tie).mean()),
        argmax_agreement_raw=float(same.mean()),
        ties=int(tie.sum()),
    )


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "phasewatch",
        "onnx",
        "onnxruntime",
        "torch",
        "xgboost-cpu",
        "xgboost",
        "onnxmltools",
        "scikit-learn",
        "numpy",
    ):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


# --- files ----------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _replaceable(out: Path) -> bool:
    return out.is_dir() and (
        not any(out.iterdir()) or (out / SUMS_FILE).exists() or (out / MANIFEST_FILE).exists()
    )


def swap_into_place(new: Path, out: Path) -> None:
    """Make `new` appear at `out`; the old `out` survives until the new one is in place."""
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not _replaceable(out):
            raise ExportError(
                f"{out}: exists and is not a models directory (no {SUMS_FILE} or {MANIFEST_FILE}); "
                f"refusing to replace it"
            )
        if _exchange(new, out):
            shutil.rmtree(new)  # `new` now holds the previous export
        else:
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.rename(out, old)
            try:
                os.rename(new, out)
            except BaseException:
                os.rename(old, out)  # put the previous export back before giving up
                raise
            shutil.rmtree(old)
    else:
        os.rename(new, out)
    _fsync_path(out.parent)


# --- the export -----------------------------------------------------------------------------


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="export", unit="model", disable=None if enabled else True)


def _corpus(run_doc: dict[str, Any], progress: bool) -> Any | None:
    """The run's whole window set (from the feature cache) when its store is still here."""
    store, index = run_doc.get("store"), run_doc.get("index")
    if not store or not Path(store).is_dir():
        if progress:
            print(
                f"export: store {store!r} of the run is not here; envelopes and projectors use held-out windows",
                file=sys.stderr,
            )
        return None
    try:
        from trainer.dataset import load_windows

        ws = load_windows(Path(store), Path(index) if index else None, progress=progress)
        # A bounded, profile-stratified sample of episodes (trainer.dataset.CORPUS_SAMPLE_EPISODES):
        # envelopes and projectors need hundreds of episodes, not the whole store in RAM.
        return ws.materialize(ws.sample_episodes()) if hasattr(ws, "materialize") else ws
    except (SystemExit, OSError, ValueError, KeyError) as e:
        print(
            f"export: corpus at {store} unavailable ({e}); envelopes and projectors use held-out windows",
            file=sys.stderr,
        )
        return None


def export_run(
    run: Path | str,
    out: Path | str,
    *,
    opset: int = EXPORT_OPSET,
    progress: bool = True,
    loader: Loader | None = None,
    windows: Any | None = None,
    seed: int = 0,
) -> Manifest:
    """Export every checkpoint of `run` into `out`, atomically. Returns the manifest written.

    `windows` is the run's corpus as a `trainer.dataset.WindowSet` (loaded from the run's
    store when omitted and available): envelopes come from all of it, projectors from its
    windows outside the held-out episodes; without it both fall back to held-out windows.
    """
    run, out = Path(run), Path(out).absolute()
    run_doc = _read_json(run / "run.json")
    expected = current_schema_hash()
    if run_doc.get("schema_hash") != expected:
        raise ExportError(
            f"{run / 'run.json'}: schema hash mismatch: the run was trained under "
            f"{run_doc.get('schema_hash')}, this code extracts features under {expected}; retrain"
        )
    if loader is None:
        from trainer.models import load_model as loader
    report = _read_json(run / "report.json") if (run / "report.json").exists() else {}
    checkpoints = find_checkpoints(run, run_doc)
    heldout = {t: Heldout.load(run / f"heldout-{t}.npz") for t in sorted({t for _, t, _ in checkpoints})}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    split = run_doc.get("split") if isinstance(run_doc.get("split"), dict) else {"kind": run_doc.get("split")}
    common = {
        "schema_hash": expected,
        "classes": json.dumps(list(PHASES)),
        "window_s": str(WINDOW_S),
        "stride_s": str(STRIDE_S),
        "rate_hz": str(RATE_HZ),
        "split": json.dumps(_finite(split), allow_nan=False),
        "opset": str(opset),
        "onnxruntime": ONNXRUNTIME_RANGE,
        "exporter": json.dumps(_versions()),
        "created": created,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would follow the directory to the Pi
    try:
        files: list[FileEntry] = []
        entries: list[ModelEntry] = []
        with _progress(len(checkpoints), progress) as bar:
            for name, threat, ckpt in checkpoints:
                key = f"{name}-{threat}"
                bar.set_postfix_str(key)
                entries.append(
                    _export_model(
                        name,
                        threat,
                        ckpt,
                        tmp / f"{key}.onnx",
                        loader,
                        heldout[threat],
                        report,
                        common,
                        opset,
                        expected,
                    )
                )
                bar.update(1)

        corpus = windows if windows is not None else _corpus(run_doc, progress)
        projectors = [
            _export_projector(t, tmp, corpus, heldout[t], common, opset, seed) for t in sorted(heldout)
        ]
        envelopes = _envelopes(corpus, heldout)

        for e in entries:
            files.append(FileEntry(e.file, sha256_file(tmp / e.file), (tmp / e.file).stat().st_size, "model"))
        for p in projectors:
            files.append(
                FileEntry(p.file, sha256_file(tmp / p.file), (tmp / p.file).stat().st_size, "projector")
            )
        manifest = Manifest(
            schema_hash=expected,
            created=created,
            classes=list(PHASES),
            window_s=WINDOW_S,
            stride_s=STRIDE_S,
            rate_hz=RATE_HZ,
            opset=opset,
            onnxruntime=ONNXRUNTIME_RANGE,
            files=files,
            models=entries,
            projectors=projectors,
            envelopes=envelopes,
            split=_finite(split),
            run={k: run_doc[k] for k in ("profile", "seed", "created", "index_sha256") if k in run_doc}
            | {"path": str(run)},
            exporter=_versions(),
        )
        _write_file(tmp / MANIFEST_FILE, msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
        sums = [(f.path, f.sha256) for f in files] + [(MANIFEST_FILE, sha256_file(tmp / MANIFEST_FILE))]
        _write_file(tmp / SUMS_FILE, "".join(f"{h}  {p}\n" for p, h in sums).encode())
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        # an interrupted or failed export leaves only the previous directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_model(
    name: str,
    threat: str,
    ckpt: Path,
    path: Path,
    loader: Loader,
    held: Heldout,
    report: dict[str, Any],
    common: dict[str, str],
    opset: int,
    expected: str,
) -> ModelEntry:
    import onnx

    key = f"{name}-{threat}"
    try:
        model = loader(ckpt, expected_schema_hash=expected)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{ckpt}: cannot load checkpoint: {e}") from None
    kind = getattr(model, "input_kind", MODEL_INPUT.get(name, "tensor"))
    shape = tuple(model.input_shape)
    names = _channel_names(kind, threat, shape, key)
    x = held.inputs(kind, threat, shape, ckpt)
    if not len(x):
        raise ExportError(f"{key}: no held-out windows to check parity on")

    model.to_onnx(path, opset=opset)
    proto = onnx.load(str(path))
    opsets = check_graph(proto, str(path))
    metrics = _find_metrics(report, name, threat)
    props = (
        {p.key: p.value for p in proto.metadata_props}
        | common
        | {
            "model": name,
            "threat_model": threat,
            "input_kind": kind,
            "channels": json.dumps(names),
            "metrics": json.dumps(
                {k: v for k, v in metrics.items() if k in GRAPH_METRICS or k not in MANIFEST_METRICS},
                allow_nan=False,
            ),
            "opsets": json.dumps(opsets),
        }
    )
    if kind == "summary":
        props["summary_stats"] = json.dumps(list(SUMMARY_STATS))  # feature c*k + s
    onnx.helper.set_model_props(proto, props)
    _write_file(path, proto.SerializeToString())
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: onnx.checker (full check) failed: {e}") from None

    session = _session(path)
    got = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if got[0] != [MODEL_INPUT_NAME] or MODEL_OUTPUT_NAME not in got[1]:
        raise ExportError(
            f"{path}: inputs {got[0]} outputs {got[1]}; expected {MODEL_INPUT_NAME!r} -> "
            f"{MODEL_OUTPUT_NAME!r}"
        )
    parity = measure_parity(model.predict_proba(x), _run_batched(session, x, MODEL_OUTPUT_NAME))
    if parity.max_abs_diff > PARITY_MAX_ABS_DIFF or parity.argmax_agreement < PARITY_MIN_AGREEMENT:
        raise ExportError(
            f"{key}: ONNX Runtime disagrees with the native model on {parity.windows} held-out windows: "
            f"max abs probability difference {parity.max_abs_diff:.3g} (limit {PARITY_MAX_ABS_DIFF:g}), "
            f"argmax agreement {parity.argmax_agreement:.4%} (limit {PARITY_MIN_AGREEMENT:.1%}; "
            f"{parity.argmax_agreement_raw:.4%} before counting {parity.ties} exact ties)"
        )
    return ModelEntry(
        file=path.name,
        model=name,
        threat_model=threat,
        input_kind=kind,
        channels=names,
        input_shape=list(shape),
        metrics=metrics,
        parity=parity,
    )


def _projector_features(threat: str, corpus: Any | None, held: Heldout) -> tuple[np.ndarray, str]:
    if corpus is not None:
        held_eps = set(np.asarray(held.arrays.get("episode", [])).astype(str).tolist())
        x = corpus.view(threat, "summary")
        keep = ~np.isin(np.asarray(corpus.episode).astype(str), list(held_eps)) & np.asarray(
            corpus.mask(threat)
        )
        keep &= np.isfinite(x).all(axis=1)
        if keep.sum() >= 50:
            return x[keep], "train+val (corpus minus held-out episodes)"
    if held.summary is None:
        raise ExportError(
            f"projector-{threat}: no summary features (no corpus and no held-out summary array)"
        )
    return held.inputs(
        "summary", threat, (len(view_channels(threat)) * K_STATS,), Path(f"heldout-{threat}.npz")
    ), "held-out windows (corpus unavailable)"


def _export_projector(
    threat: str, tmp: Path, corpus: Any | None, held: Heldout, common: dict[str, str], opset: int, seed: int
) -> ProjectorEntry:
    from trainer.projector import fit_projector

    x, fitted_on = _projector_features(threat, corpus, held)
    chans = view_channels(threat)
    proj = fit_projector(x, threat, chans, seed=seed, fitted_on=fitted_on)
    path = tmp / f"projector-{threat}.onnx"
    meta = common | {
        "model": "projector",
        "threat_model": threat,
        "input_kind": "summary",
        "channels": json.dumps(proj.channel_names),
        "summary_stats": json.dumps(list(SUMMARY_STATS)),
        "n_clusters": str(len(proj.centroids)),
        "fitted_on": fitted_on,
        "explained_variance_ratio": json.dumps([round(float(v), 4) for v in proj.explained_variance_ratio]),
    }
    meta.pop("split", None)
    proj.to_onnx(path, opset=opset, metadata=meta)
    # the graph against the numpy reference, on the points it was fitted to
    sample = x[:5000].astype(np.float32)
    session = _session(path)
    xyz, cluster = session.run(["xyz", "cluster"], {MODEL_INPUT_NAME: sample})
    ref_xyz, ref_cluster = proj.transform(sample)
    diff = float(np.abs(xyz - ref_xyz).max())
    agree = float((cluster == ref_cluster).mean())
    if diff > PARITY_MAX_ABS_DIFF or agree < PARITY_MIN_AGREEMENT:
        raise ExportError(
            f"projector-{threat}: ONNX Runtime vs numpy: max abs xyz difference {diff:.3g}, "
            f"cluster agreement {agree:.4%}"
        )
    return ProjectorEntry(
        file=path.name,
        threat_model=threat,
        channels=proj.channel_names,
        input_shape=[proj.n_features],
        n_clusters=len(proj.centroids),
        fitted_on=fitted_on,
        n_fit=proj.n_fit,
        explained_variance_ratio=[round(float(v), 4) for v in proj.explained_variance_ratio],
    )


def _envelopes(corpus: Any | None, heldout: dict[str, Heldout]) -> list[Envelope]:
    from trainer.envelopes import compute_envelopes, envelopes_from_windowset

    if corpus is not None:
        return envelopes_from_windowset(corpus)
    # Fall back to held-out windows: the oracle file has all 46 channels, realistic the host side.
    for threat in ("oracle", "realistic"):
        h = heldout.get(threat)
        if h is None or h.tensor is None or not {"episode", "profile"} <= set(h.arrays):
            continue
        width = h.tensor.shape[1]
        names = CHANNEL_NAMES if width == N_CHANNELS else [CHANNEL_NAMES[c] for c in view_channels(threat)]
        if len(names) != width:
            continue
        return compute_envelopes(
            h.tensor, h.y, h.arrays["episode"], h.arrays["profile"], h.arrays.get("window"), names
        )
    return []


# --- CLI ------------------------------------------------------------------------------------


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", type=Path, default=Path("runs/latest"), help="training run directory (default runs/latest)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("models"), help="models directory to write (default models)"
    )
    p.add_argument(
        "--opset",
        type=int,
        default=EXPORT_OPSET,
        help=f"ONNX opset (default {EXPORT_OPSET}; at most {MAX_OPSET['']} for onnxruntime 1.17)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's PCA / k-means")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_export(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        m = export_run(args.run, args.out, opset=args.opset, progress=not args.quiet, seed=args.seed)
    except ExportError as e:
        print(f"phasewatch export: {e}", file=sys.stderr)
        return 1
    total = sum(f.bytes for f in m.files)
    for e in m.models:
        if e.parity is not None:
            print(
                f"  {e.model + '-' + e.threat_model:<22} parity max|diff| {e.parity.max_abs_diff:.2e}  "
                f"argmax {e.parity.argmax_agreement:.2%} ({e.parity.ties} ties)  ({e.parity.windows} windows)"
            )
    print(
        f"exported {len(m.models)} models, {len(m.projectors)} projectors, {len(m.envelopes)} envelopes "
        f"to {args.out} ({total / 1e6:.2f} MB) in {time.perf_counter() - started:.1f} s; schema {m.schema_hash[:12]}"
    )
    return 0
