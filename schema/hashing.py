"""The schema hash: sha256 of everything that decides the numbers a model sees."""

from __future__ import annotations

import hashlib
import json
from functools import cache

from . import channels as ch
from .vocab import PHASES, THREAT_SOURCES


def schema_document() -> dict:
    """The canonical description that is hashed. Anything that changes features goes here."""
    return {
        "channels": [[c.name, c.source, c.field, c.transform, c.unit] for c in ch.CHANNELS],
        "rate_hz": ch.RATE_HZ,
        "window_steps": ch.WINDOW_STEPS,
        "stride_steps": ch.STRIDE_STEPS,
        "hold_ns": dict(sorted(ch.HOLD_NS.items())),
        "lookback_ns": ch.LOOKBACK_NS,
        "min_coverage": ch.MIN_COVERAGE,
        "summary_stats": list(ch.SUMMARY_STATS),
        "phases": list(PHASES),
        "threat_sources": {k: list(v) for k, v in sorted(THREAT_SOURCES.items())},
        "extractor_version": ch.EXTRACTOR_VERSION,
        "dtype": "float32",
    }


@cache
def schema_hash() -> str:
    blob = json.dumps(schema_document(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()
