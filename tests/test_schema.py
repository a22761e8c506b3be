"""The channel table, the views and the schema hash."""

from __future__ import annotations

import json

from schema import channels as ch
from schema.hashing import schema_document, schema_hash
from schema.rows import ROW_TYPES, row_fields
from schema.vocab import MODELS, PHASES, SOURCES, THREAT_SOURCES

# Pinned on purpose: a change to anything that decides the numbers must be deliberate.
GOLDEN_SCHEMA_HASH = "4fc50619ad91a5b95a3fac65f2d8e5f8c3cfd50c41d7677e8e03c9fede6b9329"


def test_46_channels_in_spec_order() -> None:
    assert [sum(c.source == s for c in ch.CHANNELS) for s in SOURCES] == [12, 16, 8, 10]
    # Source order, then the SPEC's field order inside each source.
    order = [SOURCES.index(c.source) for c in ch.CHANNELS]
    assert order == sorted(order)
    for s in SOURCES:
        struct_fields = [f for f in ROW_TYPES[s].__struct_fields__ if f in set(ch.SOURCE_FIELDS[s])]
        assert list(ch.SOURCE_FIELDS[s]) == struct_fields
    assert ch.CHANNEL_NAMES[0] == "proc.utime_ticks" and ch.CHANNEL_NAMES[-1] == "netflow.dns_queries"
    assert len(set(ch.CHANNEL_NAMES)) == 46


def test_ids_clocks_status_and_interval_are_not_channels() -> None:
    fields = {c.field for c in ch.CHANNELS}
    assert not fields & {"pid", "t_wall_ns", "t_mono_ns", "status", "interval_ms"}
    assert "interval_ms" in row_fields("netflow")  # read, but only to turn counts into rates


def test_threat_views() -> None:
    assert len(ch.REALISTIC_CHANNELS) == 30 and len(ch.ORACLE_CHANNELS) == 46
    assert all(ch.CHANNELS[i].source != "guest" for i in ch.REALISTIC_CHANNELS)
    assert THREAT_SOURCES["realistic"] == ("proc", "qmp", "netflow")


def test_transforms_follow_the_spec() -> None:
    for c in ch.CHANNELS:
        if c.field.endswith("_kb"):
            assert c.transform == "kb_to_mb" and c.unit == "MB"
        elif c.field.endswith("_pct"):
            assert c.transform == "identity"
        elif c.source == "netflow":
            assert c.transform == "interval_rate"


def test_window_geometry() -> None:
    assert (ch.RATE_HZ, ch.WINDOW_STEPS, ch.STRIDE_STEPS) == (10, 100, 50)
    assert len(ch.SUMMARY_STATS) >= 6


def test_schema_hash_is_pinned() -> None:
    assert schema_hash() == GOLDEN_SCHEMA_HASH, (
        "the schema hash changed: if features really changed, bump EXTRACTOR_VERSION where needed "
        "and update GOLDEN_SCHEMA_HASH and the golden features in test_extract.py"
    )


def test_schema_hash_covers_what_decides_the_numbers() -> None:
    doc = schema_document()
    for key in (
        "channels",
        "rate_hz",
        "window_steps",
        "stride_steps",
        "summary_stats",
        "phases",
        "extractor_version",
    ):
        assert key in doc
    assert doc["phases"] == list(PHASES)
    # canonical: key order does not matter, content does
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert json.loads(blob) == doc
    # Adding a model (issue 15: rocket) must not change the hash the other models were trained under.
    assert "models" not in doc and not set(MODELS) & set(json.dumps(doc).split('"'))
    assert len(set(MODELS)) == len(MODELS) == 7
