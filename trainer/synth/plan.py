"""The store plan: which episode runs on which host, with which sample, and what goes wrong.

Planning is cheap and sequential; everything random inside an episode is drawn later from
``np.random.default_rng([seed, index])`` so episodes can be generated in any order, in
parallel, and still be byte-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from schema.vocab import PROFILES

from .catalog import SAMPLES_BY_PROFILE, Host, Sample, make_hosts

# Outcome mix of the real corpus (64,798 / 8,154 / 3,701 / 7 of 76,660), with errored
# raised to about 1 % so that even a small store exercises that path.
OUTCOME_SHARE: dict[str, float] = {"accepted": 0.84, "degraded": 0.10, "rejected": 0.05, "errored": 0.01}

# How each bad case happens in life, with its share inside its outcome.
DEFECTS: dict[str, dict[str, float]] = {
    "accepted": {"none": 1.0},
    "degraded": {
        "collector_crash": 0.22,  # no done.marker, streams stop mid-line, stale ended_ns
        "guest_agent_died": 0.16,  # guest stream stops part-way (often killed by the sample)
        "guest_missing": 0.06,  # image without the agent
        "netflow_sparse": 0.10,  # capture box overloaded, most intervals lost
        "netflow_missing": 0.04,  # capture box down
        "qmp_sparse": 0.08,  # QMP socket timeouts
        "long_gap": 0.10,  # collector stalled on fsync for tens of seconds
        "malformed_lines": 0.14,  # partial flush, NaN from a buggy agent, non-UTF-8 bytes
        "missing_sidecar": 0.10,  # uploader died before writing the sidecar
    },
    "rejected": {
        "too_short": 0.25,  # VM failed to boot, run aborted after a few seconds
        "missing_proc": 0.20,  # qemu pid not found (pid namespace), no proc stream
        "clock_step": 0.20,  # NTP stepped the host clock back: labels go back in time
        "unknown_phase": 0.15,  # an old orchestrator writes phases the vocabulary lacks
        "proc_sparse": 0.20,  # proc sampler fell to ~1 Hz
    },
    "errored": {
        "truncated_upload": 0.40,  # archive cut mid-stream, sidecar of the full file
        "bit_flip": 0.40,  # one bit flipped after the sidecar was written
        "meta_garbage": 0.20,  # meta.json left as NULs by a crash of the collector's disk
    },
}
# Defects that only make sense when the episode has phase transitions.
NEEDS_INFECTION = frozenset({"clock_step", "unknown_phase"})
CLEAN_ONLY_SHARE = 0.20
SLOT_NS = 600 * 10**9  # each host runs one episode per ten-minute slot


@dataclass(frozen=True)
class EpisodeSpec:
    index: int
    seed: int
    episode_id: str
    host: Host
    sample: Sample | None  # None: a clean-only episode
    outcome: str  # intended validation status
    defect: str
    started_ns: int  # host wall clock at vm_boot

    @property
    def profile(self) -> str | None:
        return self.sample.profile if self.sample else None


def _quota(n: int, shares: dict[str, float]) -> list[str]:
    """Largest-remainder apportionment: exact shares for any n, no sampling noise."""
    keys = list(shares)
    raw = np.array([shares[k] for k in keys], dtype=float)
    raw = raw / raw.sum() * n
    base = np.floor(raw).astype(int)
    rest = n - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return [k for k, c in zip(keys, base) for _ in range(c)]


def plan_store(episodes: int, hosts: int, seed: int) -> list[EpisodeSpec]:
    if episodes < 1 or hosts < 1:
        raise ValueError("episodes and hosts must be >= 1")
    rng = np.random.default_rng([seed, 0x5EED])
    host_list = make_hosts(hosts, seed)

    outcomes = _quota(episodes, OUTCOME_SHARE)
    # keep the rare path alive: one errored archive from 50 episodes, every kind from 200
    need = 3 if episodes >= 200 else 1 if episodes >= 50 else 0
    while outcomes.count("errored") < need:
        outcomes[outcomes.index("accepted")] = "errored"
    defects: list[str] = [""] * episodes
    perm = rng.permutation(episodes)
    outcome_of = [""] * episodes
    for i, o in zip(perm, outcomes):
        outcome_of[i] = o
    for o, shares in DEFECTS.items():
        members = [i for i in range(episodes) if outcome_of[i] == o]
        for i, d in zip(members, rng.permutation(_quota(len(members), shares))):
            defects[i] = str(d)

    # clean-only episodes, never where a defect needs phase transitions
    eligible = [i for i in rng.permutation(episodes) if defects[i] not in NEEDS_INFECTION]
    clean_only = set(eligible[: round(CLEAN_ONLY_SHARE * episodes)])

    # hosts carry uneven shares of the corpus, as real lab hosts do
    weights = rng.uniform(0.7, 1.3, hosts)
    host_of = rng.permutation(_quota(episodes, {str(h): w for h, w in enumerate(weights)}))
    # profiles round-robin over infected episodes in a shuffled order; samples cycle inside a profile
    infected_order = [i for i in rng.permutation(episodes) if i not in clean_only]
    sample_of: dict[int, Sample] = {}
    for k, i in enumerate(infected_order):
        prof = PROFILES[k % len(PROFILES)]
        sams = SAMPLES_BY_PROFILE[prof]
        sample_of[int(i)] = sams[(k // len(PROFILES)) % len(sams)]

    specs: list[EpisodeSpec] = []
    slot = [0] * hosts
    for i in range(episodes):
        h = host_list[int(host_of[i])]
        started = h.epoch_ns + slot[int(host_of[i])] * SLOT_NS + int(rng.integers(0, 60_000)) * 1_000_000
        slot[int(host_of[i])] += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started // 10**9))
        specs.append(
            EpisodeSpec(
                index=i,
                seed=seed,
                episode_id=f"{stamp}-{h.host_id}-{i:06d}",
                host=h,
                sample=sample_of.get(i),
                outcome=outcome_of[i],
                defect=defects[i],
                started_ns=started,
            )
        )
    return specs
