"""`phasewatch train`: every model for both threat models on one held-out split, then the report.

    phasewatch train --store data/store --out runs/latest --split host --profile quick

Writes the run directory of docs/ARCHITECTURE.md: run.json (``schema.artifacts.RunDoc``,
with every model's held-out metrics), one checkpoint per ``<model>-<threat>/``,
``heldout-<threat>.npz`` (the test windows at full width, for export parity and the
benchmark; ``trainer.heldout``) and report.json / report.html / *.png.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from schema.artifacts import (
    RUN_FILE,
    GroupMetrics,
    HeldoutMetrics,
    RunDoc,
    SplitDoc,
    encode_doc,
    estimate,
    heldout_file,
)
from schema.atomic import fsync_path, stage_dir, swap_dir
from schema.hashing import schema_hash
from schema.vocab import INDEX_NAME, MODEL_INPUT, MODELS, THREAT_MODELS
from trainer import evaluate as ev
from trainer.calibrate import calibration_metrics
from trainer.errors import DatasetError, TrainerError
from trainer.heldout import save_heldout_rows
from trainer.models.base import BUDGETS
from trainer.ood import ood_for_threat
from trainer.report import summary_table, write_report
from trainer.rows import Gather, Rows, chunk_rows, chunks, sample_positions

SPLITS = ("host", "sample", "time")
LOGREG_MAX_ROWS = 20_000  # the logistic baseline fits on a seeded sample of at most this many train windows
HELDOUT_MAX_WINDOWS = 10_000  # the held-out file keeps whole test episodes up to this many windows
DEFAULT_MEMORY_MB = 384  # shuffle buffer + validation cache + evaluation chunks (see docs/SCALE.md)
RUNTIME_MB = 750  # python + torch + xgboost + sklearn + a model: bench_scale train peak minus the budget
TABLE_BYTES_PER_WINDOW = 90  # the in-RAM window table
PHASE_LOG_ENV = "PHASEWATCH_PHASE_LOG"


class Windows(Protocol):
    """The corner of trainer.dataset.WindowSet that training reads."""

    tensor: np.ndarray
    summary: np.ndarray
    y: np.ndarray
    episode: np.ndarray
    host: np.ndarray
    profile: np.ndarray
    sample: np.ndarray
    window: np.ndarray

    def __len__(self) -> int: ...
    def mask(self, threat_model: str) -> np.ndarray: ...
    def finite(self, threat_model: str) -> np.ndarray: ...
    def rows(self, threat_model: str | None, kind: str, idx: np.ndarray) -> Rows: ...


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", type=Path, default=Path("data/store"), help="receiver store (default: data/store)"
    )
    p.add_argument("--index", type=Path, default=None, help="acceptance index (default: <store>/index.jsonl)")
    p.add_argument(
        "--out", type=Path, default=Path("runs/latest"), help="run directory to write (default: runs/latest)"
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="host",
        help="what is held out: a host, a sample or the latest time",
    )
    p.add_argument(
        "--profile",
        choices=BUDGETS,
        default="quick",
        help="model sizes and epochs: demo (~3 min), quick (default, <= ~12 min), full",
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument(
        "--threat", default=",".join(THREAT_MODELS), help="comma-separated subset of realistic,oracle"
    )
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: these models train on small batches, where a second OpenMP
    # thread on a busy 2-core box costs far more in spinning than it gains (5-20x slower seen).
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/xgboost threads (default 1; raise on an idle workstation)",
    )
    p.add_argument(
        "--cache", type=Path, default=None, help="feature cache directory (default: next to the index)"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs and paired gaps")
    p.add_argument(
        "--memory-budget",
        type=float,
        default=DEFAULT_MEMORY_MB,
        metavar="MB",
        help=f"windows held in RAM at once: shuffle buffer, validation cache, evaluation chunks "
        f"(default {DEFAULT_MEMORY_MB}); peak memory is this plus a fixed runtime, whatever the store's size",
    )
    p.add_argument("--jobs", type=int, default=None, help="extraction workers (default: all cores)")


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    picked = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in picked if s not in allowed]
    if bad or not picked:
        raise TrainerError(
            f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}"
        )
    return [s for s in allowed if s in picked]


def cli_train(args: argparse.Namespace) -> int:
    models = _choices(args.models, MODELS, "models")
    threats = _choices(args.threat, THREAT_MODELS, "threat")
    rank, world = 0, 1
    if _world_size() > 1:  # under torchrun: join the process group (trainer/loop.py)
        from trainer.loop import init_distributed

        rank, world = init_distributed()
    out, scratch = args.out, None
    if rank != 0:  # only rank 0 writes the run; the other ranks' copies go to a scratch dir
        scratch = out = Path(tempfile.mkdtemp(prefix=f"phasewatch-rank{rank}-"))
        os.environ.pop(PHASE_LOG_ENV, None)
    try:
        _train_cli_run(args, out, models, threats, progress=rank == 0)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _train_cli_run(
    args: argparse.Namespace, out: Path, models: list[str], threats: list[str], progress: bool
) -> None:
    train_run(
        args.store,
        args.index,
        out,
        progress=progress,
        split=args.split,
        profile=args.profile,
        models=models,
        threats=threats,
        seed=args.seed,
        threads=args.threads,
        cache_dir=args.cache,
        n_boot=args.n_boot,
        memory_mb=args.memory_budget,
        jobs=args.jobs,
    )


def train_run(
    store: Path,
    index: Path | None,
    out: Path,
    split: str = "host",
    profile: str = "quick",
    models: list[str] | tuple[str, ...] = MODELS,
    threats: list[str] | tuple[str, ...] = THREAT_MODELS,
    seed: int = 0,
    threads: int | None = None,
    cache_dir: Path | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    memory_mb: float = DEFAULT_MEMORY_MB,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Load the store's windows, split them, train and report. Returns the report dict."""
    from trainer.dataset import load_windows, make_split

    store = Path(store)
    index = Path(index) if index else store / INDEX_NAME
    _phase("extract")
    if _world_size() > 1:  # rank 0 extracts, the other ranks then read its shards
        from trainer.loop import rank_zero_first

        with rank_zero_first():
            ws = load_windows(store, index, cache_dir=cache_dir, jobs=jobs, progress=progress)
    else:
        ws = load_windows(store, index, cache_dir=cache_dir, jobs=jobs, progress=progress)
    _phase("split")
    sp = make_split(ws, kind=split, seed=seed)
    plan = memory_plan(ws, sp, models, memory_mb)
    if progress:
        print(format_plan(plan))
    run_info = {"store": str(store), "index": str(index), "index_sha256": _sha256(index)}
    return train_windowset(
        ws,
        sp,
        out,
        profile=profile,
        models=models,
        threats=threats,
        seed=seed,
        threads=threads,
        n_boot=n_boot,
        progress=progress,
        run_info=run_info,
        memory_mb=memory_mb,
        plan=plan,
    )


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _progress_bar(key: str, enabled: bool):
    """One tqdm bar per model: name, threat, epoch and validation score in the postfix."""
    from tqdm import tqdm

    bar = tqdm(desc=f"{key:<22}", unit="ep", disable=not enabled, leave=True, dynamic_ncols=True)

    def update(row: dict[str, Any]) -> None:
        bar.total = row.get("epochs", bar.total)
        bar.n = row["epoch"]
        post = {
            k: f"{row[k]:.3f}" for k in ("val_f1", "best_val_f1", "val_mlogloss", "train_loss") if k in row
        }
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return bar, update


def _train_into(
    ws: Windows,
    split: Any,
    out: Path,
    profile: str = "quick",
    models: list[str] | tuple[str, ...] = MODELS,
    threats: list[str] | tuple[str, ...] = THREAT_MODELS,
    seed: int = 0,
    threads: int | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    heldout_max: int | None = HELDOUT_MAX_WINDOWS,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``models`` x ``threats`` on ``split`` of ``ws`` and write the run directory.

    ``split`` has train/val/test window indices, kind, description, untested_profiles and
    to_json() (trainer.dataset.Split). ``overrides`` maps a model name to config entries
    (tests use it to cut epochs). ``memory_mb`` bounds the windows held at once (shuffle
    buffer, validation cache, evaluation chunks): ``ws`` may be a store-backed table whose
    arrays never all come into memory.
    """
    from trainer.models import build_model

    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    sh = schema_hash()
    y = np.asarray(ws.y, np.int64)
    report: dict[str, Any] = {
        "schema_hash": sh,
        "split": split.to_json(),
        "untested_profiles": list(split.untested_profiles),
        "profile": profile,
        "seed": seed,
        "n_boot": n_boot,
        "models": {},
        "baselines": {},
        "comparisons": [],
        "threat_gap": {},
        "best": {},
        "verdict": {},
    }
    test_pred: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (global test idx, predicted class)
    dropped: dict[str, dict[str, int]] = {}

    budget = float(memory_mb) * 2**20
    for threat in threats:
        # Coverage, and no NaN in the view (the extractor never emits one for a source the
        # threat model uses; the shards record the check, guard anyway, loudly).
        usable = np.asarray(ws.mask(threat), bool) & np.asarray(ws.finite(threat), bool)
        idx = {
            part: np.asarray(getattr(split, part))[usable[np.asarray(getattr(split, part))]]
            for part in ("train", "val", "test")
        }
        dropped[threat] = {part: int(len(getattr(split, part)) - len(idx[part])) for part in idx}
        te = idx["test"]
        if min(len(v) for v in idx.values()) == 0:
            raise DatasetError(
                f"{threat}: split leaves an empty side after dropping unusable windows "
                f"({ {k: len(v) for k, v in idx.items()} }); need more episodes"
            )
        kinds = [
            k for k in ("summary", "tensor") if any(MODEL_INPUT[m] == k for m in models) or k == "summary"
        ]
        rows = {k: {part: ws.rows(threat, k, ix) for part, ix in idx.items()} for k in kinds}
        _phase(f"heldout {threat}")
        # Full width (all 46 channels), like every array that crosses a file boundary.
        full = {k: ws.rows(None, k, te) for k in ("tensor", "summary")}
        save_heldout_rows(out / heldout_file(threat), ws, full, te, heldout_max, seed, budget / 4)
        meta = {"episode": ws.episode[te], "host": ws.host[te], "profile": ws.profile[te]}

        # Baselines on the same windows: what "the model learnt something" is measured against.
        # logreg fits on at most LOGREG_MAX_ROWS train windows (a seeded uniform sample).
        _phase(f"fit logreg-{threat}")
        xs = rows["summary"]
        lr_pos = sample_positions(len(xs["train"]), LOGREG_MAX_ROWS, seed)
        clf = ev.fit_logistic(xs["train"].take(lr_pos), y[idx["train"]][lr_pos], seed=seed)
        _phase(f"evaluate logreg-{threat}")
        lr_proba = np.concatenate(
            [ev.logistic_proba(clf, c) for c in chunks(xs["test"], chunk_rows(xs["test"], budget / 4))]
        )
        for name, proba in (
            ("majority", ev.majority_baseline(y[idx["train"]], len(te))),
            ("logreg", lr_proba),
        ):
            key = f"{name}-{threat}"
            report["baselines"][key] = _metrics(y[te], proba, meta, n_boot, seed) | {
                "model": name,
                "threat_model": threat,
            }
            test_pred[key] = (te, proba.argmax(axis=1))

        for name in models:
            key = f"{name}-{threat}"
            x = rows[MODEL_INPUT[name]]
            extra = dict((overrides or {}).get(name, {}))
            if threads:
                extra.setdefault("threads", threads)
            extra.setdefault("memory_mb", float(memory_mb))
            model = build_model(name, x["train"].row_shape, n_classes=5, profile=profile, seed=seed, **extra)
            bar, update = _progress_bar(key, progress)
            _phase(f"fit {key}")
            try:
                fit = model.fit(x["train"], y[idx["train"]], x["val"], y[idx["val"]], progress=update)
                bar.set_postfix({"best_val_f1": f"{fit.best_val_f1:.3f}", "s": f"{fit.seconds:.0f}"})
            finally:
                bar.close()
            model.save(out / key, schema_hash=sh)
            _phase(f"evaluate {key}")
            proba = np.concatenate(
                [model.predict_proba(c) for c in chunks(x["test"], chunk_rows(x["test"], budget / 4))]
            )
            report["models"][key] = _metrics(y[te], proba, meta, n_boot, seed) | {
                "model": name,
                "threat_model": threat,
                "input_kind": MODEL_INPUT[name],
                "fit": {
                    "seconds": round(fit.seconds, 2),
                    "best_epoch": fit.best_epoch,
                    "epochs_run": fit.epochs_run,
                    "best_val_f1": fit.best_val_f1,
                    "stopped": fit.stopped,
                },
                # ECE/NLL before and after the validation temperature, on these held-out windows.
                "calibration": calibration_metrics(
                    proba, y[te], model.inverse_temperature, meta["episode"], n_boot, seed
                )
                | {"validation": fit.calibration},
            }
            test_pred[key] = (te, proba.argmax(axis=1))
        trained = [m for m in models if f"{m}-{threat}" in report["models"]]
        # The OOD flag, fitted on this threat model's training windows only (trainer/ood.py);
        # its detector goes into the run as ood-<threat>.json for export.
        report.setdefault("ood", {})[threat] = ood_for_threat(
            Gather(ws.rows(None, "summary", np.arange(len(ws)))),  # full width, read as indexed
            idx,
            y,
            test_pred,
            ws.episode,
            ws.profile,
            threat,
            out,
            n_boot,
            seed,
        )
        if trained:
            report["best"][threat] = max(
                (f"{m}-{threat}" for m in trained), key=lambda k: report["models"][k]["macro_f1"]
            )
        # Every model-vs-model gap within this threat model (same windows, paired).
        for a, b in itertools.combinations(trained, 2):
            report["comparisons"].append(
                _paired(f"{a}-{threat}", f"{b}-{threat}", threat, y, test_pred, ws, n_boot, seed)
            )

    if "realistic" in report["best"]:
        best = report["best"]["realistic"]
        for base in ("majority", "logreg"):
            report["verdict"][f"best_realistic_vs_{base}"] = _paired(
                best, f"{base}-realistic", "realistic", y, test_pred, ws, n_boot, seed
            )
    if set(threats) >= {"realistic", "oracle"}:
        for name in models:
            g = _paired(f"{name}-realistic", f"{name}-oracle", "both", y, test_pred, ws, n_boot, seed)
            report["threat_gap"][name] = {"realistic": g.pop("f1_a"), "oracle": g.pop("f1_b"), **g}

    report["dropped_unusable_windows"] = dropped
    if plan is not None:
        report["plan"] = plan
    report["seconds"] = round(time.perf_counter() - started, 1)
    run_doc = RunDoc(
        schema_hash=sh,
        split=SplitDoc(**split.to_json()),
        profile=profile,
        seed=seed,
        threads=threads,
        **(run_info or {}),
        models=list(report["models"]),
        threat_models=list(threats),
        metrics={k: heldout_metrics(m) for k, m in report["models"].items()},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=report["seconds"],
        cpu_count=os.cpu_count(),
    )
    (out / RUN_FILE).write_bytes(encode_doc(run_doc))
    _phase("report")
    write_report(out, report)
    return report


def _is_run_dir(path: Path) -> bool:
    """May a new run replace ``path``? Only an empty directory or an earlier run."""
    return path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or (path / RUN_FILE).exists())


def train_windowset(
    ws: Windows, split: Any, out: Path, progress: bool = True, **settings: Any
) -> dict[str, Any]:
    """Train ``models`` x ``threats`` on ``split`` of ``ws`` and write the run directory ``out``
    whole or not at all: the run is written beside it and swapped in at the end, so a
    ``kill -9`` or a full disk mid-training leaves the previous run as it was (the next run
    removes the dead one's temporary). ``settings`` are ``_train_into``'s."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not _is_run_dir(out):
        raise TrainerError(
            f"{out}: exists and is not a run directory (no {RUN_FILE}); refusing to replace it"
        )
    stage = stage_dir(out)
    try:
        report = _train_into(ws, split, stage, progress=progress, **settings)
        for f in stage.rglob("*"):
            if f.is_file():
                fsync_path(f)
        swap_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _phase("done")
    if progress:
        print(summary_table(report))
        print(f"run written to {out} ({report['seconds']:.0f} s); open {out / 'report.html'}")
    return report


def _metrics(
    y_true: np.ndarray, proba: np.ndarray, meta: dict[str, np.ndarray], n_boot: int, seed: int
) -> dict[str, Any]:
    m = ev.evaluate_predictions(
        y_true, proba, meta["episode"], meta["host"], meta["profile"], n_boot=n_boot, seed=seed
    )
    ci = m.pop("macro_f1")
    # Flat macro_f1 + macro_f1_ci: the shape export and the deck read.
    return {"macro_f1": ci["point"], "macro_f1_ci": [ci["lo"], ci["hi"]], **m}


def heldout_metrics(m: dict[str, Any]) -> HeldoutMetrics:
    """A report.json model entry (``_metrics``) -> what run.json and the manifest carry."""
    lo, hi = m["macro_f1_ci"]
    return HeldoutMetrics(
        accuracy=estimate(m["accuracy"]),
        macro_f1=estimate(m["macro_f1"], lo, hi),
        n_windows=int(m["n_windows"]),
        n_episodes=int(m["n_episodes"]),
        per_class_f1=dict(m.get("per_class_f1", {})),
        per_profile={k: GroupMetrics(**v) for k, v in m.get("per_profile", {}).items()},
    )


def _paired(
    a: str,
    b: str,
    threat: str,
    y: np.ndarray,
    test_pred: dict[str, tuple[np.ndarray, np.ndarray]],
    ws: Windows,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Paired episode bootstrap of F1(a) - F1(b) on the windows both were tested on."""
    (ia, pa), (ib, pb) = test_pred[a], test_pred[b]
    common, ja, jb = np.intersect1d(ia, ib, return_indices=True)
    gap = ev.paired_bootstrap(y[common], pa[ja], pb[jb], ws.episode[common], n_boot=n_boot, seed=seed)
    return {
        "a": a,
        "b": b,
        "threat_model": threat,
        "n_windows": int(len(common)),
        "f1_a": ev.macro_f1(y[common], pa[ja]),
        "f1_b": ev.macro_f1(y[common], pb[jb]),
        **gap.as_dict(),
    }


def _phase(name: str) -> None:
    """A timestamped phase line for benchmarks/bench_scale.py (only when it asks for one)."""
    log = os.environ.get(PHASE_LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{time.time():.3f} {name}\n")


def memory_plan(ws: Any, split: Any, models: list[str] | tuple[str, ...], memory_mb: float) -> dict[str, Any]:
    """What this run reads and the peak memory it expects (docs/SCALE.md explains each term)."""
    n_tr = len(split.train)
    table_mb = TABLE_BYTES_PER_WINDOW * len(ws) / 2**20
    gbt_mb = 0.0
    if "gbt" in models:  # the quantised train matrix: one byte per feature (capped by external memory)
        gbt_mb = min(n_tr * 368 * 1.5 / 2**20, memory_mb / 2)
    eval_mb = len(split.test) * 64 / 2**20  # probabilities, labels and keys of the test windows
    peak = RUNTIME_MB + table_mb + memory_mb + gbt_mb + eval_mb
    disk = ws.disk_bytes() if hasattr(ws, "disk_bytes") else 0
    return {
        "episodes": int(len(np.unique(np.asarray(ws.episode)))),
        "windows": int(len(ws)),
        "train": n_tr,
        "val": int(len(split.val)),
        "test": int(len(split.test)),
        "window_store_gb": round(disk / 1e9, 2),
        "memory_budget_mb": memory_mb,
        "table_mb": round(table_mb, 1),
        "gbt_matrix_mb": round(gbt_mb, 1),
        "evaluation_mb": round(eval_mb, 1),
        "runtime_mb": RUNTIME_MB,
        "expected_peak_mb": round(peak),
    }


def format_plan(p: dict[str, Any]) -> str:
    return (
        f"plan: {p['episodes']:,} episodes, {p['windows']:,} windows "
        f"(train {p['train']:,} / val {p['val']:,} / test {p['test']:,}), "
        f"window store {p['window_store_gb']} GB on disk\n"
        f"      memory: runtime {p['runtime_mb']} MB + table {p['table_mb']} MB + data budget "
        f"{p['memory_budget_mb']:.0f} MB (--memory-budget) + gbt matrix {p['gbt_matrix_mb']} MB + evaluation "
        f"{p['evaluation_mb']} MB -> expected peak ~{p['expected_peak_mb']:,} MB"
    )
