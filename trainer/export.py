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
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edge.modelset import ONNXRUNTIME_RANGE, ModelSetError, open_session, sha256_file
from schema.artifacts import (
    MANIFEST_FILE,
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    PROJECTOR_OUTPUTS,
    RUN_FILE,
    SUMS_FILE,
    ArtifactError,
    Envelope,
    FileEntry,
    HeldoutMetrics,
    Manifest,
    ModelEntry,
    ProjectorEntry,
    RunDoc,
    RunRef,
    encode_doc,
    heldout_file,
    model_file,
    projector_file,
    read_doc,
)
from schema.atomic import fsync_path, stage_dir, swap_dir
from schema.channels import CHANNEL_NAMES, RATE_HZ, STRIDE_S, SUMMARY_STATS, WINDOW_S, view_channels
from schema.extract import input_shape, select
from schema.hashing import schema_hash as current_schema_hash
from schema.vocab import MODEL_INPUT, MODELS, PHASES, THREAT_MODELS
from trainer.errors import ExportError, TrainerError
from trainer.graphs import (
    MAX_IR_VERSION,
    MAX_OPSET,
    PARITY_MAX_ABS_DIFF,
    PARITY_MIN_AGREEMENT,
    check_graph,
    gather_channels,
    measure_parity,
)
from trainer.heldout import Heldout
from trainer.ood import ship_detectors

__all__ = ["MAX_IR_VERSION", "ExportError", "check_graph", "export_run", "measure_parity", "swap_into_place"]

EXPORT_OPSET = 17
K_STATS = len(SUMMARY_STATS)

Loader = Callable[..., Any]  # trainer.models.load_model(dir, expected_schema_hash=...)


# --- reading the run -------------------------------------------------------------------------


def read_run(run: Path) -> RunDoc:
    path = run / RUN_FILE
    try:
        return read_doc(path, RunDoc)
    except FileNotFoundError:
        raise ExportError(
            f"{path}: missing (is this a run directory written by `phasewatch train`?)"
        ) from None
    except ArtifactError as e:
        raise ExportError(f"{e}; rerun `phasewatch train`") from None


def find_checkpoints(run: Path, run_doc: RunDoc) -> list[tuple[str, str, Path]]:
    """(model, threat, checkpoint dir) for every trained model, in MODELS x THREAT_MODELS order."""
    found = [
        (m, t, run / f"{m}-{t}")
        for t in THREAT_MODELS
        for m in MODELS
        if (run / f"{m}-{t}" / "model.json").is_file()
    ]
    have = {f"{m}-{t}" for m, t, _ in found}
    missing = [k for k in run_doc.models if k not in have]
    if missing:
        raise ExportError(
            f"{run / RUN_FILE}: lists {', '.join(missing)} but {run} has no checkpoint for "
            f"{'it' if len(missing) == 1 else 'them'} (<model>-<threat>/model.json)"
        )
    if not found:
        raise ExportError(f"{run}: no checkpoints (<model>-<threat>/model.json) to export")
    return found


def _graph_metrics(m: HeldoutMetrics) -> str:
    """What goes into the graph's metadata_props: small enough to read with any ONNX viewer."""
    return msgspec.json.encode(msgspec.structs.replace(m, per_profile={})).decode()


# --- proving a graph ------------------------------------------------------------------------


def _run_batched(session: Any, x: np.ndarray, output: str, batch: int = 512) -> np.ndarray:
    return np.concatenate(
        [session.run([output], {MODEL_INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
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


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replaceable(out: Path) -> bool:
    return out.is_dir() and (
        not any(out.iterdir()) or (out / SUMS_FILE).exists() or (out / MANIFEST_FILE).exists()
    )


def swap_into_place(new: Path, out: Path) -> None:
    """Make `new` appear at `out`; the old `out` survives until the new one is in place."""
    if (out.exists() or out.is_symlink()) and (out.is_symlink() or not _replaceable(out)):
        raise ExportError(
            f"{out}: exists and is not a models directory (no {SUMS_FILE} or {MANIFEST_FILE}); "
            f"refusing to replace it"
        )
    swap_dir(new, out)


# --- the export -----------------------------------------------------------------------------


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="export", unit="model", disable=None if enabled else True)


def _corpus(run_doc: RunDoc, progress: bool) -> Any | None:
    """The run's whole window set (from the feature cache) when its store is still here."""
    store, index = run_doc.store, run_doc.index
    if not store or not Path(store).is_dir():
        if progress:
            print(
                f"export: store {store!r} of the run is not here; "
                "envelopes and projectors use held-out windows",
                file=sys.stderr,
            )
        return None
    try:
        from trainer.dataset import load_windows

        ws = load_windows(Path(store), Path(index) if index else None, progress=progress)
        # A bounded, profile-stratified sample of episodes (trainer.dataset.CORPUS_SAMPLE_EPISODES):
        # envelopes and projectors need hundreds of episodes, not the whole store in RAM.
        return ws.materialize(ws.sample_episodes()) if hasattr(ws, "materialize") else ws
    except (TrainerError, OSError, ValueError, KeyError) as e:
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
    run_doc = read_run(run)
    expected = current_schema_hash()
    if run_doc.schema_hash != expected:
        raise ExportError(
            f"{run / RUN_FILE}: schema hash mismatch: the run was trained under "
            f"{run_doc.schema_hash}, this code extracts features under {expected}; retrain"
        )
    if loader is None:
        from trainer.models import load_model as loader
    checkpoints = find_checkpoints(run, run_doc)
    heldout = {t: Heldout.load(run / heldout_file(t)) for t in sorted({t for _, t, _ in checkpoints})}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {
        "schema_hash": expected,
        "classes": json.dumps(list(PHASES)),
        "window_s": str(WINDOW_S),
        "stride_s": str(STRIDE_S),
        "rate_hz": str(RATE_HZ),
        "split": msgspec.json.encode(run_doc.split).decode(),
        "opset": str(opset),
        "onnxruntime": ONNXRUNTIME_RANGE,
        "exporter": json.dumps(_versions()),
        "created": created,
    }

    tmp = stage_dir(out)  # beside out, after removing what a killed earlier export left
    try:
        files: list[FileEntry] = []
        entries: list[ModelEntry] = []
        with _progress(len(checkpoints), progress) as bar:
            for name, threat, ckpt in checkpoints:
                bar.set_postfix_str(f"{name}-{threat}")
                entries.append(
                    _export_model(
                        name,
                        threat,
                        ckpt,
                        tmp / model_file(name, threat),
                        loader,
                        heldout[threat],
                        run_doc,
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
        oods = ship_detectors(run, tmp, sorted(heldout))  # trainer/ood.py: ood-<threat>.json

        for e in entries:
            files.append(FileEntry(e.file, sha256_file(tmp / e.file), (tmp / e.file).stat().st_size, "model"))
        for p in projectors:
            files.append(
                FileEntry(p.file, sha256_file(tmp / p.file), (tmp / p.file).stat().st_size, "projector")
            )
        for o in oods:
            files.append(FileEntry(o.file, sha256_file(tmp / o.file), (tmp / o.file).stat().st_size, "ood"))
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
            ood=oods,
            split=run_doc.split,
            run=RunRef(
                path=str(run),
                profile=run_doc.profile,
                seed=run_doc.seed,
                created=run_doc.created,
                index_sha256=run_doc.index_sha256,
            ),
            exporter=_versions(),
        )
        _write_file(tmp / MANIFEST_FILE, encode_doc(manifest))
        sums = [(f.path, f.sha256) for f in files] + [(MANIFEST_FILE, sha256_file(tmp / MANIFEST_FILE))]
        _write_file(tmp / SUMS_FILE, "".join(f"{h}  {p}\n" for p, h in sums).encode())
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        swap_into_place(tmp, out)
    except BaseException as e:
        # an interrupted or failed export leaves only the previous directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a write's ENOSPC names no file: name out
            raise OSError(e.errno, f"{e.strerror} (the previous models directory is kept)", str(out)) from e
        raise
    return manifest


def _export_model(
    name: str,
    threat: str,
    ckpt: Path,
    path: Path,
    loader: Loader,
    held: Heldout,
    run_doc: RunDoc,
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
    chans = view_channels(threat)
    full = held.inputs(kind)
    x = select(full, chans, kind)  # what the native model reads: its threat model's channels
    if tuple(model.input_shape) != tuple(x.shape[1:]):
        raise ExportError(
            f"{ckpt}: input shape {tuple(model.input_shape)} is not the {threat} {kind} view "
            f"{tuple(x.shape[1:])} ({len(chans)} channels); retrain"
        )
    if not len(x):
        raise ExportError(f"{key}: no held-out windows to check parity on")
    metrics = run_doc.metrics.get(key)
    if metrics is None:
        raise ExportError(
            f"{held.path.parent / RUN_FILE}: no held-out metrics for {key} "
            f"(written by an older `phasewatch train`?); retrain"
        )

    model.to_onnx(path, opset=opset)
    proto = gather_channels(onnx.load(str(path)), chans, kind, str(path))
    opsets = check_graph(proto, str(path))
    names = [CHANNEL_NAMES[c] for c in chans]
    props = (
        {p.key: p.value for p in proto.metadata_props}
        | common
        | {
            "model": name,
            "threat_model": threat,
            "input_kind": kind,
            "channels": json.dumps(names),
            "metrics": _graph_metrics(metrics),
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
    # native on its view, the graph on the full window (it gathers the same channels itself)
    parity = measure_parity(model.predict_proba(x), _run_batched(session, full, MODEL_OUTPUT_NAME))
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
        input_shape=list(input_shape(kind)),
        metrics=metrics,
        parity=parity,
    )


def _session(path: Path) -> Any:
    """The daemon's own session recipe, so parity is proven under the options the Pi runs."""
    try:
        return open_session(path, threads=1)
    except ModelSetError as e:
        raise ExportError(str(e)) from None


def _projector_features(threat: str, corpus: Any | None, held: Heldout) -> tuple[np.ndarray, str]:
    """Full-width summaries to fit the projector on (its view's channels are all finite)."""
    chans = view_channels(threat)
    if corpus is not None:
        full = np.asarray(corpus.summary)
        keep = ~np.isin(np.asarray(corpus.episode).astype(str), np.unique(held.episode)) & np.asarray(
            corpus.mask(threat)
        )
        keep &= np.isfinite(select(full, chans, "summary")).all(axis=1)
        if keep.sum() >= 50:
            return full[keep], "train+val (corpus minus held-out episodes)"
    return held.inputs("summary"), "held-out windows (corpus unavailable)"


def _export_projector(
    threat: str, tmp: Path, corpus: Any | None, held: Heldout, common: dict[str, str], opset: int, seed: int
) -> ProjectorEntry:
    import onnx

    from trainer.projector import fit_projector

    full, fitted_on = _projector_features(threat, corpus, held)
    chans = view_channels(threat)
    x = select(full, chans, "summary")
    proj = fit_projector(x, threat, chans, seed=seed, fitted_on=fitted_on)
    path = tmp / projector_file(threat)
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
    proto = gather_channels(onnx.load(str(path)), chans, "summary", str(path))
    check_graph(proto, str(path))
    _write_file(path, proto.SerializeToString())
    # the graph (on full-width windows) against the numpy reference (on the view), fitted points
    sample = np.ascontiguousarray(full[:5000], np.float32)
    xyz, cluster = _session(path).run(list(PROJECTOR_OUTPUTS), {MODEL_INPUT_NAME: sample})
    ref_xyz, ref_cluster = proj.transform(x[:5000].astype(np.float32))
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
        input_shape=list(input_shape("summary")),
        n_clusters=len(proj.centroids),
        fitted_on=fitted_on,
        n_fit=proj.n_fit,
        explained_variance_ratio=[round(float(v), 4) for v in proj.explained_variance_ratio],
    )


def _envelopes(corpus: Any | None, heldout: dict[str, Heldout]) -> list[Envelope]:
    from trainer.envelopes import compute_envelopes, envelopes_from_windowset

    if corpus is not None:
        return envelopes_from_windowset(corpus)
    # Fall back to held-out windows: oracle ones have every channel, realistic ones the host side.
    for threat in ("oracle", "realistic"):
        h = heldout.get(threat)
        if h is None:
            continue
        chans = view_channels(threat)
        names = [CHANNEL_NAMES[c] for c in chans]
        return compute_envelopes(
            select(h.tensor, chans, "tensor"), h.y, h.episode, h.profile, h.window, names
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
    m = export_run(args.run, args.out, opset=args.opset, progress=not args.quiet, seed=args.seed)
    total = sum(f.bytes for f in m.files)
    for e in m.models:
        if e.parity is not None:
            print(
                f"  {e.model + '-' + e.threat_model:<22} parity max|diff| {e.parity.max_abs_diff:.2e}  "
                f"argmax {e.parity.argmax_agreement:.2%} ({e.parity.ties} ties)  ({e.parity.windows} windows)"
            )
    print(
        f"exported {len(m.models)} models, {len(m.projectors)} projectors, {len(m.envelopes)} envelopes "
        f"to {args.out} ({total / 1e6:.2f} MB) in {time.perf_counter() - started:.1f} s; "
        f"schema {m.schema_hash[:12]}"
    )
    return 0
