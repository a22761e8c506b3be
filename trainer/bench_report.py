"""What `phasewatch bench` shows people: the markdown table and the accuracy-vs-latency plot."""

from __future__ import annotations

from pathlib import Path

from schema.artifacts import BenchDoc


def _us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _work(v: float | None, unit: str | None) -> str:
    if v is None:
        return "—"
    if unit == "comparison":
        return f"{v:,.0f} cmp"
    for scale, suffix in ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if v >= scale:
            return f"{v / scale:.2f} {suffix}"
    return f"{v:.0f} FLOP"


def _rate(g: float | None, unit: str | None) -> str:
    if g is None:
        return "—"
    name = "cmp/s" if unit == "comparison" else "FLOP/s"
    return f"{g:.2f} G{name}" if g >= 1 else f"{g * 1e3:.1f} M{name}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f} %"


def format_table(doc: BenchDoc) -> str:
    """The report: one markdown row per model, then the per-window path and the machine."""
    head = (
        "| model | threat | ORT p50 µs | ORT p99 µs | spread µs | native p50 µs | ORT/native "
        "| work/window | achieved | % of peak | where time goes | accuracy | macro F1 |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in doc.models:
        native = f"{_us(r.native_p50_us)} ({r.native})" if r.native else "— (no checkpoint)"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "—"
        achieved = _rate(r.achieved_gflops, r.work_unit)
        lines.append(
            f"| {r.model} | {r.threat_model} | {_us(r.ort_p50_us)} | {_us(r.ort_p99_us)} "
            f"| {_us(r.ort_spread_us)} | {native} | {ratio} | {_work(r.flops, r.work_unit)} "
            f"| {achieved} | {_pct(r.share_of_peak, 2)} | {r.bound} | {_pct(r.accuracy)} "
            f"| {_pct(r.macro_f1)} |"
        )
    mach, meth = doc.machine, doc.method
    pinned = f", pinned to core {mach.pinned}" if mach.pinned is not None else ""
    lines += [
        "",
        f"- machine: {mach.cpu} ({mach.arch}, {mach.cores} cores{pinned}), "
        f"load average {mach.loadavg[0]:.1f}; peak {mach.peak_gflops:.1f} GFLOP/s "
        f"(one thread, float32 GEMM, {mach.blas}); ORT call floor {mach.ort_floor_us:.1f} µs",
    ]
    ex, path, rd = doc.extractor, doc.path, doc.reader
    if ex:
        lines.append(
            f"- extractor (extract_window + summarize): {_us(ex.p50_us)} µs/window p50, "
            f"{_us(ex.p99_us)} p99, spread {_us(ex.spread_us)} "
            f"({ex.windows} windows of {ex.episodes} archives, each given its own rows as the tailer does)"
        )
    if path:
        lines.append(
            f"- whole per-window path ({path.what}): {_us(path.p50_us)} µs/window p50, "
            f"{_us(path.p99_us)} p99, spread {_us(path.spread_us)}"
        )
    if rd:
        lines.append(
            f"- reader: {rd.rows_per_s:,.0f} telemetry rows/s "
            f"(spread {rd.spread_rows_per_s:,.0f}; {rd.rows:,} rows in {len(rd.archives)} archives)"
        )
    lines.append(
        f"- method: batch {meth.batch}, one thread everywhere; {meth.warmup} warm-up calls, then "
        f"{meth.repeats} repeats x {meth.calls} calls, interleaved ORT/native; p50/p99 are "
        f"medians over repeats; spread = {meth.spread}; ratio = ORT p50 / native p50"
    )
    lines += [f"- note: {n}" for n in doc.notes]
    return "\n".join(lines)


def plot_bench(doc: BenchDoc, path: Path) -> Path:
    """Accuracy vs ORT µs per window (log x), one colour per model, a marker per threat model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schema.vocab import MODELS

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for r in doc.models:
        if r.accuracy is None:
            continue
        i = MODELS.index(r.model) if r.model in MODELS else len(MODELS)
        c = colours(i % 10)
        realistic = r.threat_model == "realistic"
        x, y = r.ort_p50_us, r.accuracy
        # the p50 -> p99 tail as a whisker: how bad the slow calls are
        ax.plot([x, r.ort_p99_us], [y, y], color=c, alpha=0.5, lw=1.5)
        ax.scatter(
            [x],
            [y],
            s=70,
            marker="o" if realistic else "^",
            color=c if realistic else "none",
            edgecolors=c,
            linewidths=1.8,
            zorder=3,
        )
        # realistic labels above, oracle below: twins of one model sit close together
        ax.annotate(
            r.model if realistic else f"{r.model}·{r.threat_model}",
            (x, y),
            textcoords="offset points",
            xytext=(7, 5) if realistic else (7, -13),
            fontsize=9,
            color=c,
        )
    ax.set_xscale("log")
    ax.set_xlabel("ONNX Runtime µs per window (p50, whisker to p99; batch 1, one thread; log scale)")
    ax.set_ylabel("held-out accuracy")
    mach = doc.machine
    pinned = f", core {mach.pinned}" if mach.pinned is not None else ""
    ax.set_title(
        f"accuracy vs latency — {mach.cpu}{pinned}\n"
        f"filled: realistic, hollow: oracle; peak {mach.peak_gflops:.0f} GFLOP/s",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
