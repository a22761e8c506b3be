"""What the trainer writes and the edge reads: one msgspec Struct per file, and the graph I/O names.

    run.json        RunDoc        `phasewatch train` -> `phasewatch export` (metrics, split, store)
    manifest.json   Manifest      `phasewatch export` -> the daemon (files, models, projectors, envelopes)
    bench.json      BenchDoc      `phasewatch bench` -> the daemon (model_perf points) and people
    <model>-<threat>.onnx         input MODEL_INPUT_NAME, output MODEL_OUTPUT_NAME
    projector-<threat>.onnx       input MODEL_INPUT_NAME, outputs PROJECTOR_OUTPUTS

Every graph reads the full-width window: a tensor (N, 46, 100) or a summary (N, 46 * k);
its first node gathers the channels of its own threat model (``channels`` in the manifest
entry and the graph's metadata), so nothing outside a graph slices channels.

Writers encode these Structs; readers decode with ``type=`` (:func:`read_doc`); a file that
does not decode is refused with the file and the field named. Pi-safe: msgspec only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta

from .events import ModelPerf

# --- file names and formats --------------------------------------------------------------------

RUN_FILE: Final = "run.json"
REPORT_FILE: Final = "report.json"
MANIFEST_FILE: Final = "manifest.json"
SUMS_FILE: Final = "SHA256SUMS"
BENCH_FILE: Final = "bench.json"
BENCH_PLOT_FILE: Final = "bench.png"
RUN_FORMAT: Final = 1
# 2: every graph takes the full 46-channel window (format 1 graphs took their view's width).
MANIFEST_FORMAT: Final = 2
BENCH_FORMAT: Final = 2


def heldout_file(threat_model: str) -> str:
    """The run's held-out windows of one threat model (full width, see trainer/heldout.py)."""
    return f"heldout-{threat_model}.npz"


def model_file(model: str, threat_model: str) -> str:
    return f"{model}-{threat_model}.onnx"


def ood_file(threat_model: str) -> str:
    """The OOD detector of one threat model (OodDetector; scored by schema/ood.py)."""
    return f"ood-{threat_model}.json"


def projector_file(threat_model: str) -> str:
    return f"projector-{threat_model}.onnx"


# --- ONNX graph names --------------------------------------------------------------------------

MODEL_INPUT_NAME: Final = "features"  # float32 (batch, 46, 100) or (batch, 46 * k)
MODEL_OUTPUT_NAME: Final = "probabilities"  # float32 (batch, 5), phase order
PROJECTOR_XYZ: Final = "xyz"  # float32 (batch, 3) in 0-1
PROJECTOR_CLUSTER: Final = "cluster"  # int64 (batch,)
PROJECTOR_OUTPUTS: Final = (PROJECTOR_XYZ, PROJECTOR_CLUSTER)

# --- held-out metrics: one shape for every figure with a confidence interval -----------------

Unit = Annotated[float, Meta(ge=0.0, le=1.0)]


class Estimate(msgspec.Struct, frozen=True, omit_defaults=True):
    """A held-out figure in 0-1 and its 95 % interval (None: not computed)."""

    value: Unit
    ci: tuple[Unit, Unit] | None = None


def estimate(value: float, lo: float | None = None, hi: float | None = None) -> Estimate:
    """An Estimate from raw numbers: a CI bound that is not finite leaves the CI out."""
    bounds = (lo, hi)
    ok = all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds)
    ci = (_unit(lo), _unit(hi)) if ok else None  # type: ignore[arg-type]
    return Estimate(value=_unit(value), ci=ci)


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


class GroupMetrics(msgspec.Struct, omit_defaults=True):
    """One profile's (or host's) share of the held-out windows."""

    n_windows: int
    macro_f1: float | None = None
    accuracy: float | None = None
    n_episodes: int | None = None


class HeldoutMetrics(msgspec.Struct, omit_defaults=True):
    """One model's figures on the held-out split (trainer/train.py writes them into run.json)."""

    accuracy: Estimate
    macro_f1: Estimate
    n_windows: int
    n_episodes: int
    per_class_f1: dict[str, float | None] = {}
    per_profile: dict[str, GroupMetrics] = {}


class SplitDoc(msgspec.Struct, omit_defaults=True):
    """What was held out (trainer.dataset.Split.to_json)."""

    kind: str
    description: str = ""
    test_groups: list[str] = []
    untested_profiles: list[str] = []
    windows: dict[str, int] = {}


# --- run.json ----------------------------------------------------------------------------------


class RunDoc(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A training run directory's index: what was trained on what, and how well it did."""

    schema_hash: str
    split: SplitDoc
    profile: str
    seed: int
    models: list[str]  # "<model>-<threat>", one checkpoint directory each
    threat_models: list[str]
    metrics: dict[str, HeldoutMetrics] = {}  # by "<model>-<threat>"
    created: str = ""
    seconds: float = 0.0
    threads: int | None = None
    store: str | None = None
    index: str | None = None
    index_sha256: str | None = None
    cpu_count: int | None = None
    format: int = RUN_FORMAT


# --- manifest.json -----------------------------------------------------------------------------


class FileEntry(msgspec.Struct, omit_defaults=True):
    path: str
    sha256: str
    bytes: int
    kind: str  # "model" | "projector" | "ood"


class Parity(msgspec.Struct, omit_defaults=True):
    windows: int
    max_abs_diff: float
    argmax_agreement: float  # exact ties in the native output count as agreeing
    argmax_agreement_raw: float = 1.0  # plain argmax equality
    ties: int = 0  # windows whose top two native classes tie


class ModelEntry(msgspec.Struct, omit_defaults=True):
    file: str
    model: str
    threat_model: str
    input_kind: str  # "summary" | "tensor"
    channels: list[str]  # the channels the graph's first node gathers, in its order
    input_shape: list[int]  # per window, without the batch axis: always the full width
    metrics: HeldoutMetrics | None = None
    parity: Parity | None = None


class ProjectorEntry(msgspec.Struct, omit_defaults=True):
    file: str
    threat_model: str
    channels: list[str]
    input_shape: list[int]  # full-width summary
    n_clusters: int
    fitted_on: str  # which windows the PCA / k-means saw
    n_fit: int
    explained_variance_ratio: list[float] = []


class Envelope(msgspec.Struct, omit_defaults=True):
    """One attack_profile event's payload, plus where it came from."""

    name: str
    curve: list[float]
    shape: str
    channel: str = ""
    unit: str = ""
    episodes: int = 0


class OodEvaluation(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How the OOD score did on the run's own windows (trainer/ood.py)."""

    auroc: float | None = None  # held-out-host windows vs training-host windows unseen by the fit
    auroc_ci: list[float | None] = []
    flagged_share_heldout: float | None = None
    flagged_share_training_hosts: float | None = None


OOD_FORMAT: Final = 1


class OodDetector(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``ood-<threat>.json``: robust per-feature statistics of the training hosts' summaries."""

    threat_model: str
    channels: list[str]  # whose summary features are scored, in this order
    stats: list[str]  # SUMMARY_STATS at fit time: feature c*k + s
    center: list[float]  # per feature: median of the signed-log value on training windows
    scale: list[float]  # per feature: 1.4826 * MAD, floored
    threshold: float  # raw score at which ood = 0.5
    quantile: float  # share of unseen training-host windows below the threshold
    clip: float = 8.0
    fitted_on: str = ""
    n_fit: int = 0
    evaluation: OodEvaluation | None = None
    format: int = OOD_FORMAT


class OodEntry(msgspec.Struct, omit_defaults=True):
    file: str
    threat_model: str
    threshold: float
    evaluation: OodEvaluation | None = None


class RunRef(msgspec.Struct, omit_defaults=True):
    """Which run a models directory was exported from."""

    path: str
    profile: str = ""
    seed: int | None = None
    created: str = ""
    index_sha256: str | None = None


class Manifest(msgspec.Struct, omit_defaults=True):
    schema_hash: str
    created: str
    classes: list[str]
    window_s: int
    stride_s: int
    rate_hz: int
    opset: int
    onnxruntime: str
    files: list[FileEntry]
    models: list[ModelEntry]
    projectors: list[ProjectorEntry] = []
    envelopes: list[Envelope] = []
    ood: list[OodEntry] = []  # one OOD detector per threat model (absent: no ood on predictions)
    split: SplitDoc | None = None
    run: RunRef | None = None
    exporter: dict[str, str] = {}
    format: int = MANIFEST_FORMAT


# --- bench.json --------------------------------------------------------------------------------


class Machine(msgspec.Struct):
    cpu: str
    arch: str
    cores: int
    pinned: int | None
    peak_gflops: float
    peak_by_size: dict[str, float]
    blas: str
    ort_floor_us: float
    loadavg: list[float]
    onnxruntime: str | None = None
    torch: str | None = None
    xgboost: str | None = None


class BenchMethod(msgspec.Struct):
    warmup: int
    repeats: int
    calls: int
    batch: int = 1
    spread: str = "max-min of repeat p50s"


class BenchRow(msgspec.Struct):
    """One graph at batch 1: ORT beside its native twin, and where the time goes."""

    model: str
    threat_model: str
    file: str
    input_kind: str
    ort_p50_us: float  # what model_perf's latency_us is
    ort_p99_us: float  # model_perf's p99_us
    ort_spread_us: float
    ort_floor_us: float  # session.run of an Identity graph of the same input
    bound: str  # where the time goes, in words
    native: str | None = None  # "torch" | "xgboost"; None: no checkpoint, ORT only
    native_p50_us: float | None = None
    native_p99_us: float | None = None
    native_spread_us: float | None = None
    ratio: float | None = None  # ort_p50_us / native_p50_us (< 1: ORT is faster)
    flops: float | None = None  # per window; for gbt: comparisons (see work_unit)
    work_unit: str | None = None  # "flop" | "comparison"
    work_detail: str = ""
    achieved_gflops: float | None = None
    share_of_peak: float | None = None  # FLOPs only
    kernel_share: float | None = None  # ORT profiler: share of run time inside node kernels
    top_ops: list[tuple[str, float]] = []
    nodes: int | None = None
    ort_repeat_p50_us: list[float] = []
    accuracy: float | None = None
    macro_f1: float | None = None
    accuracy_source: str | None = None  # "heldout" (this graph, measured) | "manifest"
    heldout_windows: int = 0


class TimingFigures(msgspec.Struct):
    p50_us: float
    p99_us: float
    spread_us: float
    calls: int


class ExtractorFigures(TimingFigures):
    windows: int
    episodes: int


class PathFigures(TimingFigures):
    what: str


class ReaderFigures(msgspec.Struct):
    rows_per_s: float
    spread_rows_per_s: float
    rows: int
    archives: list[str]


class BenchDoc(msgspec.Struct):
    schema_hash: str
    created: str
    machine: Machine
    method: BenchMethod
    models: list[BenchRow]
    run: str | None = None  # where the native models came from
    extractor_us: float | None = None
    path_us: float | None = None
    reader_rows_per_s: float | None = None
    extractor: ExtractorFigures | None = None
    path: PathFigures | None = None
    reader: ReaderFigures | None = None
    notes: list[str] = []
    format: int = BENCH_FORMAT


def perf_events(doc: BenchDoc) -> list[ModelPerf]:
    """One model_perf per benched graph with an accuracy, oracle first and realistic last.

    The deck keys a point by model name, latest wins, so it shows the realistic figure
    (the one a deployment reaches); the oracle twins go out too, with their threat_model."""
    rows = [
        r
        for r in doc.models
        if r.accuracy is not None and math.isfinite(r.accuracy) and math.isfinite(r.ort_p50_us)
    ]
    rows.sort(key=lambda r: r.threat_model == "realistic")  # stable: bench order within each
    return [
        ModelPerf(
            model=r.model,
            latency_us=max(0.0, r.ort_p50_us),
            accuracy=_unit(r.accuracy),  # type: ignore[arg-type]
            p99_us=r.ort_p99_us if math.isfinite(r.ort_p99_us) and r.ort_p99_us >= 0 else None,
            threat_model=r.threat_model,
        )
        for r in rows
    ]


# --- reading and writing -----------------------------------------------------------------------


class ArtifactError(ValueError):
    """A trainer/edge file that does not decode; the message names the file and the field."""


T = TypeVar("T")


def decode_doc(data: bytes, type: type[T], where: Path | str) -> T:
    """Decode one artifact; a bad one raises ArtifactError naming ``where`` and the field."""
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as e:
        # msgspec's message names the field: "Expected `int`, got `str` - at `$.models[0].bytes`"
        raise ArtifactError(f"{where}: {e} (not a {type.__name__})") from None
    except msgspec.DecodeError as e:
        try:  # only to say where the syntax breaks, in lines a person can find
            json.loads(data)
        except json.JSONDecodeError as j:
            raise ArtifactError(
                f"{where}: line {j.lineno} column {j.colno}: not valid JSON ({j.msg})"
            ) from None
        except UnicodeDecodeError:
            pass
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None


def read_doc(path: Path, type: type[T]) -> T:
    """Read and decode one artifact file; FileNotFoundError passes through (the caller names it)."""
    return decode_doc(path.read_bytes(), type, path)


def _numpy_scalar(obj: Any) -> Any:
    """numpy scalars (np.str_, np.float32, ...) that reach a Struct as plain values."""
    item = getattr(obj, "item", None)
    if item is None or getattr(obj, "ndim", None) != 0:
        raise TypeError(f"cannot encode {type(obj).__name__} in an artifact")
    return item()


_ENCODER = msgspec.json.Encoder(enc_hook=_numpy_scalar)


def encode_doc(doc: Any) -> bytes:
    """Indented JSON of an artifact Struct, newline-terminated (NaN becomes null)."""
    return msgspec.json.format(_ENCODER.encode(doc), indent=2) + b"\n"
