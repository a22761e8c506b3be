"""Vocabularies. Order matters: PHASES is the class order of every model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Literal

PHASES: Final = ("clean", "armed", "infecting", "infected_running", "dormant")
Phase = Literal["clean", "armed", "infecting", "infected_running", "dormant"]
PHASE_INDEX: Final = {p: i for i, p in enumerate(PHASES)}

PROFILES: Final = (
    "cpu-saturate",
    "bursty-c2",
    "scan-and-dial",
    "exfil-trickle",
    "disk-encrypt",
    "mem-inflate",
)

MODELS: Final = ("gbt", "mlp", "cnn", "gru", "lstm", "transformer", "rocket")
# Which view of a window each model reads.
MODEL_INPUT: Final = {
    "gbt": "summary",
    "mlp": "summary",
    "cnn": "tensor",
    "gru": "tensor",
    "lstm": "tensor",
    "transformer": "tensor",
    "rocket": "tensor",
}

THREAT_MODELS: Final = ("realistic", "oracle")

# Telemetry sources in SPEC order, with the archive member each lives in.
SOURCES: Final = ("proc", "guest", "qmp", "netflow")
SOURCE_MEMBER: Final = {
    "proc": "telemetry-proc.jsonl",
    "guest": "telemetry-guest.jsonl",
    "qmp": "telemetry-qmp.jsonl",
    "netflow": "netflow.jsonl",
}
# The other members of an episode (SPEC section 3), inside `<episode_id>/`.
META_MEMBER: Final = "meta.json"
LABELS_MEMBER: Final = "labels.jsonl"
EVENTS_MEMBER: Final = "events.jsonl"
DONE_MEMBER: Final = "done.marker"
PCAP_MEMBER: Final = "network.pcap"

# realistic: only what the host sees (an infected guest's agent can lie).
THREAT_SOURCES: Final = {
    "realistic": ("proc", "qmp", "netflow"),
    "oracle": ("proc", "guest", "qmp", "netflow"),
}

EPISODE_EVENT_KINDS: Final = (
    "vm_boot",
    "sample_drop",
    "sample_exec",
    "payload_start",
    "payload_sleep",
    "vm_shutdown",
)

# Validation outcomes, best to worst.
STATUSES: Final = ("accepted", "degraded", "rejected", "errored")

# Store file names (SPEC section 4): `<store>/<host>/<episode_id>.tar.zst`, its sha256sum-format
# sidecar next to it, and the acceptance index at the store's root.
ARCHIVE_SUFFIX: Final = ".tar.zst"
SIDECAR_SUFFIX: Final = ".sha256"
INDEX_NAME: Final = "index.jsonl"


def sidecar_path(archive: str | os.PathLike[str]) -> Path:
    """``<episode_id>.tar.zst`` -> ``<episode_id>.tar.zst.sha256`` beside it."""
    p = Path(archive)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def episode_id_from_path(archive: str | os.PathLike[str]) -> str:
    name = Path(archive).name
    return name.removesuffix(ARCHIVE_SUFFIX)
