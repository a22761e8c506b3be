// Colours come from style.css custom properties only; this module just looks them up.
import { PHASES, MODELS, STATUSES } from "./vocab.js";

const cache = new Map();

export function cssVar(name) {
  let v = cache.get(name);
  if (v === undefined) {
    v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    cache.set(name, v);
  }
  return v;
}

// CSS expressions for DOM styles (so a theme change in style.css is picked up as is).
export const phaseVar = (p) => (PHASES.includes(p) ? `var(--phase-${p})` : "var(--phase-unknown)");
export const modelVar = (m) => (MODELS.includes(m) ? `var(--model-${m})` : "var(--model-unknown)");
export const statusVar = (s) => (STATUSES.includes(s) ? `var(--status-${s})` : "var(--muted)");

// Resolved colours for canvas drawing.
export const phaseColor = (p) => cssVar(PHASES.includes(p) ? `--phase-${p}` : "--phase-unknown");
export const modelColor = (m) => cssVar(MODELS.includes(m) ? `--model-${m}` : "--model-unknown");

const GOLDEN_ANGLE = 137.508; // successive ids land far apart on the hue circle
export function clusterColor(id) {
  const base = parseFloat(cssVar("--cluster-hue")) || 0;
  const hue = (base + id * GOLDEN_ANGLE) % 360;
  return `hsl(${hue.toFixed(1)} ${cssVar("--cluster-sat") || "70%"} ${cssVar("--cluster-light") || "60%"})`;
}
