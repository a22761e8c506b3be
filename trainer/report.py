"""The run's report: report.json for machines, a terminal table, report.html with PNG figures.

The report dict is built by :mod:`trainer.train`; this module only renders it. Layout:

    {"schema_hash", "split": {...}, "untested_profiles": [...], "profile", "seed", "n_boot",
     "models":    {"<model>-<threat>": ModelMetrics},      # what export reads
     "baselines": {"majority-<threat>" | "logreg-<threat>": ModelMetrics},
     "comparisons": [{"a", "b", "threat_model", "diff", "lo", "hi", "p_value", "significant"}],
     "threat_gap":  {"<model>": {"realistic", "oracle", "diff", "lo", "hi", "p_value", "significant",
                                 "n_windows"}},
     "best": {"<threat>": "<model>-<threat>"},
     "verdict": {"best_vs_majority": {...}, "best_vs_logreg": {...}}}

ModelMetrics: macro_f1 (float), macro_f1_ci [lo, hi], accuracy, n_windows, n_episodes,
per_class_f1, per_profile, per_host, confusion {labels, matrix}, fit {...} for trained models.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from schema.vocab import MODELS, THREAT_MODELS


def _fmt(x: float | None, digits: int = 3) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, threat, metrics) for models then baselines, in a stable order."""
    out = []
    for threat in THREAT_MODELS:
        for name in (*MODELS, "logreg", "majority"):
            src = report.get("models", {}) if name in MODELS else report.get("baselines", {})
            m = src.get(f"{name}-{threat}")
            if m:
                out.append((name, threat, m))
    return out


def summary_table(report: dict[str, Any]) -> str:
    """What the terminal shows at the end of a run."""
    split = report.get("split", {})
    lines = [
        f"held-out split: {split.get('kind', '?')} — {split.get('description', '')}",
        f"macro F1 on {split.get('windows', {}).get('test', '?')} held-out windows; "
        f"95% CI resamples episodes ({report.get('n_boot', '?')} resamples)",
        "",
    ]
    head = (
        f"{'model':<12} {'threat':<10} {'macro F1':>8}  {'95% CI':<15} {'acc':>6} {'windows':>8} "
        f"{'fit s':>7}  stopped"
    )
    lines += [head, "-" * len(head)]
    best = set(report.get("best", {}).values())
    for name, threat, m in _rows(report):
        lo, hi = m.get("macro_f1_ci", [None, None])
        fit = m.get("fit") or {}
        star = " *" if f"{name}-{threat}" in best else ""
        lines.append(
            f"{name:<12} {threat:<10} {_fmt(m.get('macro_f1')):>8}  [{_fmt(lo)}, {_fmt(hi)}]  "
            f"{_fmt(m.get('accuracy')):>6} {m.get('n_windows', 0):>8} "
            f"{_fmt(fit.get('seconds'), 1) if fit else '':>7}  {fit.get('stopped', 'baseline')}{star}"
        )
    gap = report.get("threat_gap", {})
    if gap:
        lines += ["", "realistic vs oracle (same windows; diff = realistic - oracle):"]
        for name, g in gap.items():
            lines.append(
                f"  {name:<12} realistic {_fmt(g['realistic'])}  oracle {_fmt(g['oracle'])}  "
                f"diff {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]  "
                f"{'significant' if g['significant'] else 'not significant'}"
            )
    for key, v in report.get("verdict", {}).items():
        lines.append(
            f"{key.replace('_', ' ')}: {v['a']} - {v['b']} = {v['diff']:+.3f} "
            f"[{v['lo']:+.3f}, {v['hi']:+.3f}] p={v['p_value']:.3f} "
            f"{'(significant)' if v['significant'] else '(NOT significant)'}"
        )
    sig = [c for c in report.get("comparisons", []) if c["significant"]]
    lines.append(
        f"model-vs-model gaps: {len(sig)} of {len(report.get('comparisons', []))} significant "
        "(paired episode bootstrap; all in report.json)"
    )
    lines += calibration_lines(report)
    lines += ood_lines(report)
    untested = report.get("untested_profiles") or []
    if untested:
        lines.append(f"UNTESTED profiles (in train, absent from the held-out side): {', '.join(untested)}")
    return "\n".join(lines)


def _calibrated(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(n, t, m["calibration"]) for n, t, m in _rows(report) if n in MODELS and m.get("calibration")]


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """Held-out ECE before -> after the validation temperature, with the paired gap's CI."""
    rows = _calibrated(report)
    if not rows:
        return []
    lines = [
        "",
        "calibration (held-out ECE, 15 bins; temperature fitted on validation; gap = after - before):",
    ]
    for name, threat, c in rows:
        g = (c.get("bootstrap") or {}).get("gap")
        gap = (
            f"  gap {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] "
            f"{'significant' if g['significant'] else 'not significant'}"
            if g and g.get("lo") is not None
            else ""
        )
        lines.append(
            f"  {name + '-' + threat:<22} T={c['temperature']:<7.3g} ECE {_fmt(c['ece_before'])} -> "
            f"{_fmt(c['ece_after'])}  NLL {_fmt(c['nll_before'])} -> {_fmt(c['nll_after'])}{gap}"
        )
    return lines


def ood_lines(report: dict[str, Any]) -> list[str]:
    """The OOD flag: AUROC against training-host windows, accuracy flagged vs unflagged."""
    sec = report.get("ood") or {}
    lines: list[str] = []
    for threat, o in sec.items():
        if "skipped" in o:
            lines += ["", f"OOD flag ({threat}): not fitted: {o['skipped']}"]
            continue
        a, v = o["auroc_heldout_vs_training_hosts"], o["auroc_validation_host_vs_training_hosts"]
        lines += [
            "",
            f"OOD flag ({threat}; ood >= 0.5 = raw score above the {o['quantile']:.0%} quantile of unseen "
            f"training-host windows):",
            f"  AUROC held-out hosts vs training hosts {_fmt(a['point'])} "
            f"[{_fmt(a['lo'])}, {_fmt(a['hi'])}]; validation host vs training hosts "
            f"{_fmt(v['point'])} [{_fmt(v['lo'])}, {_fmt(v['hi'])}]",
            f"  flagged: {o['flagged_share_heldout']:.1%} of held-out, "
            f"{o['flagged_share_validation_host']:.1%} of validation-host, "
            f"{o['flagged_share_training_hosts']:.1%} of unseen training-host windows",
        ]
        for key, f in o.get("accuracy_flagged_vs_unflagged", {}).items():
            g = f.get("gap") or {}
            lo, hi = g.get("lo"), g.get("hi")
            ci = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "[  -  ]"
            lines.append(
                f"  {key:<22} acc flagged {_fmt(f['accuracy_flagged'])} (n={f['n_flagged']}) "
                f"unflagged {_fmt(f['accuracy_unflagged'])} (n={f['n_unflagged']}) "
                f"gap {_signed(g.get('diff'))} {ci}"
                f"{' significant' if g.get('significant') else ''}"
            )
    return lines


# --- figures ---------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusions(report: dict[str, Any], threat: str, path: Path) -> Path | None:
    items = [(n, m) for n, t, m in _rows(report) if t == threat and n in MODELS]
    if not items:
        return None
    plt = _plt()
    cols = min(3, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.ravel()[len(items) :]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.ravel(), items):
        labels, cm = m["confusion"]["labels"], np.asarray(m["confusion"]["matrix"], float)
        # Row-normalised: each true phase sums to 1, so rare phases are as visible as common ones.
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black",
                )
        short = [l.replace("infected_running", "running") for l in labels]
        ax.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), short, fontsize=7)
        ax.set_title(f"{name}-{threat}  F1 {m['macro_f1']:.3f}", fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_profile(report: dict[str, Any], path: Path) -> Path | None:
    items = [(f"{n}-{t}", m) for n, t, m in _rows(report) if n in MODELS]
    if not items:
        return None
    profiles = sorted({p for _, m in items for p in m.get("per_profile", {})})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(profiles) + 2), 4.5))
    width = 0.8 / len(items)
    for i, (key, m) in enumerate(items):
        vals = [m["per_profile"].get(p, {}).get("macro_f1", np.nan) for p in profiles]
        ax.bar(
            np.arange(len(profiles)) + i * width - 0.4 + width / 2,
            vals,
            width,
            label=key,
            hatch="//" if key.endswith("oracle") else None,
            alpha=0.9,
        )
    ax.set_xticks(range(len(profiles)), profiles, rotation=20)
    ax.set_ylabel("macro F1 (held-out)")
    ax.set_ylim(0, 1)
    ax.set_title("macro F1 per attack profile (hatched: oracle)")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(report: dict[str, Any], path: Path) -> Path | None:
    rows = _rows(report)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    for i, (name, threat, m) in enumerate(rows):
        lo, hi = m["macro_f1_ci"]
        colour = "tab:blue" if threat == "realistic" else "tab:orange"
        marker = "o" if name in MODELS else "s"
        ax.errorbar(
            m["macro_f1"],
            i,
            xerr=[[m["macro_f1"] - lo], [hi - m["macro_f1"]]],
            fmt=marker,
            color=colour,
            capsize=3,
        )
    ax.set_yticks(range(len(rows)), [f"{n}-{t}" for n, t, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out macro F1 with 95% episode-bootstrap CI (squares: baselines)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(report: dict[str, Any], threat: str, path: Path) -> Path | None:
    """Reliability diagram per model: accuracy against confidence, before and after temperature scaling."""
    items = [(n, c) for n, t, c in _calibrated(report) if t == threat]
    if not items:
        return None
    plt = _plt()
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, c) in zip(axes.flat, items):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        for which, style in (("before", dict(color="0.45", ls="--")), ("after", dict(color="tab:blue"))):
            rel = c[f"reliability_{which}"]
            pts = [(x, y) for x, y in zip(rel["confidence"], rel["accuracy"]) if x is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=f"{which}: ECE {_fmt(c[f'ece_{which}'])}", **style)
        ax.set_title(f"{name} (T={c['temperature']:.3g})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.suptitle(
        f"reliability on held-out windows, {threat} (dashed: before temperature scaling)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ood(report: dict[str, Any], path: Path) -> Path | None:
    """Per threat model: where the ood score falls for training-host, validation-host and held-out windows."""
    sec = {t: o for t, o in (report.get("ood") or {}).items() if o.get("histogram")}  # not "skipped"
    if not sec:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sec), figsize=(5.5 * len(sec), 3.6), squeeze=False)
    for ax, (threat, o) in zip(axes.flat, sec.items()):
        h = o["histogram"]
        edges = np.asarray(h["edges"])
        mids = (edges[:-1] + edges[1:]) / 2
        for name, colour in (
            ("training_hosts_unseen", "tab:green"),
            ("validation_host", "tab:orange"),
            ("heldout_hosts", "tab:red"),
        ):
            counts = np.asarray(h[name], float)
            share = counts / max(1.0, counts.sum())
            ax.step(mids, share, where="mid", color=colour, label=name.replace("_", " "))
            ax.fill_between(mids, share, step="mid", color=colour, alpha=0.12)
        ax.axvline(0.5, color="k", ls=":", lw=1)
        a = o["auroc_heldout_vs_training_hosts"]
        ax.set_title(f"{threat}: AUROC {_fmt(a['point'])} [{_fmt(a['lo'])}, {_fmt(a['hi'])}]", fontsize=9)
        ax.set_xlabel("ood score (flag at 0.5)")
        ax.set_ylabel("share of windows")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_threat_gap(report: dict[str, Any], path: Path) -> Path | None:
    gap = report.get("threat_gap", {})
    if not gap:
        return None
    plt = _plt()
    names = list(gap)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [gap[n]["realistic"] for n in names], 0.4, label="realistic (host-side, 30 ch)")
    ax.bar(x + 0.2, [gap[n]["oracle"] for n in names], 0.4, label="oracle (all 46 ch)")
    for i, n in enumerate(names):
        ax.text(
            i,
            max(gap[n]["realistic"], gap[n]["oracle"]) + 0.02,
            f"{gap[n]['diff']:+.2f}" + ("*" if gap[n]["significant"] else ""),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("macro F1 on the same windows")
    ax.set_title("realistic vs oracle (* significant)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- files ------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=1, default=_json_default) + "\n")
    return path


def write_report(run: Path, report: dict[str, Any]) -> dict[str, Path]:
    """report.json, the PNG figures and report.html in ``run``."""
    run = Path(run)
    files: dict[str, Path] = {"json": write_json(report, run / "report.json")}
    figures = {
        f"confusion-{t}": plot_confusions(report, t, run / f"confusion-{t}.png") for t in THREAT_MODELS
    }
    figures["per-profile-f1"] = plot_per_profile(report, run / "per-profile-f1.png")
    figures["model-comparison"] = plot_comparison(report, run / "model-comparison.png")
    figures["threat-gap"] = plot_threat_gap(report, run / "threat-gap.png")
    for t in THREAT_MODELS:
        figures[f"reliability-{t}"] = plot_reliability(report, t, run / f"reliability-{t}.png")
    figures["ood"] = plot_ood(report, run / "ood.png")
    files.update({k: v for k, v in figures.items() if v})
    files["html"] = write_html(run / "report.html", report, [v for v in figures.values() if v])
    return files


def _ci_cell(g: dict[str, Any] | None) -> str:
    if not g or g.get("lo") is None:
        return ""
    return f"{g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]{' *' if g.get('significant') else ''}"


_CSS = (
    "body{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,td:nth-child(2){text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    ".warn{color:#b00}"
)


def write_html(path: Path, report: dict[str, Any], images: list[Path]) -> Path:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{esc(t)}</td><td>{_fmt(m['macro_f1'])}</td>"
        f"<td>[{_fmt(m['macro_f1_ci'][0])}, {_fmt(m['macro_f1_ci'][1])}]</td>"
        f"<td>{_fmt(m.get('accuracy'))}</td><td>{m.get('n_windows', '')}</td>"
        f"<td>{esc(str((m.get('fit') or {}).get('stopped', 'baseline')))}</td></tr>"
        for n, t, m in _rows(report)
    )
    comps = "".join(
        f"<tr><td>{esc(c['a'])}</td><td>{esc(c['b'])}</td><td>{c['diff']:+.3f}</td>"
        f"<td>[{c['lo']:+.3f}, {c['hi']:+.3f}]</td><td>{c['p_value']:.3f}</td>"
        f"<td>{'yes' if c['significant'] else 'no'}</td></tr>"
        for c in report.get("comparisons", [])
    )
    imgs = "".join(
        f'<figure><img src="{esc(p.name)}" alt="{esc(p.stem)}">'
        f"<figcaption>{esc(p.stem)}</figcaption></figure>"
        for p in images
    )
    calib = "".join(
        f"<tr><td>{esc(n)}</td><td>{esc(t)}</td><td>{c['temperature']:.3g}</td>"
        f"<td>{_fmt(c['ece_before'])}</td><td>{_fmt(c['ece_after'])}</td>"
        f"<td>{_ci_cell((c.get('bootstrap') or {}).get('gap'))}</td>"
        f"<td>{_fmt(c['nll_before'])}</td><td>{_fmt(c['nll_after'])}</td></tr>"
        for n, t, c in _calibrated(report)
    )
    calib_table = (
        "<h2>calibration: temperature scaling on validation, scored on held-out windows</h2>"
        "<table><tr><th>model</th><th>threat</th><th>T</th><th>ECE before</th><th>ECE after</th>"
        "<th>after - before [95% CI, paired episode bootstrap]</th><th>NLL before</th><th>NLL after</th></tr>"
        f"{calib}</table>"
        if calib
        else ""
    )
    untested = report.get("untested_profiles") or []
    split = report.get("split", {})
    warn = (
        f'<p class="warn">untested profiles (no held-out windows): {esc(", ".join(untested))}</p>'
        if untested
        else ""
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("model", "threat", "macro F1", "95% CI (episodes)", "accuracy", "windows", "stopped")
    )
    comp_head = "".join(f"<th>{h}</th>" for h in ("a", "b", "F1(a)-F1(b)", "95% CI", "p", "significant"))
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phasewatch training report</title>
<style>{_CSS}</style></head>
<body><h1>phasewatch training report</h1>
<p>split: <b>{esc(str(split.get("kind", "")))}</b> — {esc(str(split.get("description", "")))};
profile {esc(str(report.get("profile", "")))}, seed {esc(str(report.get("seed", "")))},
schema hash <code>{esc(str(report.get("schema_hash", ""))[:16])}…</code></p>
{warn}
<pre>{esc(summary_table(report))}</pre>
<h2>held-out macro F1</h2><table><tr>{head}</tr>{rows}</table>
{calib_table}
{imgs}
<h2>paired bootstrap: every model-vs-model gap</h2>
<table><tr>{comp_head}</tr>{comps}</table>
</body></html>
"""
    path.write_text(doc)
    return path
