"""The synthetic store generator (SPEC sections 3 and 8).

    phasewatch synth --out DIR [--episodes N] [--hosts H] [--seed S] [--jobs J]

writes ``<host>/<episode>.tar.zst`` with ``.sha256`` sidecars and ``synth-truth.jsonl``
(what each episode was meant to be: host, profile, sample, phases, intended outcome and the
defect injected). Deterministic for a seed, whatever the number of jobs.
"""

from __future__ import annotations

from .catalog import SAMPLES, SAMPLES_BY_PROFILE, Host, Sample, make_hosts
from .episode import build_episode, generate_episode
from .plan import DEFECTS, OUTCOME_SHARE, EpisodeSpec, plan_store
from .store import (
    SynthSummary,
    add_synth_arguments,
    cli_synth,
    generate_store,
    pack_archive,
    read_truth,
    ship_episode,
    sidecar_line,
)

__all__ = [
    "DEFECTS",
    "OUTCOME_SHARE",
    "SAMPLES",
    "SAMPLES_BY_PROFILE",
    "EpisodeSpec",
    "Host",
    "Sample",
    "SynthSummary",
    "add_synth_arguments",
    "build_episode",
    "cli_synth",
    "generate_episode",
    "generate_store",
    "make_hosts",
    "pack_archive",
    "plan_store",
    "read_truth",
    "ship_episode",
    "sidecar_line",
]
