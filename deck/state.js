// The deck's model of the world, rebuilt from events. Pure data: no DOM here.
import { STATUSES } from "./vocab.js";

export const WINDOWS = 6;                 // cells in a chunking timeline
export const BASELINE_MS = 5 * 60 * 1000; // rolling window of the baseline scene
export const MAX_EPISODES = 200;
export const MAX_TIMELINES = 6;

const isStr = (v) => typeof v === "string" && v.length > 0;
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const optStr = (v) => (isStr(v) ? v : null);

export function emptyState() {
  return {
    snapshot: null,          // last snapshot event, as sent
    snapshotAt: 0,           // when it arrived (ms)
    sinceSnapshot: new Map(),// host -> counts of episodes that arrived after it
    episodes: [],            // newest first
    lastEpisodeByHost: new Map(),
    phases: [],              // {t, phase}, oldest first
    attacks: new Map(),      // name -> {curve, shape}
    timelines: new Map(),    // episode_id -> {cells: [6], model}; insertion order = recency
    metrics: new Map(),      // model -> {accuracy, ci_low, ci_high, threat_model}
    perf: new Map(),         // model -> {latency_us, accuracy, p99_us}
    events: 0,
    ignored: 0,
  };
}

function zeroCounts() {
  return { accepted: 0, degraded: 0, rejected: 0, errored: 0, bytes: 0, last_seen_ns: null };
}

// Hosts as drawn: the last snapshot plus the episodes seen since it.
export function hostRows(state) {
  const rows = new Map();
  for (const h of state.snapshot?.hosts ?? []) {
    if (!isStr(h?.host)) continue;
    const r = zeroCounts();
    for (const s of STATUSES) r[s] = isNum(h[s]) ? h[s] : 0;
    r.bytes = isNum(h.bytes) ? h.bytes : 0;
    r.last_seen_ns = isNum(h.last_seen_ns) ? h.last_seen_ns : null;
    rows.set(h.host, r);
  }
  for (const [host, add] of state.sinceSnapshot) {
    const r = rows.get(host) ?? zeroCounts();
    for (const s of STATUSES) r[s] += add[s];
    r.bytes += add.bytes;
    if (add.last_seen_ns !== null && (r.last_seen_ns === null || add.last_seen_ns > r.last_seen_ns)) r.last_seen_ns = add.last_seen_ns;
    rows.set(host, r);
  }
  return rows;
}

export function totals(state) {
  const t = { accepted: 0, degraded: 0, rejected: 0, errored: 0, bytes: 0 };
  const snap = state.snapshot;
  const rows = hostRows(state);
  if (snap?.totals) {
    for (const s of STATUSES) t[s] = isNum(snap.totals[s]) ? snap.totals[s] : 0;
    for (const add of state.sinceSnapshot.values()) for (const s of STATUSES) t[s] += add[s];
  } else {
    for (const r of rows.values()) for (const s of STATUSES) t[s] += r[s];
  }
  t.bytes = isNum(snap?.total_bytes) ? snap.total_bytes : 0;
  if (!isNum(snap?.total_bytes)) for (const r of rows.values()) t.bytes += r.bytes;
  else for (const add of state.sinceSnapshot.values()) t.bytes += add.bytes;
  t.episodes = STATUSES.reduce((n, s) => n + t[s], 0);
  return t;
}

// When a phase happened, on the performance.now() timeline. A replay after a reconnect
// carries the last five minutes at once: their t_ns keeps the trend honest. A clock that
// disagrees with ours by more than the window is not trusted: arrival time it is.
function phaseTime(ev, now) {
  if (!isNum(ev.t_ns)) return now;
  const ago = Date.now() - ev.t_ns / 1e6;
  return ago >= 0 && ago < BASELINE_MS ? now - ago : now;
}

export function prunePhases(state, now) {
  const cut = now - BASELINE_MS;
  let i = 0;
  while (i < state.phases.length && state.phases[i].t < cut) i++;
  if (i) state.phases.splice(0, i);
}

// Apply one event; returns the scene ids to repaint, or null when the event is ignored.
// Unknown types and malformed events are counted, never thrown: producers are out of our hands.
export function applyEvent(state, ev, now) {
  if (ev === null || typeof ev !== "object" || !isStr(ev.type)) { state.ignored++; return null; }
  state.events++;
  switch (ev.type) {
    case "snapshot":
      state.snapshot = ev;
      state.snapshotAt = now;
      state.sinceSnapshot.clear();
      return ["title", "collect", "hosts", "db"];
    case "episode": {
      if (!isStr(ev.episode_id) || !isStr(ev.host)) break;
      const e = { episode_id: ev.episode_id, host: ev.host, profile: optStr(ev.profile), status: optStr(ev.status),
        duration_s: isNum(ev.duration_s) ? ev.duration_s : null, bytes: isNum(ev.bytes) ? ev.bytes : null, at: now };
      state.episodes.unshift(e);
      if (state.episodes.length > MAX_EPISODES) state.episodes.length = MAX_EPISODES;
      state.lastEpisodeByHost.set(e.host, e);
      const add = state.sinceSnapshot.get(e.host) ?? zeroCounts();
      if (STATUSES.includes(e.status)) add[e.status]++;
      add.bytes += e.bytes ?? 0;
      add.last_seen_ns = now * 1e6;
      state.sinceSnapshot.set(e.host, add);
      return ["title", "collect", "hosts", "db"];
    }
    case "phase":
      if (!isStr(ev.phase)) break;
      state.phases.push({ t: phaseTime(ev, now), phase: ev.phase });
      if (state.phases.length > 1 && state.phases.at(-1).t < state.phases.at(-2).t) state.phases.sort((a, b) => a.t - b.t);
      prunePhases(state, now);
      return ["baseline"];
    case "attack_profile":
      if (!isStr(ev.name) || !Array.isArray(ev.curve)) break;
      state.attacks.set(ev.name, { curve: ev.curve.filter(isNum), shape: optStr(ev.shape) });
      return ["attacks"];
    case "prediction": {
      const i = ev.window_idx;
      if (!isStr(ev.episode_id) || !Number.isInteger(i) || i < 0 || i >= WINDOWS) break;
      const key = isStr(ev.node) ? `${ev.node}\u0000${ev.episode_id}` : ev.episode_id; // a fleet's nodes apart
      let tl = state.timelines.get(key);
      if (tl) state.timelines.delete(key); // re-insert: most recently touched last
      else tl = { cells: new Array(WINDOWS).fill(null), model: null, episode_id: ev.episode_id, node: optStr(ev.node) };
      const prev = tl.cells[i] ?? {};
      const unscored = optStr(ev.unscored); // no prediction for this window, and why ("no qmp")
      tl.cells[i] = {
        unscored,
        predicted: unscored ? null : optStr(ev.predicted) ?? prev.predicted ?? null,
        actual: optStr(ev.actual) ?? prev.actual ?? null,
        confidence: unscored ? null : isNum(ev.confidence) ? ev.confidence : prev.confidence ?? null,
        window_no: Number.isInteger(ev.window_no) ? ev.window_no : prev.window_no ?? null,
        ood: isNum(ev.ood) ? ev.ood : prev.ood ?? null,
      };
      if (isStr(ev.model)) tl.model = ev.model;
      state.timelines.set(key, tl);
      while (state.timelines.size > MAX_TIMELINES) state.timelines.delete(state.timelines.keys().next().value);
      return ["chunking"];
    }
    case "model_metric":
      if (!isStr(ev.model) || !isNum(ev.accuracy)) break;
      state.metrics.set(ev.model, { accuracy: ev.accuracy, ci_low: isNum(ev.ci_low) ? ev.ci_low : null,
        ci_high: isNum(ev.ci_high) ? ev.ci_high : null, threat_model: optStr(ev.threat_model) });
      return ["models"];
    case "model_perf":
      if (!isStr(ev.model) || !isNum(ev.latency_us) || !isNum(ev.accuracy)) break;
      state.perf.set(ev.model, { latency_us: ev.latency_us, accuracy: ev.accuracy, p99_us: isNum(ev.p99_us) ? ev.p99_us : null });
      return ["perf"];
    case "embedding":
      return isNum(ev.x) && isNum(ev.y) ? ["knn"] : (state.ignored++, null);
    default:
      break;
  }
  state.ignored++;
  return null;
}

// --- the fleet (edge-daemon --fleet): one row per node, from its status events and its traffic ---
export const FLEET_EPISODE_MS = 30 * 1000; // an episode predicted this recently counts as live

export function emptyFleet() {
  return { nodes: new Map() }; // node -> row (see nodeRow)
}

function nodeRow() {
  return { state: "unknown", lastSeenNs: null, version: null, schemaHash: null, models: [], primary: null,
    liveEpisodes: null, windowsPerS: null, dropped: null, events: 0, recent: new Map() };
}

// Apply one event to the fleet table; returns true when the fleet scene should repaint.
// Only status events say online/offline: a dead node's retained state replayed on connect
// must not make it look alive, so its traffic refreshes "last seen" only while online.
export function applyFleet(fleet, ev, nowMs = Date.now()) {
  if (ev === null || typeof ev !== "object" || !isStr(ev.node)) return false;
  let n = fleet.nodes.get(ev.node);
  if (!n) fleet.nodes.set(ev.node, (n = nodeRow()));
  n.events++;
  if (ev.type === "status") {
    if (ev.state === "online" || ev.state === "offline") n.state = ev.state;
    n.version = optStr(ev.version) ?? n.version;
    n.schemaHash = optStr(ev.schema_hash) ?? n.schemaHash;
    if (Array.isArray(ev.models)) n.models = ev.models.filter(isStr);
    n.primary = optStr(ev.primary_model) ?? n.primary;
    n.liveEpisodes = isNum(ev.live_episodes) ? ev.live_episodes : n.liveEpisodes;
    n.windowsPerS = isNum(ev.windows_per_s) ? ev.windows_per_s : n.windowsPerS;
    n.dropped = isNum(ev.dropped) ? ev.dropped : n.dropped;
    if (isNum(ev.t_ns) && ev.state === "online") n.lastSeenNs = Math.max(n.lastSeenNs ?? 0, ev.t_ns);
    if (ev.state === "offline" && isNum(ev.t_ns)) n.lastSeenNs = Math.max(n.lastSeenNs ?? 0, ev.t_ns);
    return true;
  }
  if (n.state !== "offline") n.lastSeenNs = nowMs * 1e6;
  if (ev.type === "prediction" && isStr(ev.episode_id)) {
    n.recent.set(ev.episode_id, nowMs);
    if (!n.primary && isStr(ev.model)) n.primary = ev.model;
  }
  return ev.type === "prediction";
}

// The rows as drawn: node, live episodes (heartbeat, or what it predicted lately), and whether
// its schema hash differs from the one most nodes run.
export function fleetRows(fleet, nowMs = Date.now()) {
  const votes = new Map();
  for (const n of fleet.nodes.values()) if (n.schemaHash) votes.set(n.schemaHash, (votes.get(n.schemaHash) ?? 0) + 1);
  const common = [...votes.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))[0]?.[0] ?? null;
  return [...fleet.nodes.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([node, n]) => {
    for (const [ep, t] of n.recent) if (nowMs - t > FLEET_EPISODE_MS) n.recent.delete(ep);
    const live = Math.max(n.liveEpisodes ?? 0, n.state === "offline" ? 0 : n.recent.size);
    return { node, ...n, live, hashDiffers: votes.size > 1 && n.schemaHash !== null && n.schemaHash !== common };
  });
}
