"""The deck's wire contract: producers' plain dicts decode, bad fields are named."""

from __future__ import annotations

import json

import msgspec
import pytest

from schema import events as ev

# Shapes the existing producers post (SPEC section 7), as plain dicts.
PRODUCER_DICTS = [
    {
        "type": "snapshot",
        "hosts": [{"host": "h1", "accepted": 10, "degraded": 2, "bytes": 123, "last_seen_ns": 5}],
        "totals": {"accepted": 10, "degraded": 2},
    },
    {
        "type": "episode",
        "episode_id": "ep-1",
        "host": "h1",
        "profile": "bursty-c2",
        "status": "accepted",
        "duration_s": 312.5,
        "bytes": 812345,
    },
    {"type": "phase", "phase": "dormant"},
    {
        "type": "attack_profile",
        "name": "cpu-saturate",
        "curve": [0.0] * 40 + [1.0] * 40,
        "shape": "sustained one-vCPU peg",
    },
    {
        "type": "prediction",
        "episode_id": "ep-1",
        "window_idx": 3,
        "predicted": "infecting",
        "actual": "armed",
    },
    {"type": "model_metric", "model": "gru", "accuracy": 0.83},
    {"type": "embedding", "x": 0.1, "y": 0.9, "z": 0.4, "phase": "clean", "predicted": "armed", "cluster": 2},
    {"type": "model_perf", "model": "cnn", "latency_us": 812.0, "accuracy": 0.8},
]


@pytest.mark.parametrize("obj", PRODUCER_DICTS, ids=[d["type"] for d in PRODUCER_DICTS])
def test_producer_dicts_round_trip(obj: dict) -> None:
    event = ev.decode_event(json.dumps(obj))
    assert ev.event_type(event) == obj["type"]
    # encoded back: the same keys, nothing added (unset fields are left out, not null)
    assert json.loads(ev.encode_event(event)) == obj
    assert ev.from_dict(obj) == event


def test_a_list_decodes_too() -> None:
    events = ev.decode_events(json.dumps(PRODUCER_DICTS))
    assert [ev.event_type(e) for e in events] == [d["type"] for d in PRODUCER_DICTS]


def test_2d_embedding_is_drawn_at_half_depth() -> None:
    e = ev.decode_event(b'{"type":"embedding","x":0.2,"y":0.3}')
    assert e.z is None and e.z_drawn == 0.5
    assert b'"z"' not in ev.encode_event(e)


def test_unknown_model_name_is_accepted() -> None:
    e = ev.decode_event(b'{"type":"model_metric","model":"my-new-svm","accuracy":0.7}')
    assert e.model == "my-new-svm"


def test_unknown_extra_fields_are_ignored() -> None:
    e = ev.decode_event(b'{"type":"phase","phase":"armed","colour":"red"}')
    assert e.phase == "armed"


@pytest.mark.parametrize(
    "body,field",
    [
        (b'{"type":"model_metric","model":"gru","accuracy":"high"}', "$.accuracy"),
        (b'{"type":"model_metric","model":"gru","accuracy":1.5}', "$.accuracy"),
        (b'{"type":"embedding","x":0.1,"y":0.2,"cluster":-1}', "$.cluster"),
        (b'{"type":"phase","phase":"sleepy"}', "$.phase"),
        (b'{"type":"prediction","window_idx":1}', "episode_id"),
        (
            b'[{"type":"phase","phase":"clean"},{"type":"model_perf","model":"x","latency_us":-3,"accuracy":0.5}]',
            "$[1].latency_us",
        ),
    ],
)
def test_bad_field_is_named(body: bytes, field: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        ev.decode_events(body)
    assert field in str(info.value)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="type"):
        ev.decode_event(b'{"type":"weather","x":1}')


def test_event_types_follow_spec() -> None:
    assert set(ev.EVENT_TYPES) == {
        "snapshot",
        "episode",
        "phase",
        "attack_profile",
        "prediction",
        "model_metric",
        "embedding",
        "model_perf",
    }
