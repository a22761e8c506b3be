"""Small-data check: every model, default profile, a few hundred windows, lengths 20 to 200 steps.

    nice -n 10 python benchmarks/bench_small_data.py --store data/store [--lengths 20,50,100,200]
        [--train 300 --val 100 --test 400] [--models gbt,mlp,...] [--profile quick] [--out runs/small-data]
        [--seeds 0,1,2]

Draws ``--train`` windows from the training hosts, ``--val`` from a validation host and
``--test`` from a held-out host of the synthetic store (the same host split as
``phasewatch train``), then for each length L builds the tensor view at L steps (L <= 100:
the window's last L steps; L > 100: the 100 steps linearly resampled to L, so the same
10 s is seen at a finer step) and its summary view recomputed from those steps. Every
model trains through ``build_model(...).fit`` exactly as a new user would. It prints, per
length, each model's held-out macro F1 with its episode-bootstrap CI and the paired
bootstrap gap to the best model of that length; the target is every model within
``--within`` (default 0.03) of the best. ``--seeds 0,1,2`` runs the whole check once per
seed (split, draws, model seeds) and prints each model's mean ± sd macro F1 and its mean gap
to each seed's best; the target is then judged on the mean gap. Writes ``small-data.json``
and ``small-data.png``.
Not part of ``make test``: on the shared 2-core box a full sweep takes tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schema import extract  # noqa: E402
from schema.channels import WINDOW_STEPS  # noqa: E402
from schema.vocab import MODEL_INPUT, MODELS  # noqa: E402
from trainer import evaluate as ev  # noqa: E402


def at_length(tensor: np.ndarray, steps: int) -> np.ndarray:
    """(N, C, 100) -> (N, C, steps): the last ``steps`` steps, or a linear resampling when longer."""
    t = tensor.shape[-1]
    if steps <= t:
        return np.ascontiguousarray(tensor[..., t - steps :], np.float32)
    src = np.linspace(0.0, t - 1.0, steps)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    frac = (src - lo).astype(np.float32)
    return np.ascontiguousarray(tensor[..., lo] * (1 - frac) + tensor[..., hi] * frac, np.float32)


def draw(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "data" / "store")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache (default: next to the index)")
    ap.add_argument("--lengths", default="20,50,100,200")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--threat", default="realistic", choices=("realistic", "oracle"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (e.g. 0,1,2): the whole check once per seed, then mean ± sd per model",
    )
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--within", type=float, default=0.03, help="target gap to the best model")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "small-data")
    ap.add_argument(
        "--ts",
        type=Path,
        nargs="*",
        default=[],
        help="instead of the store: UEA/UCR set directories holding <name>_TRAIN.ts and <name>_TEST.ts",
    )
    ap.add_argument("--val-share", type=float, default=0.2, help="--ts: share of TRAIN used for validation")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    lengths = [int(s) for s in args.lengths.split(",") if s.strip()]
    models = [m for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        raise SystemExit(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    if bad_len := [n for n in lengths if not 2 <= n <= 10 * WINDOW_STEPS]:
        raise SystemExit(f"--lengths: {bad_len} outside 2..{10 * WINDOW_STEPS}")
    if args.seeds is None:
        return finish(run_once(args, lengths, models), args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    docs = []
    for seed in seeds:
        print(f"--- seed {seed} ---", flush=True)
        args.seed = seed
        docs.append(run_once(args, lengths, models))
    return finish(aggregate(docs, args.within), args.out)


def run_once(args: argparse.Namespace, lengths: list[int], models: list[str]) -> dict[str, Any]:
    """One seed of the check: the split and draws, every model's fit and its scores."""
    from trainer.dataset import load_windows, make_split

    if args.ts:
        doc: dict[str, Any] = {
            "profile": args.profile,
            "seed": args.seed,
            "within": args.within,
            "lengths": {},
        }
        for d in args.ts:
            views, labels = ts_set(d, args.val_share, args.seed)
            print(f"{d.name}: { ({k: v.shape for k, v in views.items()}) }", flush=True)
            groups = np.arange(len(labels["test"]))  # one series, one resampling unit
            doc["lengths"][d.name] = score_models(views, labels, groups, models, args, d.name)
            doc.setdefault("windows", {})[d.name] = {k: int(len(v)) for k, v in labels.items()}
        doc["threat_model"] = "n/a (public .ts sets)"
        return doc

    ws = load_windows(args.store, cache_dir=args.cache)
    split = make_split(ws, "host", seed=args.seed)
    usable = np.asarray(ws.mask(args.threat), bool) & np.asarray(ws.finite(args.threat), bool)
    rng = np.random.default_rng(args.seed)
    parts = {}
    for part, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        idx = np.asarray(getattr(split, part))
        parts[part] = draw(idx[usable[idx]], n, rng)
    y = np.asarray(ws.y, np.int64)
    te = parts["test"]
    # Only the drawn windows are read from the window store: (n, C, 100) per part.
    raw = {p: ws.rows(args.threat, "tensor", i).take(np.arange(len(i))) for p, i in parts.items()}
    print(
        f"small data: {len(parts['train'])} train / {len(parts['val'])} val / {len(te)} test windows "
        f"({split.description}); {len(np.unique(ws.episode[te]))} test episodes; profile {args.profile}",
        flush=True,
    )

    doc: dict[str, Any] = {
        "store": str(args.store),
        "split": split.to_json(),
        "untested_profiles": list(split.untested_profiles),
        "windows": {k: int(len(v)) for k, v in parts.items()},
        "profile": args.profile,
        "threat_model": args.threat,
        "seed": args.seed,
        "within": args.within,
        "lengths": {},
    }
    for steps in lengths:
        views = {p: at_length(raw[p], steps) for p in parts}
        labels = {p: y[i] for p, i in parts.items()}
        doc["lengths"][str(steps)] = score_models(views, labels, ws.episode[te], models, args, f"L={steps}")
    return doc


def aggregate(docs: list[dict[str, Any]], within: float) -> dict[str, Any]:
    """Several seeds' docs -> one: per model and length, mean ± sd (population) of macro F1,
    accuracy and the paired gap to that seed's best; within target when the mean gap is."""
    first = docs[0]
    out: dict[str, Any] = {k: v for k, v in first.items() if k not in ("lengths", "seed", "split")}
    out["seeds"] = [d["seed"] for d in docs]
    out["per_seed"] = docs
    out["lengths"] = {}
    for key, block in first["lengths"].items():
        rows: dict[str, Any] = {}
        for m in block["models"]:
            per = [d["lengths"][key]["models"][m] for d in docs]
            f1 = np.array([r["macro_f1"] for r in per])
            acc = np.array([r["accuracy"] for r in per])
            gap = np.array([r["gap_to_best"]["diff"] for r in per])
            rows[m] = {
                "macro_f1": float(f1.mean()),
                "macro_f1_sd": float(f1.std()),
                # the band the plot draws: mean ± sd over seeds (not a bootstrap CI)
                "macro_f1_ci": [float(f1.mean() - f1.std()), float(f1.mean() + f1.std())],
                "accuracy": float(acc.mean()),
                "accuracy_sd": float(acc.std()),
                "gap_to_best": {"diff": float(gap.mean()), "sd": float(gap.std()), "per_seed": gap.tolist()},
                "within_target": bool(gap.mean() >= -within),
                "within_target_seeds": int(sum(r["within_target"] for r in per)),
            }
        best = max(rows, key=lambda m: rows[m]["macro_f1"])
        out["lengths"][key] = {
            "best": best,
            "models": rows,
            "best_per_seed": [d["lengths"][key]["best"] for d in docs],
        }
    return out


def finish(doc: dict[str, Any], out: Path) -> int:
    print(format_table(doc))
    out.mkdir(parents=True, exist_ok=True)
    (out / "small-data.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out / "small-data.png")
    print(f"written {out / 'small-data.json'} and {out / 'small-data.png'}")
    return 0


def score_models(
    views: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    groups: np.ndarray,
    models: list[str],
    args: argparse.Namespace,
    tag: str,
) -> dict[str, Any]:
    """Train every model on views["train"] (early stopping on "val"), score on "test"."""
    from trainer.models import build_model

    summ = {p: extract.summarize(v).astype(np.float32) for p, v in views.items()}
    n_classes = int(max(int(v.max()) for v in labels.values()) + 1)
    y_te = labels["test"]
    preds: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in models:
        x = views if MODEL_INPUT[name] == "tensor" else summ
        t0 = time.perf_counter()
        model = build_model(
            name, x["train"].shape[1:], n_classes=n_classes, profile=args.profile, seed=args.seed, threads=1
        )
        fit = model.fit(x["train"], labels["train"], x["val"], labels["val"])
        pred = model.predict(x["test"])
        ci = ev.bootstrap_ci(y_te, pred, groups, n_boot=args.n_boot, seed=args.seed)
        preds[name] = pred
        rows[name] = {
            "macro_f1": ci.point,
            "macro_f1_ci": [ci.lo, ci.hi],
            "accuracy": float((pred == y_te).mean()),
            "fit_seconds": round(time.perf_counter() - t0, 1),
            "epochs_run": fit.epochs_run,
            "stopped": fit.stopped,
        }
        print(
            f"  {tag:<16} {name:<12} F1 {ci.point:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]  "
            f"acc {rows[name]['accuracy']:.3f}  {rows[name]['fit_seconds']:>6.1f} s  {fit.stopped}",
            flush=True,
        )
    best = max(rows, key=lambda m: rows[m]["macro_f1"])
    for name in models:
        gap = ev.paired_bootstrap(y_te, preds[name], preds[best], groups, n_boot=args.n_boot, seed=args.seed)
        rows[name]["gap_to_best"] = gap.as_dict()
        rows[name]["within_target"] = bool(gap.diff >= -args.within)
    return {"best": best, "models": rows}


def read_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A UEA/UCR ``.ts`` file -> float32 (N, C, T) and str labels; ragged series padded by their end."""
    series: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        try:
            series.append([[float(v) for v in d.split(",") if v not in ("?", "")] for d in dims])
        except ValueError as e:
            raise SystemExit(f"{path}: line {lineno}: not a number ({e})") from None
        labels.append(label.strip())
    if not series:
        raise SystemExit(f"{path}: no @data rows")
    t = max(len(d) for s in series for d in s)
    x = np.stack([[np.pad(d, (0, t - len(d)), mode="edge") for d in s] for s in series]).astype(np.float32)
    return np.nan_to_num(x), np.array(labels)


def ts_set(
    directory: Path, val_share: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """<dir>/<name>_TRAIN.ts and _TEST.ts; a stratified ``val_share`` of TRAIN becomes validation."""
    name = directory.name
    x_tr, l_tr = read_ts(directory / f"{name}_TRAIN.ts")
    x_te, l_te = read_ts(directory / f"{name}_TEST.ts")
    classes = sorted(set(l_tr) | set(l_te))
    y_tr = np.array([classes.index(v) for v in l_tr])
    y_te = np.array([classes.index(v) for v in l_te])
    t = max(x_tr.shape[2], x_te.shape[2])
    x_tr, x_te = (np.pad(x, ((0, 0), (0, 0), (0, t - x.shape[2])), mode="edge") for x in (x_tr, x_te))
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y_tr), bool)
    for c in np.unique(y_tr):
        idx = rng.permutation(np.flatnonzero(y_tr == c))
        val[idx[: max(1, round(val_share * len(idx)))]] = True
    views = {"train": x_tr[~val], "val": x_tr[val], "test": x_te}
    labels = {"train": y_tr[~val], "val": y_tr[val], "test": y_te}
    return views, labels


def format_table(doc: dict[str, Any]) -> str:
    lengths = list(doc["lengths"])
    models = list(next(iter(doc["lengths"].values()))["models"]) if lengths else []
    w = 30 if "seeds" in doc else 22  # "0.969±0.005 (-0.024±0.006)" is wider than one seed's cell
    head = f"{'model':<12}" + "".join(f"{('L=' + n) if n.isdigit() else n:>{w}}" for n in lengths)
    over = (
        f"mean ± sd over seeds {','.join(map(str, doc['seeds']))} (mean gap to each seed's best ± sd)"
        if "seeds" in doc
        else "gap to the best of that length, paired episode bootstrap 95% CI"
    )
    lines = [
        f"held-out macro F1 ({over}); * = {'mean gap ' if 'seeds' in doc else ''}more than "
        f"{doc['within']:.2f} behind",
        head,
        "-" * len(head),
    ]
    for m in models:
        cells = []
        for n in lengths:
            r = doc["lengths"][n]["models"][m]
            g = r["gap_to_best"]
            mark = " " if r["within_target"] else "*"
            if "sd" in g:  # several seeds: mean ± sd of F1, mean gap ± sd
                cells.append(
                    f"{r['macro_f1']:.3f}±{r['macro_f1_sd']:.3f} ({g['diff']:+.3f}±{g['sd']:.3f}){mark}"
                )
            else:
                cells.append(f"{r['macro_f1']:.3f} ({g['diff']:+.3f} [{g['lo']:+.2f},{g['hi']:+.2f}]){mark}")
        lines.append(f"{m:<12}" + "".join(f"{c:>{w}}" for c in cells))
    if doc.get("untested_profiles"):
        lines.append(f"untested profiles (no held-out windows): {', '.join(doc['untested_profiles'])}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["lengths"])
    numeric = all(k.isdigit() for k in keys)
    xs = [int(k) for k in keys] if numeric else list(range(len(keys)))
    models = list(next(iter(doc["lengths"].values()))["models"]) if keys else []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in models:
        rows = [doc["lengths"][k]["models"][m] for k in keys]
        (line,) = ax.plot(xs, [r["macro_f1"] for r in rows], marker="o", label=m)
        lo, hi = [r["macro_f1_ci"][0] for r in rows], [r["macro_f1_ci"][1] for r in rows]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.08)
    if numeric:
        ax.set_xlabel("window length (steps)")
        w = doc["windows"]
        ax.set_title(
            f"small data: {w['train']} train windows, profile {doc['profile']}, {doc['threat_model']}"
        )
    else:
        ax.set_xticks(xs, keys)
        ax.set_title(f"public multivariate sets, profile {doc['profile']}")
    ax.set_ylabel("held-out macro F1" + (f" (mean ± sd, seeds {doc['seeds']})" if "seeds" in doc else ""))
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
