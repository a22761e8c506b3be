// Mirrors schema/vocab.py (class order matters). tests/test_deck_browser.py fails if they drift.
export const PHASES = Object.freeze(["clean", "armed", "infecting", "infected_running", "dormant"]);
export const PROFILES = Object.freeze(["cpu-saturate", "bursty-c2", "scan-and-dial", "exfil-trickle", "disk-encrypt", "mem-inflate"]);
export const MODELS = Object.freeze(["gbt", "mlp", "cnn", "gru", "lstm", "transformer", "rocket"]);
export const STATUSES = Object.freeze(["accepted", "degraded", "rejected", "errored"]);
// schema/ood.py FLAG_AT: a prediction whose ood is at least this is flagged out of distribution.
export const OOD_FLAG_AT = 0.5;
