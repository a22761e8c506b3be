"""Load and verify a models directory (SPEC section 6) on the Pi.

Nothing is trusted until it is checked: every file listed in ``SHA256SUMS`` must exist
and hash to its line (a truncated ``scp`` or a flipped byte is refused before ONNX
Runtime ever parses it), no unlisted ``.onnx`` may sit beside them, and every graph's
``schema_hash`` metadata must equal the daemon's, because a model fed features it was
not trained on answers confidently and wrongly. Each refusal names the file and both
hashes so the operator knows what to re-copy or re-export.

Pi-safe: stdlib, numpy, msgspec and onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np

from schema.artifacts import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MODEL_INPUT_NAME,
    MODEL_OUTPUT_NAME,
    PROJECTOR_OUTPUTS,
    SUMS_FILE,
    ArtifactError,
    HeldoutMetrics,
    Manifest,
    ModelEntry,
    read_doc,
)
from schema.channels import CHANNEL_NAMES, N_CHANNELS
from schema.extract import input_shape
from schema.hashing import schema_hash as current_schema_hash
from schema.ood import OodDetector, OodError, read_detector
from schema.vocab import PHASES

log = logging.getLogger(__name__)

# What the daemon runs on each window (``--run``): the primary alone; every realistic model
# and the projector (the default: what the deck shows); or every model and the projector.
# Only those graphs get an ONNX Runtime session: a session costs ~5-10 MB of RSS on a Pi.
RUN_CHOICES: Final = ("primary", "realistic", "all")


class _Ranked(Protocol):
    @property
    def threat_model(self) -> str: ...
    @property
    def metrics(self) -> HeldoutMetrics | None: ...


_M = TypeVar("_M", bound=_Ranked)


def pick_primary(models: list[_M]) -> _M:
    """The realistic model with the best held-out accuracy (ties: model order); any model as
    fallback. Works on manifest entries (what to open) and loaded models alike."""
    realistic = [m for m in models if m.threat_model == "realistic"] or list(models)
    scored = [
        (m.metrics.accuracy.value if m.metrics is not None else -1.0, -i, m) for i, m in enumerate(realistic)
    ]
    return max(scored, key=lambda t: (t[0], t[1]))[2]


def served(manifest: Manifest, run: str) -> tuple[list[ModelEntry], set[str]]:
    """The manifest's models that ``run`` scores, and the threat models whose projector it uses.

    ``realistic`` is the primary and every realistic model (the primary is realistic unless the
    set has none); ``primary`` is the primary alone and no projector, since its embedding pass
    is off."""
    if run not in RUN_CHOICES:
        raise ValueError(f"run must be one of {', '.join(RUN_CHOICES)}, not {run!r}")
    if not manifest.models:
        return [], set()
    primary = pick_primary(manifest.models)
    if run == "primary":
        return [primary], set()
    entries = [e for e in manifest.models if run == "all" or e is primary or e.threat_model == "realistic"]
    projected = [p.threat_model for p in manifest.projectors]
    embed = embed_threat(primary.threat_model, projected)
    return entries, ({embed} if run != "all" and embed is not None else set(projected))


def embed_threat(primary_threat: str, projected: list[str]) -> str | None:
    """Whose projector places the deck's embeddings: the primary's threat model when it has
    one, else the first projector listed; None when there is none."""
    return primary_threat if primary_threat in projected else next(iter(projected), None)


# onnxruntime versions the exported graphs are made for (opset <= 20, IR <= 9: what 1.17
# runs). 1.21.x dies with SIGILL on a Pi 4 (Cortex-A72), so it is excluded.
ONNXRUNTIME_RANGE = ">=1.17,!=1.21.*"


class ModelSetError(RuntimeError):
    """A models directory that must not be served; the message says which file and why."""


# --- SHA256SUMS ------------------------------------------------------------------------------

_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_sums(path: Path) -> dict[str, str]:
    """``sha256sum`` format -> {file name: hex}. Names must be plain files in this directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelSetError(
            f"{path}: missing; a models directory without SHA256SUMS cannot be verified"
        ) from None
    except UnicodeDecodeError as e:
        raise ModelSetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUMS_LINE.match(line)
        if m is None:
            raise ModelSetError(f"{path}: line {lineno}: expected '<64 hex>  <file>', got {line[:80]!r}")
        digest, name = m.group(1).lower(), m.group(2)
        # The directory is copied from elsewhere: a name must not reach outside it.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ModelSetError(
                f"{path}: line {lineno}: file name {name!r} is not a plain name in this directory"
            )
        if name in sums:
            raise ModelSetError(f"{path}: line {lineno}: {name} is listed twice")
        sums[name] = digest
    if not sums:
        raise ModelSetError(f"{path}: lists no files")
    return sums


def verify_directory(directory: Path) -> dict[str, str]:
    """Check every listed file against SHA256SUMS; refuse unlisted .onnx files. -> {name: sha256}."""
    sums = parse_sums(directory / SUMS_FILE)
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise ModelSetError(
                f"{path}: missing; SHA256SUMS expects sha256 {expected}, actual: no such file"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ModelSetError(
                f"{path}: sha256 mismatch (truncated, tampered or from another export): "
                f"expected {expected} (SHA256SUMS), actual {actual} ({path.stat().st_size} bytes)"
            )
    unlisted = sorted(p.name for p in directory.glob("*.onnx") if p.name not in sums)
    if unlisted:
        p = directory / unlisted[0]
        raise ModelSetError(
            f"{p}: not listed in SHA256SUMS (expected: no such file, actual sha256 {sha256_file(p)}); "
            f"unlisted models: {', '.join(unlisted)}"
        )
    if MANIFEST_FILE not in sums:
        raise ModelSetError(f"{directory / SUMS_FILE}: does not list {MANIFEST_FILE}")
    return sums


# --- loaded graphs ------------------------------------------------------------------------


def _channel_indices(names: list[str], where: Path) -> tuple[int, ...]:
    index = {n: i for i, n in enumerate(CHANNEL_NAMES)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ModelSetError(
            f"{where}: unknown channels {unknown[:5]} (this daemon knows {N_CHANNELS} channels)"
        )
    return tuple(index[n] for n in names)


def _full(x: np.ndarray, input_kind: str) -> np.ndarray:
    """A full-width window (or batch) as every graph reads it: float32 (N, 46, 100) or (N, 46 * k)."""
    x = np.asarray(x, dtype=np.float32)
    want = input_shape(input_kind)
    if x.ndim == len(want):
        x = x[None]
    if tuple(x.shape[1:]) != want:
        raise ValueError(
            f"{input_kind} input must be {want} per window (all {N_CHANNELS} channels), got {x.shape}"
        )
    return np.ascontiguousarray(x)


@dataclass
class LoadedModel:
    name: str
    threat_model: str
    input_kind: str
    channels: tuple[int, ...]  # indices on the 46-channel axis the graph gathers, in its order
    session: Any  # onnxruntime.InferenceSession
    metrics: HeldoutMetrics | None
    file: str
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.threat_model}"

    def predict_proba(self, full: np.ndarray) -> np.ndarray:
        """Full-width window(s) (tensor [46,100] or summary [46*k]) -> (N, 5) probabilities."""
        x = _full(full, self.input_kind)
        return self.session.run([MODEL_OUTPUT_NAME], {MODEL_INPUT_NAME: x})[0]


@dataclass
class LoadedProjector:
    threat_model: str
    channels: tuple[int, ...]
    session: Any
    file: str
    sha256: str

    def project(self, summary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-width summary (or batch) -> (xyz (N, 3) in 0-1, cluster (N,) int64)."""
        x = _full(summary, "summary")
        xyz, cluster = self.session.run(list(PROJECTOR_OUTPUTS), {MODEL_INPUT_NAME: x})
        return xyz, cluster


@dataclass
class ModelSet:
    directory: Path
    manifest: Manifest
    models: list[LoadedModel]
    projectors: dict[str, LoadedProjector]
    sha256: dict[str, str]  # every verified file
    ood: dict[str, OodDetector] = field(default_factory=dict)  # threat model -> detector (schema/ood.py)

    @property
    def listed(self) -> list[ModelEntry]:
        """Every model of the directory, opened or not (``models`` holds the opened ones)."""
        return list(self.manifest.models)

    def run(self, tensor: np.ndarray, summary: np.ndarray) -> dict[str, np.ndarray]:
        """One window's (or a batch's) full-width views -> {"<model>-<threat>": probabilities}.

        The daemon extracts one 46-channel window; each graph gathers its own channels of it.
        """
        return {m.key: m.predict_proba(tensor if m.input_kind == "tensor" else summary) for m in self.models}

    def describe(self) -> dict[str, Any]:
        """For /healthz: what is being served, and under which schema."""
        return {
            "directory": str(self.directory),
            "schema_hash": self.manifest.schema_hash,
            "created": self.manifest.created,
            "files": dict(sorted(self.sha256.items())),
            "models": [m.key for m in self.models],
            "not_loaded": sorted(
                {f"{e.model}-{e.threat_model}" for e in self.manifest.models} - {m.key for m in self.models}
            ),
            "projectors": sorted(self.projectors),
            "ood": sorted(self.ood),
        }


# --- loading -----------------------------------------------------------------------------


def check_runtime(version: str | None = None, machine: str | None = None) -> None:
    """Refuse the onnxruntime release known to crash on a Pi 4; warn outside the tested range."""
    import onnxruntime as ort

    version = version or ort.__version__
    machine = machine or platform.machine()
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    if (major, minor) == (1, 21) and machine in ("aarch64", "arm64"):
        raise ModelSetError(
            f"onnxruntime {version} dies with an illegal instruction on a Pi 4 (Cortex-A72); "
            f"install onnxruntime{ONNXRUNTIME_RANGE}"
        )
    if (major, minor) < (1, 17) or (major, minor) == (1, 21):
        warnings.warn(
            f"onnxruntime {version} is outside the supported range {ONNXRUNTIME_RANGE}", stacklevel=2
        )


def session_options(threads: int = 1) -> Any:
    """The daemon's ORT options (the benchmark times and profiles exactly these)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One window every 5 s per episode: latency matters less than leaving cores to the
    # tailer and the server, and a spinning thread pool burns a Pi's whole power budget.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU arena and no memory pattern: the arena keeps the largest run's intermediates for
    # good (rocket: ~1.6 MB a window) and the pattern pre-plans a block per batch shape seen;
    # without both, 300 live episodes held 137 MB instead of 154-160 for the same CPU (DECISIONS 66).
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types; all mean "unusable graph"
        raise ModelSetError(f"{path}: onnxruntime cannot load it: {e}") from None


def _check_schema(path: Path, meta: dict[str, str], expected: str) -> None:
    found = meta.get("schema_hash")
    if found is None:
        raise ModelSetError(
            f"{path}: no schema_hash in metadata_props; expected schema hash {expected}, actual: none"
        )
    if found != expected:
        raise ModelSetError(
            f"{path}: schema hash mismatch: the daemon extracts features under schema hash {expected}, "
            f"the model was exported under {found}; re-export the models with this code version"
        )


def _check_io(path: Path, session: Any, outputs: tuple[str, ...], width: tuple[int, ...]) -> None:
    ins = session.get_inputs()
    if len(ins) != 1 or ins[0].name != MODEL_INPUT_NAME:
        raise ModelSetError(
            f"{path}: expected one input named {MODEL_INPUT_NAME!r}, got {[i.name for i in ins]}"
        )
    shape = list(ins[0].shape[1:])
    # symbolic dims are fine; a fixed dim must be the full width (the graph gathers its channels)
    if len(shape) != len(width) or any(isinstance(d, int) and d != w for d, w in zip(shape, width)):
        raise ModelSetError(
            f"{path}: input shape per window is {shape}, expected the full width {list(width)}; "
            f"re-export the models with this code version"
        )
    names = [o.name for o in session.get_outputs()]
    missing = [o for o in outputs if o not in names]
    if missing:
        raise ModelSetError(f"{path}: outputs {names} lack {missing}")


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    try:
        return read_doc(path, Manifest)
    except FileNotFoundError:
        raise ModelSetError(f"{path}: missing") from None
    except ArtifactError as e:
        raise ModelSetError(str(e)) from None


def load_models(
    directory: Path | str,
    expected_schema_hash: str | None = None,
    threads: int = 1,
    run: str = "all",
) -> ModelSet:
    """Verify a models directory and open one ONNX Runtime session per graph ``run`` uses.

    Every listed file is checksum-verified whatever ``run`` says (a bad copy is refused now,
    not when someone switches ``--run``); graphs outside the run set are not opened, and their
    manifest entries stay in ``ModelSet.listed`` for the deck's accuracy bars."""
    directory = Path(directory)
    expected = expected_schema_hash or current_schema_hash()
    if not directory.is_dir():
        raise ModelSetError(f"{directory}: not a directory")
    check_runtime()
    sums = verify_directory(directory)
    manifest = read_manifest(directory)
    if manifest.format != MANIFEST_FORMAT:
        raise ModelSetError(
            f"{directory / MANIFEST_FILE}: format {manifest.format}, this daemon reads {MANIFEST_FORMAT}; "
            f"re-export the models with this code version"
        )
    if manifest.schema_hash != expected:
        raise ModelSetError(
            f"{directory / MANIFEST_FILE}: schema hash mismatch: the daemon extracts features under "
            f"schema hash {expected}, the models directory was exported under {manifest.schema_hash}"
        )
    if list(manifest.classes) != list(PHASES):
        raise ModelSetError(
            f"{directory / MANIFEST_FILE}: classes {manifest.classes} are not the phase order {list(PHASES)}"
        )
    # The manifest is itself covered by SHA256SUMS; its per-file hashes must agree too.
    for listing in manifest.files:
        listed = sums.get(listing.path)
        if listing.sha256 != listed:
            raise ModelSetError(
                f"{directory / listing.path}: manifest.json says sha256 {listing.sha256}, "
                f"SHA256SUMS says {listed or 'nothing (not listed)'}"
            )

    # Every listed graph and detector must be covered by SHA256SUMS, opened or not: a set that
    # loads under --run realistic loads under --run all.
    for listed_file in [
        *(e.file for e in manifest.models),
        *(p.file for p in manifest.projectors),
        *(o.file for o in manifest.ood),
    ]:
        if listed_file not in sums:
            raise ModelSetError(f"{directory / listed_file}: in manifest.json but not in SHA256SUMS")
    entries, projected = served(manifest, run)
    models: list[LoadedModel] = []
    for entry in entries:
        path = directory / entry.file
        session = open_session(path, threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        _check_schema(path, meta, expected)
        names = json.loads(meta.get("channels", "null") or "null") or entry.channels
        channels = _channel_indices(list(names), path)
        kind = meta.get("input_kind", entry.input_kind)
        if kind not in ("tensor", "summary"):
            raise ModelSetError(f"{path}: input_kind {kind!r} is neither 'tensor' nor 'summary'")
        _check_io(path, session, (MODEL_OUTPUT_NAME,), input_shape(kind))
        classes = json.loads(meta.get("classes", "null") or "null")
        if classes is not None and list(classes) != list(PHASES):
            raise ModelSetError(f"{path}: classes {classes} are not the phase order {list(PHASES)}")
        models.append(
            LoadedModel(
                name=meta.get("model", entry.model),
                threat_model=meta.get("threat_model", entry.threat_model),
                input_kind=kind,
                channels=channels,
                session=session,
                metrics=entry.metrics,
                file=entry.file,
                sha256=sums[entry.file],
                metadata=meta,
            )
        )

    projectors: dict[str, LoadedProjector] = {}
    for p in manifest.projectors:
        if p.threat_model not in projected:
            continue
        path = directory / p.file
        session = open_session(path, threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        _check_schema(path, meta, expected)
        channels = _channel_indices(p.channels, path)
        _check_io(path, session, PROJECTOR_OUTPUTS, input_shape("summary"))
        projectors[p.threat_model] = LoadedProjector(p.threat_model, channels, session, p.file, sums[p.file])

    ood: dict[str, OodDetector] = {}
    threats = {m.threat_model for m in models}
    for o in manifest.ood:
        if o.threat_model not in threats:
            continue
        path = directory / o.file
        try:
            ood[o.threat_model] = read_detector(path)
        except OodError as e:
            raise ModelSetError(str(e)) from None

    if not models:
        raise ModelSetError(f"{directory / MANIFEST_FILE}: lists no models")
    log.info(
        "loaded %d of %d models (--run %s) and %d projectors from %s (schema %s)",
        len(models),
        len(manifest.models),
        run,
        len(projectors),
        directory,
        expected[:12],
    )
    return ModelSet(directory, manifest, models, projectors, dict(sums), ood)
