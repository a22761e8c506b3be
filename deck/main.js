// Deck entry: scene navigation, the live connection, and routing events to scenes.
import { emptyState, applyEvent, emptyFleet, applyFleet } from "./state.js";
import { Connection } from "./ws.js";
import { Scatter, MAX_POINTS } from "./knn.js";
import * as S from "./scenes.js";

// A fleet deck (edge-daemon --fleet) appends the fleet scene once a node has spoken.
const SCENES = ["title", "stack", "collect", "hosts", "db", "baseline", "attacks", "chunking", "models", "training-code", "knn", "perf"];
const RENDER = {
  title: S.renderTitle, collect: S.renderCollect, hosts: S.renderHosts, db: S.renderDb,
  baseline: (st) => S.renderBaseline(st, performance.now()), attacks: S.renderAttacks, chunking: S.renderChunking,
  models: S.renderModels, perf: S.renderPerf, knn: () => scatter.requestDraw(),
  fleet: () => S.renderFleet(fleet, picked, pick),
};

let state = emptyState();      // every event (all nodes)
let byNode = new Map();        // node -> its own state, for the picker
let fleet = emptyFleet();
let fleetMode = false;
let picked = new URLSearchParams(location.search).get("node") ?? ""; // "" = all nodes
let embeddings = [];           // what the scatter holds, to redraw it for another node
let current = 0;
const dirty = new Set(Object.keys(RENDER));
let frame = 0;
const scatter = new Scatter(document.getElementById("knn-canvas"), document.getElementById("knn-legend"), document.getElementById("knn-stats"));

// Repaints are batched per animation frame: a burst of 10,000 events costs one paint.
function schedule() {
  if (!frame) frame = requestAnimationFrame(paint);
}
const shown = () => (picked ? byNode.get(picked) ?? emptyState() : state);

function paint() {
  frame = 0;
  const st = shown();
  for (const id of dirty) RENDER[id](st);
  dirty.clear();
  document.getElementById("events-count").textContent = `${st.events.toLocaleString("en-US")} events`;
  if (fleetMode) renderPicker();
}

function onEvent(ev) {
  const node = ev !== null && typeof ev === "object" && typeof ev.node === "string" && ev.node ? ev.node : null;
  if (node) {
    if (!fleetMode) enterFleet();
    if (applyFleet(fleet, ev)) dirty.add("fleet");
    if (ev.type === "status") { schedule(); return; } // the fleet scene's alone
  }
  const now = performance.now();
  const scenes = applyEvent(state, ev, now);
  if (node) {
    let mine = byNode.get(node);
    if (!mine) byNode.set(node, (mine = emptyState()));
    applyEvent(mine, ev, now);
  }
  if (!scenes) return;
  if (ev.type === "embedding") {
    if (fleetMode) { embeddings.push(ev); if (embeddings.length > MAX_POINTS) embeddings.splice(0, embeddings.length - MAX_POINTS); }
    if (!picked || node === picked) scatter.add(ev);
  }
  if (picked && node !== picked) return;
  for (const id of scenes) dirty.add(id);
  dirty.add("title");
  schedule();
}

function onOpen() {
  // Whatever we drew came from a connection that is gone; the replay that follows is the truth.
  state = emptyState();
  byNode = new Map();
  fleet = emptyFleet();
  embeddings = [];
  scatter.clear();
  for (const id of Object.keys(RENDER)) dirty.add(id);
  schedule();
}

// --- the fleet: its scene, and the node picker in the status bar ---
function enterFleet() {
  fleetMode = true;
  SCENES.push("fleet");
  document.getElementById("fleet").hidden = false;
  document.getElementById("node-pick").hidden = false;
  renderDots();
  show(indexFromHash());
}

function pick(node) {
  picked = node;
  scatter.clear();
  for (const ev of embeddings) if (!picked || ev.node === picked) scatter.add(ev);
  for (const id of Object.keys(RENDER)) dirty.add(id);
  renderPicker(); // the picker answers the click at once; the scenes follow on the next frame
  schedule();
}

function renderPicker() {
  const sel = document.getElementById("node-picker");
  const names = [...fleet.nodes.keys()].sort();
  if (picked && !names.includes(picked)) names.unshift(picked);
  const want = ["", ...names].join("\u0000");
  if (sel.dataset.options !== want) {
    sel.replaceChildren(S.h("option", { value: "" }, `all nodes (${fleet.nodes.size})`),
      ...names.map((n) => S.h("option", { value: n }, n)));
    sel.dataset.options = want;
  }
  sel.value = picked;
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
setInterval(() => { dirty.add("baseline"); dirty.add("hosts"); if (fleetMode) dirty.add("fleet"); schedule(); }, 5000);

// --- knn controls ---
document.querySelectorAll("#knn-mode button").forEach((b) => b.addEventListener("click", () => {
  scatter.setMode(b.dataset.mode);
  document.querySelectorAll("#knn-mode button").forEach((o) => o.setAttribute("aria-pressed", String(o === b)));
}));
document.getElementById("knn-reset").addEventListener("click", () => scatter.reset());
document.getElementById("node-picker").addEventListener("change", (e) => pick(e.target.value));

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
function renderDots() {
  document.getElementById("dots").replaceChildren(...SCENES.map((id) => {
    const a = document.createElement("a");
    a.href = `#${id}`;
    a.title = id;
    return a;
  }));
}
renderDots();
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
  get state() { return shown(); }, // what the scenes draw: every node, or the picked one
  get connection() { return conn.state; },
  go: (name) => go(typeof name === "number" ? name : SCENES.indexOf(name)),
  drop: () => conn.drop(),
  inject: (ev) => onEvent(ev), // what a frame from the socket would do, minus the socket
  fleet: {
    get on() { return fleetMode; },
    get picked() { return picked; },
    pick: (node) => pick(node),
    nodes: () => [...fleet.nodes.keys()].sort(),
  },
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
