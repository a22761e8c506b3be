// DOM renderers, one per live scene. Event data only ever reaches the page as text nodes.
import { PHASES, PROFILES, MODELS, STATUSES, OOD_FLAG_AT } from "./vocab.js";
import { phaseVar, modelVar, statusVar } from "./palette.js";
import { WINDOWS, BASELINE_MS, hostRows, totals, prunePhases, fleetRows } from "./state.js";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

export function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "style") for (const [p, pv] of Object.entries(v)) el.style.setProperty(p, pv);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function s(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== null) el.textContent = text;
  return el;
}

export const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
export function fmtBytes(b) {
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
  return `${b >= 100 || i === 0 ? b.toFixed(0) : b.toFixed(1)} ${units[i]}`;
}
export function fmtAgo(ns) {
  if (ns === null || ns === undefined) return "\u2014";
  const sec = (Date.now() - ns / 1e6) / 1000;
  if (sec < 5) return "just now";
  if (sec < 90) return `${Math.round(sec)} s ago`;
  if (sec < 5400) return `${Math.round(sec / 60)} min ago`;
  if (sec < 172800) return `${Math.round(sec / 3600)} h ago`;
  return `${Math.round(sec / 86400)} d ago`;
}
const fmtDur = (s) => (s === null ? "\u2014" : s >= 90 ? `${(s / 60).toFixed(1)} min` : `${s.toFixed(0)} s`);
const pct = (a, b) => (b > 0 ? (100 * a) / b : 0);

function stackbar(el, parts, labels = false) {
  const total = parts.reduce((n, p) => n + p.value, 0);
  el.replaceChildren(...parts.filter((p) => p.value > 0).map((p) => {
    const share = pct(p.value, total);
    return h("i", { style: { width: `${share}%`, "--c": p.color }, title: `${p.name}: ${share.toFixed(1)} %` },
      !labels || share < 6 ? "" : share >= 16 ? `${p.name} ${share.toFixed(0)} %` : `${share.toFixed(0)} %`);
  }));
}

const placeholder = (tag, text) => h(tag, { class: "empty", style: { display: "block" } }, text);

function legend(el, items) {
  el.replaceChildren(...items.map((it) => h("span", { class: "sw", style: { "--c": it.color } }, it.label)));
}

// 1 title
export function renderTitle(state) {
  const t = totals(state);
  $("title-episodes").textContent = fmtInt(t.episodes);
  $("title-hosts").textContent = fmtInt(hostRows(state).size);
  $("title-events").textContent = fmtInt(state.events);
}

export function renderStatic() {
  $("title-phases").replaceChildren(...PHASES.map((p) => h("span", { class: "chip", style: { color: phaseVar(p) } }, p)));
  legend($("chunking-legend"), [...PHASES.map((p) => ({ color: phaseVar(p), label: p })),
    { color: "var(--wrong)", label: "\u2717 ringed: wrong prediction" }]);
}

// 3 collect
export function renderCollect(state) {
  const t = totals(state);
  $("collect-tiles").replaceChildren(...STATUSES.map((st) =>
    h("div", { class: "tile", "data-status": st, style: { "--c": statusVar(st) } },
      h("b", {}, fmtInt(t[st])), h("span", {}, st), h("span", { class: "pct" }, `${pct(t[st], t.episodes).toFixed(1)} %`))));
  stackbar($("collect-bar"), STATUSES.map((st) => ({ name: st, value: t[st], color: statusVar(st) })), true);
  $("collect-total").textContent = fmtInt(t.episodes);
  $("collect-bytes").textContent = fmtBytes(t.bytes);
  $("collect-new").textContent = fmtInt(state.episodes.filter((e) => e.at >= (state.snapshotAt ?? 0)).length);
  const byProfile = new Map([...PROFILES, "clean"].map((p) => [p, 0]));
  for (const e of state.episodes) byProfile.set(e.profile ?? "clean", (byProfile.get(e.profile ?? "clean") ?? 0) + 1);
  const most = Math.max(1, ...byProfile.values());
  $("collect-profiles").tBodies[0].replaceChildren(...[...byProfile].map(([p, n]) => h("tr", { "data-profile": p },
    h("td", { class: "mono" }, p),
    h("td", { style: { width: "60%" } }, h("div", { class: "stackbar" }, h("i", { style: { width: `${pct(n, most)}%`, "--c": "var(--accent)" } }))),
    h("td", { class: "r" }, fmtInt(n)))));
  const feed = $("collect-feed");
  if (!state.episodes.length) { feed.replaceChildren(placeholder("li", "waiting for episodes\u2026")); return; }
  const fresh = Date.now();
  feed.replaceChildren(...state.episodes.slice(0, 14).map((e) => h("li", { class: fresh - e.at < 1500 ? "fresh" : null, "data-episode": e.episode_id },
    h("span", {}, e.host), h("span", { class: "id" }, e.episode_id), h("span", { class: "mono" }, e.profile ?? "clean"),
    h("span", {}, e.status ? h("span", { class: "badge", style: { "--c": statusVar(e.status) } }, e.status) : "\u2014"),
    h("span", { class: "num" }, fmtDur(e.duration_s)), h("span", { class: "num" }, e.bytes === null ? "\u2014" : fmtBytes(e.bytes)))));
}

// 4 hosts
export function renderHosts(state) {
  const rows = hostRows(state);
  const body = $("hosts-table").tBodies[0];
  if (!rows.size) { body.replaceChildren(h("tr", {}, h("td", { colspan: "9", class: "empty" }, "waiting for a snapshot\u2026"))); return; }
  const sorted = [...rows.entries()].sort((a, b) => a[0].localeCompare(b[0]));
  body.replaceChildren(...sorted.map(([host, r]) => {
    const mix = h("div", { class: "stackbar" });
    stackbar(mix, STATUSES.map((st) => ({ name: st, value: r[st], color: statusVar(st) })));
    const last = state.lastEpisodeByHost.get(host);
    return h("tr", { "data-host": host }, h("td", { class: "mono" }, host),
      ...STATUSES.map((st) => h("td", { class: "r" }, fmtInt(r[st]))), h("td", {}, mix),
      h("td", { class: "r" }, fmtBytes(r.bytes)), h("td", { class: "r" }, fmtAgo(r.last_seen_ns)),
      h("td", { class: "mono" }, last ? `${last.profile ?? "clean"} \u00b7 ${last.status ?? "?"}` : "\u2014"));
  }));
}

// 5 db
export function renderDb(state) {
  const t = totals(state);
  $("db-status").tBodies[0].replaceChildren(...STATUSES.map((st) => {
    const bar = h("div", { class: "stackbar" });
    stackbar(bar, [{ name: st, value: t[st], color: statusVar(st) }, { name: "rest", value: t.episodes - t[st], color: "transparent" }]);
    return h("tr", { "data-status": st }, h("td", {}, h("span", { class: "badge", style: { "--c": statusVar(st) } }, st)),
      h("td", { class: "r" }, fmtInt(t[st])), h("td", { class: "r" }, `${pct(t[st], t.episodes).toFixed(1)} %`), h("td", { style: { width: "40%" } }, bar));
  }));
  const usable = t.accepted + t.degraded;
  const snapT = state.snapshot?.t_ns;
  const facts = [["episodes", fmtInt(t.episodes)], ["usable (accepted + degraded)", `${pct(usable, t.episodes).toFixed(1)} %`],
    ["bytes", fmtBytes(t.bytes)], ["mean per episode", t.episodes ? fmtBytes(t.bytes / t.episodes) : "\u2014"],
    ["snapshot", typeof snapT === "number" ? fmtAgo(snapT) : state.snapshot ? "received" : "none yet"]];
  $("db-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("span", {}, k), h("b", {}, v)]));
  const rows = [...hostRows(state).entries()].sort((a, b) => b[1].bytes - a[1].bytes);
  if (!rows.length) { $("db-bytes").tBodies[0].replaceChildren(h("tr", {}, h("td", { class: "empty" }, "waiting for a snapshot\u2026"))); return; }
  const max = Math.max(1, ...rows.map(([, r]) => r.bytes));
  $("db-bytes").tBodies[0].replaceChildren(...rows.map(([host, r]) => h("tr", {},
    h("td", { class: "mono" }, host),
    h("td", { style: { width: "55%" } }, h("div", { class: "stackbar" }, h("i", { style: { width: `${pct(r.bytes, max)}%`, "--c": "var(--accent)" } }))),
    h("td", { class: "r" }, fmtBytes(r.bytes)))));
}

// 6 baseline
const BINS = 30;
export function renderBaseline(state, now) {
  prunePhases(state, now);
  const counts = new Map(PHASES.map((p) => [p, 0]));
  for (const e of state.phases) counts.set(e.phase, (counts.get(e.phase) ?? 0) + 1);
  const n = state.phases.length;
  $("baseline-n").textContent = n ? `${fmtInt(n)} phase events in the last 5 minutes` : "no phase events yet";
  const names = [...counts.keys()];
  stackbar($("baseline-bar"), names.map((p) => ({ name: p, value: counts.get(p), color: phaseVar(p) })), true);
  legend($("baseline-legend"), names.map((p) => ({ color: phaseVar(p), label: `${p} ${pct(counts.get(p), n).toFixed(1)} %` })));
  const bins = Array.from({ length: BINS }, () => new Map());
  for (const e of state.phases) {
    const b = Math.min(BINS - 1, Math.max(0, Math.floor(((e.t - (now - BASELINE_MS)) / BASELINE_MS) * BINS)));
    bins[b].set(e.phase, (bins[b].get(e.phase) ?? 0) + 1);
  }
  const peak = Math.max(1, ...bins.map((b) => [...b.values()].reduce((x, y) => x + y, 0)));
  $("baseline-trend").replaceChildren(...bins.map((b) => h("div", {},
    ...names.filter((p) => b.get(p)).map((p) => h("i", { style: { height: `${pct(b.get(p), peak)}%`, "--c": phaseVar(p) } })))));
}

// 7 attacks
function sparkline(curve) {
  const svg = s("svg", { viewBox: "0 0 100 40", preserveAspectRatio: "none" });
  const peak = Math.max(...curve.map(Math.abs), 0);
  if (curve.length < 2 || peak <= 0) return svg;
  const pts = curve.map((v, i) => `${((i / (curve.length - 1)) * 100).toFixed(2)},${(38 - (v / peak) * 36).toFixed(2)}`);
  svg.append(s("path", { class: "spark-area", d: `M0,40 L${pts.join(" L")} L100,40 Z` }), s("path", { class: "spark-line", d: `M${pts.join(" L")}` }));
  return svg;
}

export function renderAttacks(state) {
  const names = [...PROFILES, ...[...state.attacks.keys()].filter((n) => !PROFILES.includes(n))];
  $("attacks-cards").replaceChildren(...names.map((name) => {
    const a = state.attacks.get(name);
    const peak = a ? Math.max(...a.curve.map(Math.abs), 0) : 0;
    return h("div", { class: "card", "data-profile": name },
      h("h3", {}, name, h("small", {}, a ? `peak ${peak.toPrecision(3)}` : "")),
      h("p", { class: a ? null : "empty" }, a ? a.shape ?? "" : "no curve yet"),
      a ? sparkline(a.curve) : h("div", { style: { flex: "1" } }));
  }));
}

// 8 chunking
export function renderChunking(state) {
  const grid = $("chunking-grid");
  const kids = [h("div", { class: "hdr" }, "episode")];
  for (let i = 0; i < WINDOWS; i++) kids.push(h("div", { class: "hdr" }, `window ${i}`));
  const eps = [...state.timelines.entries()].reverse();
  if (!eps.length) kids.push(h("div", { class: "empty", style: { "grid-column": "1 / -1" } }, "waiting for predictions\u2026"));
  for (const [key, tl] of eps) {
    const id = tl.episode_id ?? key;
    kids.push(h("div", { class: "ep", "data-episode": id, "data-node": tl.node }, id,
      h("small", {}, [tl.node, tl.model].filter(Boolean).join(" \u00b7 "))));
    tl.cells.forEach((c, i) => {
      if (!c) { kids.push(h("div", { class: "cell none", "data-idx": i }, "\u2014")); return; }
      if (c.unscored) { // the window came, but the model could not score it: say why
        kids.push(h("div", { class: "cell none unscored", "data-idx": i, title: `not scored: ${c.unscored}` },
          "\u2014", h("small", {}, c.unscored)));
        return;
      }
      const shown = c.predicted ?? c.actual;
      const wrong = c.predicted !== null && c.actual !== null && c.predicted !== c.actual;
      // flagged out of distribution: the window looks unlike every training host
      const ood = c.ood !== null && c.ood >= OOD_FLAG_AT;
      const cls = ["cell", c.predicted === null ? "actual-only" : null, wrong ? "wrong" : null, ood ? "ood" : null].filter(Boolean).join(" ");
      const sub = wrong ? `actual ${c.actual}` : c.confidence !== null ? `${(c.confidence * 100).toFixed(0)} %` : c.predicted === null ? "label" : "";
      const title = c.ood !== null ? `out-of-distribution score ${c.ood.toFixed(2)}${ood ? " (flagged)" : ""}` : null;
      kids.push(h("div", { class: cls, "data-idx": i, "data-phase": shown, "data-ood": c.ood, title, style: { "--c": phaseVar(shown) } },
        shown.replace("_", " "), sub ? h("small", {}, sub) : null));
    });
  }
  grid.replaceChildren(...kids);
}

// charts share this: an SVG sized 1:1 to its box, so text is never stretched.
function sizedSvg(id) {
  const svg = $(id);
  const w = Math.max(300, svg.clientWidth), ht = Math.max(200, svg.clientHeight);
  svg.setAttribute("viewBox", `0 0 ${w} ${ht}`);
  svg.replaceChildren();
  return [svg, w, ht];
}

const WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];
export const countWord = (n) => (n < WORDS.length ? WORDS[n] : String(n));

// Headlines count the models (the vocabulary plus any unknown one that reported metrics).
export function renderModelCount(names) {
  const word = countWord(names.length);
  for (const el of document.querySelectorAll("[data-model-count]")) {
    el.textContent = el.hasAttribute("data-capital") ? word[0].toUpperCase() + word.slice(1) : word;
  }
}

// 9 models
export function renderModels(state) {
  const names = [...MODELS, ...[...state.metrics.keys()].filter((m) => !MODELS.includes(m))];
  renderModelCount(names);
  const [svg, W, H] = sizedSvg("models-chart");
  if (!svg.clientWidth) return;
  const L = 70, R = 20, T = 40, B = 60, lo = 0.5, hi = 1.0;
  const y = (v) => T + (1 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)) * (H - T - B);
  for (let v = lo; v <= hi + 1e-9; v += 0.1) {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }), s("text", { x: L - 12, y: y(v) + 5, "text-anchor": "end" }, v.toFixed(1)));
  }
  const slot = (W - L - R) / names.length;
  names.forEach((m, i) => {
    const cx = L + slot * (i + 0.5), bw = Math.min(110, slot * 0.6);
    const met = state.metrics.get(m);
    svg.append(s("text", { class: "lbl", x: cx, y: H - B + 30, "text-anchor": "middle" }, m));
    if (!met) { svg.append(s("text", { x: cx, y: y(lo) - 10, "text-anchor": "middle" }, "\u2014")); return; }
    const g = s("g", { "data-model": m });
    g.append(s("rect", { x: cx - bw / 2, y: y(met.accuracy), width: bw, height: y(lo) - y(met.accuracy), rx: 6, fill: modelVar(m) }));
    if (met.ci_low !== null && met.ci_high !== null) {
      g.append(s("line", { class: "whisker", x1: cx, x2: cx, y1: y(met.ci_low), y2: y(met.ci_high) }),
        s("line", { class: "whisker", x1: cx - 10, x2: cx + 10, y1: y(met.ci_high), y2: y(met.ci_high) }),
        s("line", { class: "whisker", x1: cx - 10, x2: cx + 10, y1: y(met.ci_low), y2: y(met.ci_low) }));
    }
    const top = Math.min(y(met.accuracy), met.ci_high !== null ? y(met.ci_high) : Infinity);
    g.append(s("text", { class: "val", x: cx, y: top - 10 }, met.accuracy.toFixed(3)));
    if (met.threat_model) g.append(s("text", { x: cx, y: H - B + 50, "text-anchor": "middle" }, met.threat_model));
    svg.append(g);
  });
  svg.append(s("text", { x: 8, y: 22 }, "accuracy"));
}

// 12 perf: x = µs per window (log), y = accuracy with 1.0 at the bottom, so lower-left is better.
export function renderPerf(state) {
  const [svg, W, H] = sizedSvg("perf-chart");
  if (!svg.clientWidth) return;
  const pts = [...state.perf.entries()];
  const L = 80, R = 40, T = 30, B = 70;
  const lats = pts.map(([, p]) => Math.max(p.latency_us, 1e-3));
  let x0 = lats.length ? Math.min(...lats) / 2 : 10, x1 = lats.length ? Math.max(...lats) * 2 : 10000;
  if (x1 / x0 < 10) { const m = Math.sqrt(x0 * x1); x0 = m / 4; x1 = m * 4; }
  const accs = pts.map(([, p]) => p.accuracy);
  // Zoom the accuracy axis to the data (never outside 0.5-1.0), in steps of 0.05.
  const lo = accs.length ? Math.max(0.5, Math.floor((Math.min(...accs) - 0.03) * 20) / 20) : 0.5;
  const hi = accs.length ? Math.min(1.0, Math.ceil((Math.max(...accs) + 0.02) * 20) / 20) : 1.0;
  const stepA = hi - lo > 0.3 ? 0.1 : 0.05;
  const x = (v) => L + ((Math.log10(Math.max(v, 1e-3)) - Math.log10(x0)) / (Math.log10(x1) - Math.log10(x0))) * (W - L - R);
  const y = (a) => T + ((a - lo) / (hi - lo)) * (H - T - B);
  for (let a = lo; a <= hi + 1e-9; a += stepA) {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: y(a), y2: y(a) }), s("text", { x: L - 12, y: y(a) + 5, "text-anchor": "end" }, a.toFixed(2)));
  }
  for (let e = Math.floor(Math.log10(x0)); e <= Math.ceil(Math.log10(x1)); e++) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** e;
      if (v < x0 || v > x1) continue;
      svg.append(s("line", { class: "grid", x1: x(v), x2: x(v), y1: T, y2: H - B, opacity: m === 1 ? 1 : 0.45 }));
      svg.append(s("text", { x: x(v), y: H - B + 24, "text-anchor": "middle" }, v >= 1000 ? `${v / 1000} ms` : `${v} \u00b5s`));
    }
  }
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 14, "text-anchor": "middle" }, "\u00b5s per window (log scale) \u2190 faster"),
    s("text", { x: 16, y: T + (H - T - B) / 2, transform: `rotate(-90 16 ${T + (H - T - B) / 2})`, "text-anchor": "middle" }, "accuracy \u2193 higher"),
    s("text", { class: "better", x: L + 14, y: H - B - 14 }, "\u2199 better"));
  if (!pts.length) { svg.append(s("text", { x: (L + W - R) / 2, y: H / 2, "text-anchor": "middle" }, "waiting for model_perf events\u2026")); return; }
  // Pareto front: each point that is more accurate than every faster one.
  const front = [...pts].sort((a, b) => a[1].latency_us - b[1].latency_us).filter(((best) => ([, p]) => (p.accuracy > best ? ((best = p.accuracy), true) : false))(-1));
  if (front.length > 1) svg.append(s("polyline", { class: "pareto", points: front.map(([, p]) => `${x(p.latency_us)},${y(p.accuracy)}`).join(" ") }));
  const placed = pts.map(([, p]) => ({ x0: x(p.latency_us) - 11, y0: y(p.accuracy) - 11, x1: x(p.latency_us) + 11, y1: y(p.accuracy) + 11 }));
  const free = (b) => b.x0 >= L && b.x1 <= W && b.y0 >= 0 && b.y1 <= H - B &&
    placed.every((o) => b.x1 < o.x0 || b.x0 > o.x1 || b.y1 < o.y0 || b.y0 > o.y1);
  for (const [m, p] of pts) {
    const px = x(p.latency_us), py = y(p.accuracy);
    const sub = `${(p.accuracy * 100).toFixed(1)} % \u00b7 ${p.latency_us >= 1000 ? (p.latency_us / 1000).toFixed(2) + " ms" : p.latency_us.toFixed(0) + " \u00b5s"}`;
    const wl = Math.max(m.length * 10.5, sub.length * 8) + 4, hl = 40;
    const spots = [[16, -22], [-16 - wl, -22], [-wl / 2, -24 - hl], [-wl / 2, 16], [16, -60], [-16 - wl, -60], [16, 20], [-16 - wl, 20]];
    let box = null;
    for (const [dx, dy] of spots) {
      const b = { x0: px + dx, y0: py + dy, x1: px + dx + wl, y1: py + dy + hl };
      if (free(b)) { box = b; break; }
    }
    box ??= { x0: px + 16, y0: py - 22, x1: px + 16 + wl, y1: py + 18 };
    placed.push(box);
    const g = s("g", { "data-model": m });
    g.append(s("circle", { cx: px, cy: py, r: 10, fill: modelVar(m), stroke: "var(--bg)", "stroke-width": 2 }));
    g.append(s("text", { class: "lbl", x: box.x0, y: box.y0 + 16, "text-anchor": "start" }, m));
    g.append(s("text", { x: box.x0, y: box.y0 + 36, "text-anchor": "start" }, sub));
    svg.append(g);
  }
}

// 13 fleet (only on a fleet deck): every node, its state and what it runs
export function renderFleet(fleet, picked, onPick) {
  const rows = fleetRows(fleet);
  const online = rows.filter((r) => r.state === "online").length;
  const hashes = new Set(rows.map((r) => r.schemaHash).filter(Boolean));
  $("fleet-summary").textContent = rows.length
    ? `${rows.length} node${rows.length === 1 ? "" : "s"} \u00b7 ${online} online \u00b7 ${hashes.size} schema hash${hashes.size === 1 ? "" : "es"}`
    : "no node has spoken yet";
  const body = $("fleet-table").tBodies[0];
  if (!rows.length) { body.replaceChildren(h("tr", {}, h("td", { colspan: "7", class: "empty" }, "waiting for nodes\u2026"))); return; }
  body.replaceChildren(...rows.map((r) => {
    const tr = h("tr", { "data-node": r.node, "data-state": r.state, class: [r.hashDiffers ? "mismatch" : null, r.node === picked ? "picked" : null].filter(Boolean).join(" ") || null },
      h("td", { class: "mono" }, r.node),
      h("td", {}, h("span", { class: "badge", style: { "--c": r.state === "online" ? "var(--good)" : r.state === "offline" ? "var(--bad)" : "var(--muted)" } }, r.state)),
      h("td", { class: "r" }, fmtAgo(r.lastSeenNs)),
      h("td", { class: "r" }, fmtInt(r.live)),
      h("td", { class: "r" }, r.windowsPerS === null ? "\u2014" : r.windowsPerS.toFixed(1)),
      h("td", { class: "mono" }, r.primary ?? "\u2014"),
      h("td", { class: "mono hash", title: r.schemaHash ?? "" }, r.schemaHash ? r.schemaHash.slice(0, 12) : "\u2014",
        r.hashDiffers ? h("span", { class: "differs" }, "\u2260 differs") : null));
    tr.addEventListener("click", () => onPick(r.node === picked ? "" : r.node));
    return tr;
  }));
}
