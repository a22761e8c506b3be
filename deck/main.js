// Deck entry: scene navigation, the live connection, and routing events to scenes.
import { emptyState, applyEvent } from "./state.js";
import { Connection } from "./ws.js";
import { Scatter } from "./knn.js";
import * as S from "./scenes.js";

const SCENES = ["title", "stack", "collect", "hosts", "db", "baseline", "attacks", "chunking", "models", "training-code", "knn", "perf"];
const RENDER = {
  title: S.renderTitle, collect: S.renderCollect, hosts: S.renderHosts, db: S.renderDb,
  baseline: (st) => S.renderBaseline(st, performance.now()), attacks: S.renderAttacks, chunking: S.renderChunking,
  models: S.renderModels, perf: S.renderPerf, knn: () => scatter.requestDraw(),
};

let state = emptyState();
let current = 0;
const dirty = new Set(Object.keys(RENDER));
let frame = 0;
const scatter = new Scatter(document.getElementById("knn-canvas"), document.getElementById("knn-legend"), document.getElementById("knn-stats"));

// Repaints are batched per animation frame: a burst of 10,000 events costs one paint.
function schedule() {
  if (!frame) frame = requestAnimationFrame(paint);
}
function paint() {
  frame = 0;
  for (const id of dirty) RENDER[id](state);
  dirty.clear();
  document.getElementById("events-count").textContent = `${state.events.toLocaleString("en-US")} events`;
}

function onEvent(ev) {
  const scenes = applyEvent(state, ev, performance.now());
  if (!scenes) return;
  if (ev.type === "embedding") scatter.add(ev);
  for (const id of scenes) dirty.add(id);
  dirty.add("title");
  schedule();
}

function onOpen() {
  // Whatever we drew came from a connection that is gone; the replay that follows is the truth.
  state = emptyState();
  scatter.clear();
  for (const id of Object.keys(RENDER)) dirty.add(id);
  schedule();
}

function onStatus(st, inS) {
  const el = document.getElementById("conn");
  el.dataset.state = st;
  el.textContent = st === "reconnecting" ? `reconnecting in ${inS} s` : st === "connected" ? "connected" : "connecting\u2026";
}

// --- navigation: arrow keys and the URL hash (#knn or #11) ---
function indexFromHash() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (/^\d+$/.test(h)) return Math.min(SCENES.length, Math.max(1, +h)) - 1;
  const i = SCENES.indexOf(h);
  return i < 0 ? 0 : i;
}

function show(i) {
  current = i;
  SCENES.forEach((id, k) => document.getElementById(id).classList.toggle("active", k === i));
  document.getElementById("scene-no").textContent = `${i + 1} / ${SCENES.length} \u00b7 ${SCENES[i]}`;
  document.querySelectorAll("#dots a").forEach((a, k) => a.classList.toggle("on", k === i));
  // Charts measure their box, which only exists once the scene is shown.
  const id = SCENES[i];
  if (RENDER[id]) { dirty.add(id); schedule(); }
}

function go(i) {
  i = Math.max(0, Math.min(SCENES.length - 1, i));
  if (SCENES[i] !== location.hash.slice(1)) location.hash = SCENES[i];
  else show(i);
}

window.addEventListener("hashchange", () => show(indexFromHash()));
window.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  if (e.key === " " && e.target instanceof HTMLButtonElement) return; // Space presses the button
  const next = ["ArrowRight", "ArrowDown", "PageDown", " "].includes(e.key);
  const prev = ["ArrowLeft", "ArrowUp", "PageUp"].includes(e.key);
  if (next) go(current + 1);
  else if (prev) go(current - 1);
  else if (e.key === "Home") go(0);
  else if (e.key === "End") go(SCENES.length - 1);
  else return;
  e.preventDefault();
});
window.addEventListener("resize", () => { for (const id of ["models", "perf", "knn"]) dirty.add(id); schedule(); });
// The baseline's five minutes roll on even when no event arrives.
setInterval(() => { dirty.add("baseline"); dirty.add("hosts"); schedule(); }, 5000);

// --- knn controls ---
document.querySelectorAll("#knn-mode button").forEach((b) => b.addEventListener("click", () => {
  scatter.setMode(b.dataset.mode);
  document.querySelectorAll("#knn-mode button").forEach((o) => o.setAttribute("aria-pressed", String(o === b)));
}));
document.getElementById("knn-reset").addEventListener("click", () => scatter.reset());

// --- static bits ---
function highlight(pre) {
  const code = pre.querySelector("code");
  const KW = /\b(def|return|for|in|if|with|break|and|or|not|None|True|False)\b/g;
  const lines = code.textContent.split("\n").map((line) => {
    const esc = (t) => t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
    const hash = line.indexOf("#");
    const body = hash >= 0 ? line.slice(0, hash) : line, comment = hash >= 0 ? line.slice(hash) : "";
    const html = esc(body).replace(/("[^"]*")/g, '<span class="s">$1</span>')
      .replace(KW, '<span class="k">$1</span>').replace(/\b(\d+(?:\.\d+)?(?:e-?\d+)?)\b/g, '<span class="n">$1</span>');
    return html + (comment ? `<span class="c">${esc(comment)}</span>` : "");
  });
  code.innerHTML = lines.join("\n"); // static text from this page, never event data
}
document.querySelectorAll("pre.code").forEach(highlight);
document.getElementById("dots").replaceChildren(...SCENES.map((id) => {
  const a = document.createElement("a");
  a.href = `#${id}`;
  a.title = id;
  return a;
}));
S.renderStatic();

const params = new URLSearchParams(location.search);
const wsUrl = params.get("ws") ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const conn = new Connection(wsUrl, { onOpen, onEvent, onStatus });
show(indexFromHash());
schedule();

// Hooks for the browser tests (and for poking at a live deck from the console).
window.__deck = {
  scenes: SCENES,
  get current() { return SCENES[current]; },
  get state() { return state; },
  get connection() { return conn.state; },
  go: (name) => go(typeof name === "number" ? name : SCENES.indexOf(name)),
  drop: () => conn.drop(),
  inject: (ev) => onEvent(ev), // what a frame from the socket would do, minus the socket
  knn: {
    count: () => scatter.n,
    mode: () => scatter.mode,
    view: () => ({ ...scatter.view }),
    frames: () => scatter.frames,
    point: (i) => ({ x: scatter.x[i], y: scatter.y[i], z: scatter.z[i], cluster: scatter.cluster[i] }),
    rotate: (dy, dp) => scatter.rotate(dy, dp),
    measureFps: (ms) => scatter.measureFps(ms),
  },
};
