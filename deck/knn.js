// The knn scene: a 3-D scatter on a 2-D canvas. Points live in typed arrays (a ring of
// MAX_POINTS); each frame projects them with one precomputed rotation matrix and fills
// one path per colour, so 10,000 points cost a handful of fill calls. Frames are drawn
// only when something changed (drag, new points, mode, resize).
import { PHASES } from "./vocab.js";
import { phaseColor, clusterColor, cssVar } from "./palette.js";

export const MAX_POINTS = 20000;
export const DEFAULT_VIEW = Object.freeze({ yaw: -0.62, pitch: 0.36 });
const MODES = ["phase", "predicted", "cluster"];
const PERSPECTIVE = 3.2; // camera distance in cube units: enough depth cue, little distortion

// Unit-cube corners and the 12 edges between them.
const CORNERS = [];
for (let i = 0; i < 8; i++) CORNERS.push([i & 1, (i >> 1) & 1, (i >> 2) & 1]);
const EDGES = [];
for (let a = 0; a < 8; a++) for (const bit of [1, 2, 4]) if (!(a & bit)) EDGES.push([a, a | bit]);

const unit = (v) => (typeof v === "number" && Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : null);
const phaseIdx = (p) => PHASES.indexOf(p); // -1: missing or not in the vocabulary

export class Scatter {
  constructor(canvas, legendEl, statsEl) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.legendEl = legendEl;
    this.statsEl = statsEl;
    this.x = new Float32Array(MAX_POINTS);
    this.y = new Float32Array(MAX_POINTS);
    this.z = new Float32Array(MAX_POINTS);
    this.phase = new Int8Array(MAX_POINTS);
    this.pred = new Int8Array(MAX_POINTS);
    this.cluster = new Int32Array(MAX_POINTS);
    this.sx = new Float32Array(MAX_POINTS);   // projected, reused every frame
    this.sy = new Float32Array(MAX_POINTS);
    this.sz = new Float32Array(MAX_POINTS);
    this.order = new Uint32Array(MAX_POINTS); // point indices grouped by colour key
    this.n = 0;
    this.head = 0;
    this.mode = "phase";
    this.view = { ...DEFAULT_VIEW };
    this.raf = 0;
    this.bucketsDirty = true;
    this.legendDirty = true;
    this.lastDrawMs = 0;
    this.frames = 0;
    this.bindDrag();
  }

  clear() {
    this.n = 0;
    this.head = 0;
    this.bucketsDirty = this.legendDirty = true;
    this.requestDraw();
  }

  add(ev) {
    const x = unit(ev.x), y = unit(ev.y);
    if (x === null || y === null) return false;
    const z = unit(ev.z) ?? 0.5; // 2-D producers: the cube's middle plane
    const i = this.head;
    this.x[i] = x; this.y[i] = y; this.z[i] = z;
    this.phase[i] = phaseIdx(ev.phase);
    this.pred[i] = phaseIdx(ev.predicted);
    this.cluster[i] = Number.isInteger(ev.cluster) && ev.cluster >= 0 ? ev.cluster : -1;
    this.head = (i + 1) % MAX_POINTS;
    if (this.n < MAX_POINTS) this.n++;
    this.bucketsDirty = this.legendDirty = true;
    this.requestDraw();
    return true;
  }

  setMode(mode) {
    if (!MODES.includes(mode) || mode === this.mode) return;
    this.mode = mode;
    this.bucketsDirty = this.legendDirty = true;
    this.requestDraw();
  }

  reset() {
    this.view = { ...DEFAULT_VIEW };
    this.requestDraw();
  }

  rotate(dyaw, dpitch) {
    this.view.yaw += dyaw;
    this.view.pitch = Math.max(-Math.PI / 2, Math.min(Math.PI / 2, this.view.pitch + dpitch));
    this.requestDraw();
  }

  requestDraw() {
    if (!this.raf) this.raf = requestAnimationFrame(() => { this.raf = 0; this.draw(); });
  }

  // Colour keys for the current mode: [key per point written into keyOf, colours, labels].
  keys() {
    const n = this.n;
    const keyOf = new Int32Array(n);
    if (this.mode === "cluster") {
      const ids = [...new Set(this.cluster.subarray(0, n))].filter((c) => c >= 0).sort((a, b) => a - b);
      const slot = new Map(ids.map((c, k) => [c, k + 1]));
      for (let i = 0; i < n; i++) keyOf[i] = slot.get(this.cluster[i]) ?? 0;
      return { keyOf, colors: [cssVar("--phase-unknown"), ...ids.map(clusterColor)], labels: ["no cluster", ...ids.map((c) => `cluster ${c}`)], ids: [null, ...ids] };
    }
    const src = this.mode === "phase" ? this.phase : this.pred;
    for (let i = 0; i < n; i++) keyOf[i] = src[i] + 1;
    return { keyOf, colors: [cssVar("--phase-unknown"), ...PHASES.map(phaseColor)], labels: [this.mode === "phase" ? "no phase" : "no prediction", ...PHASES], ids: [null, ...PHASES] };
  }

  rebuildBuckets() {
    const { keyOf, colors, labels, ids } = this.keys();
    const counts = new Uint32Array(colors.length);
    for (let i = 0; i < this.n; i++) counts[keyOf[i]]++;
    const starts = new Uint32Array(colors.length + 1);
    for (let k = 0; k < colors.length; k++) starts[k + 1] = starts[k] + counts[k];
    const fill = starts.slice(0, colors.length);
    for (let i = 0; i < this.n; i++) this.order[fill[keyOf[i]]++] = i;
    this.buckets = { colors, labels, ids, counts, starts };
    this.bucketsDirty = false;
  }

  matrix() {
    const cy = Math.cos(this.view.yaw), sy = Math.sin(this.view.yaw);
    const cp = Math.cos(this.view.pitch), sp = Math.sin(this.view.pitch);
    // R = Rx(pitch) . Ry(yaw), row-major
    return [cy, 0, sy, sp * sy, cp, -sp * cy, -cp * sy, sp, cp * cy];
  }

  draw() {
    const t0 = performance.now();
    const c = this.canvas, ctx = this.ctx;
    const w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return; // scene hidden: draw when shown
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (this.bucketsDirty) this.rebuildBuckets();
    const [m0, m1, m2, m3, m4, m5, m6, m7, m8] = this.matrix();
    const scale = Math.min(w, h) * 0.56, cx = w / 2, cy = h / 2;
    const project = (x, y, z) => {
      const X = x - 0.5, Y = y - 0.5, Z = z - 0.5;
      const rx = m0 * X + m1 * Y + m2 * Z, ry = m3 * X + m4 * Y + m5 * Z, rz = m6 * X + m7 * Y + m8 * Z;
      const k = PERSPECTIVE / (PERSPECTIVE - rz);
      return [cx + rx * k * scale, cy - ry * k * scale, k];
    };

    // The faint cube first, so points sit inside it.
    const pc = CORNERS.map(([x, y, z]) => project(x, y, z));
    ctx.lineWidth = 1;
    ctx.strokeStyle = cssVar("--knn-cube");
    ctx.beginPath();
    for (const [a, b] of EDGES) { ctx.moveTo(pc[a][0], pc[a][1]); ctx.lineTo(pc[b][0], pc[b][1]); }
    ctx.stroke();
    ctx.fillStyle = cssVar("--knn-axis");
    ctx.font = "13px system-ui, sans-serif";
    for (const [label, corner] of [["x", 1], ["y", 2], ["z", 4]]) ctx.fillText(label, pc[corner][0] + 6, pc[corner][1] + 4);

    const n = this.n, sx = this.sx, sy = this.sy, sz = this.sz;
    const xs = this.x, ys = this.y, zs = this.z;
    for (let i = 0; i < n; i++) {
      const X = xs[i] - 0.5, Y = ys[i] - 0.5, Z = zs[i] - 0.5;
      const rz = m6 * X + m7 * Y + m8 * Z;
      const k = PERSPECTIVE / (PERSPECTIVE - rz);
      sx[i] = cx + (m0 * X + m1 * Y + m2 * Z) * k * scale;
      sy[i] = cy - (m3 * X + m4 * Y + m5 * Z) * k * scale;
      sz[i] = k;
    }
    const base = n > 5000 ? 2.4 : n > 1000 ? 3.2 : 5;
    const { colors, starts } = this.buckets;
    ctx.globalAlpha = 0.88;
    for (let k = 0; k < colors.length; k++) {
      if (starts[k + 1] === starts[k]) continue;
      ctx.fillStyle = colors[k];
      ctx.beginPath();
      for (let j = starts[k]; j < starts[k + 1]; j++) {
        const i = this.order[j], r = base * sz[i];
        ctx.rect(sx[i] - r / 2, sy[i] - r / 2, r, r);
      }
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (this.legendDirty) this.renderLegend();
    this.frames++;
    this.lastDrawMs = performance.now() - t0;
  }

  renderLegend() {
    this.legendDirty = false;
    const { colors, labels, ids, counts } = this.buckets;
    const items = [];
    for (let k = 0; k < colors.length; k++) {
      if (k === 0 && counts[0] === 0) continue; // "no phase" only when some point lacks one
      if (this.mode === "cluster" && counts[k] === 0) continue;
      const el = document.createElement("span");
      el.className = "sw";
      el.style.setProperty("--c", colors[k]);
      el.dataset.key = ids[k] === null ? "none" : String(ids[k]);
      el.textContent = `${labels[k]} \u00b7 ${counts[k].toLocaleString("en-US")}`;
      items.push(el);
    }
    this.legendEl.replaceChildren(...items);
    let both = 0, wrong = 0, clusters = new Set();
    for (let i = 0; i < this.n; i++) {
      if (this.phase[i] >= 0 && this.pred[i] >= 0) { both++; if (this.phase[i] !== this.pred[i]) wrong++; }
      if (this.cluster[i] >= 0) clusters.add(this.cluster[i]);
    }
    const stats = [["points", this.n.toLocaleString("en-US")], ["mislabelled", both ? `${((100 * wrong) / both).toFixed(1)} %` : "\u2014"], ["clusters", String(clusters.size)]];
    this.statsEl.replaceChildren(...stats.flatMap(([k, v]) => {
      const a = document.createElement("span"), b = document.createElement("b");
      a.textContent = k; b.textContent = v;
      return [a, b];
    }));
  }

  bindDrag() {
    let last = null;
    this.canvas.addEventListener("pointerdown", (e) => {
      last = [e.clientX, e.clientY];
      this.canvas.setPointerCapture(e.pointerId);
      this.canvas.classList.add("dragging");
    });
    this.canvas.addEventListener("pointermove", (e) => {
      if (!last) return;
      this.rotate((e.clientX - last[0]) * 0.01, (e.clientY - last[1]) * 0.01);
      last = [e.clientX, e.clientY];
    });
    const end = () => { last = null; this.canvas.classList.remove("dragging"); };
    this.canvas.addEventListener("pointerup", end);
    this.canvas.addEventListener("pointercancel", end);
  }

  // Rotate continuously for `ms` and report the frame rate (tests and the report use it).
  measureFps(ms = 2000) {
    return new Promise((resolve) => {
      const draws = [];
      const start = performance.now();
      const step = () => {
        this.view.yaw += 0.015;
        const t = performance.now();
        this.draw();
        draws.push(performance.now() - t);
        if (performance.now() - start < ms) requestAnimationFrame(step);
        else {
          const secs = (performance.now() - start) / 1000;
          draws.sort((a, b) => a - b);
          resolve({ points: this.n, frames: draws.length, seconds: secs, fps: draws.length / secs,
            meanDrawMs: draws.reduce((a, b) => a + b, 0) / draws.length, p95DrawMs: draws[Math.floor(draws.length * 0.95)] });
        }
      };
      requestAnimationFrame(step);
    });
  }
}
