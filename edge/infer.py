"""Score ready windows with every loaded model and turn the answers into deck events.

``Engine.score`` is synchronous and runs in one worker thread (the daemon calls it through
``trio.to_thread.run_sync`` behind a ``CapacityLimiter(1)``): extraction is numpy and
ONNX Runtime releases the GIL, so a slow model never stalls tailing or the sockets.
Windows that became ready together are scored as one batch per model, which is what
keeps many live episodes on one core.

Which model drives the chunking timeline: the ``realistic`` model with the best held-out
accuracy in the manifest (the oracle sees the guest agent, which an infected guest can
fake, so it never drives the live view). The deck draws every ``prediction`` of an
episode into the same six cells, so only the primary's are published by default
(``Scored.events``); the other eleven models' go to ``Scored.others`` (published with
``edge-daemon --all-predictions``). Every prediction carries ``model="<name>-<threat>"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from edge.modelset import RUN_CHOICES, LoadedModel, ModelSet, embed_threat, pick_primary
from edge.tail import WindowJob
from schema.artifacts import BENCH_FILE, ArtifactError, BenchDoc, perf_events, read_doc
from schema.events import AttackProfile, Embedding, Event, ModelMetric, PhaseEvent, Prediction
from schema.extract import Window, extract_window, input_shape, summarize, window_centre_ns
from schema.ood import FLAG_AT, ood_score
from schema.vocab import PHASES

log = logging.getLogger("edge.infer")

TIMELINE_CELLS = 6  # the deck's chunking timeline: window_idx = window_no % 6
DRIFT_ALPHA = 0.01  # the drift gauge's moving average weighs the last ~100 windows


@dataclass
class Scored:
    job: WindowJob
    events: list[Event] = field(default_factory=list)  # phase, the primary's prediction
    late: list[Event] = field(default_factory=list)  # embedding (needs the projector pass)
    others: list[Prediction] = field(default_factory=list)  # the other models' predictions
    usable: bool = False
    done_at: float = 0.0  # time.perf_counter() when the primary's pass finished

    @property
    def all_events(self) -> list[Event]:
        return [*self.events, *self.late, *self.others]


@dataclass
class Batch:
    """Windows scored together: what ``score_primary`` computed once for ``score_rest``."""

    scored: list[Scored]
    wins: list[Window]
    tensors: np.ndarray
    summaries: np.ndarray
    primary_pred: dict[int, str] = field(default_factory=dict)
    ood: dict[str, np.ndarray] = field(default_factory=dict)  # threat model -> (N,) ood score

    @classmethod
    def merge(cls, batches: Sequence[Batch]) -> Batch:
        """Several ticks' batches as one, for ``score_rest`` (which is not latency-critical)."""
        if len(batches) == 1:
            return batches[0]
        out = cls(
            [s for b in batches for s in b.scored],
            [w for b in batches for w in b.wins],
            np.concatenate([b.tensors for b in batches]),
            np.concatenate([b.summaries for b in batches]),
        )
        offset = 0
        for b in batches:
            out.primary_pred.update({i + offset: p for i, p in b.primary_pred.items()})
            offset += len(b.scored)
        for threat in batches[0].ood:
            out.ood[threat] = np.concatenate([b.ood[threat] for b in batches])
        return out


# Windows per session.run: past a few windows a batch no longer gets cheaper per window
# (measured on cnn/gru/lstm/transformer/rocket), while its intermediates (rocket: ~1.6 MB a
# window) grow with it, so a 64-window backlog would set the daemon's peak RSS (ORT's arena,
# which kept the largest batch for good, is off: DECISIONS 66).
RUN_CHUNK: Final = 8


class Engine:
    """One model set, scoring batches of windows. Not thread-safe: one worker thread at a time."""

    def __init__(
        self, modelset: ModelSet, metrics: Any | None = None, *, embed: bool = True, run: str = "all"
    ) -> None:
        if run not in RUN_CHOICES:
            raise ValueError(f"run must be one of {', '.join(RUN_CHOICES)}, not {run!r}")
        self.run = run
        self.modelset = modelset
        self.metrics = metrics
        self.primary = pick_primary(modelset.models)
        self.embed_threat = embed_threat(self.primary.threat_model, list(modelset.projectors))
        self.embed = embed and self.embed_threat is not None and run != "primary"
        self._batchable: dict[str, bool] = {}
        self.drift: dict[str, float] = {}  # threat model -> moving share of flagged windows
        self._threats = sorted({m.threat_model for m in modelset.models})

    def score(self, jobs: Sequence[WindowJob]) -> list[Scored]:
        """Extract each window, run every model on the usable ones, build all their events."""
        batch = self.score_primary(jobs)
        self.score_rest(batch)
        return batch.scored

    def score_primary(self, jobs: Sequence[WindowJob]) -> Batch:
        """The latency-critical half: extraction, ``phase`` and the primary's ``prediction``.

        The daemon publishes these before ``score_rest`` runs the other eleven models and
        the projector, so the timeline's latency is one model's, not twelve."""
        out = [Scored(job) for job in jobs]
        wins: list[Window] = [extract_window(j.streams, j.t0_ns, j.w) for j in jobs]
        tensors = (
            np.stack([w.tensor for w in wins]) if wins else np.zeros((0, *input_shape("tensor")), np.float32)
        )
        summaries = summarize(tensors) if len(wins) else np.zeros((0, *input_shape("summary")), np.float32)
        batch = Batch(out, wins, tensors, summaries)
        self._score_ood(batch)
        for s, job in zip(out, jobs):
            if job.actual is not None:
                s.events.append(
                    PhaseEvent(
                        phase=job.actual,  # type: ignore[arg-type]  # a label the tailer decoded
                        episode_id=job.episode_id,
                        host=job.host,
                        t_ns=window_centre_ns(job.t0_ns, job.w),
                    )
                )
        self._score_model(self.primary, batch)
        self._unscored(batch)
        now = time.perf_counter()
        for s in out:
            s.done_at = now
        return batch

    def score_rest(self, batch: Batch) -> None:
        """Every other model (into ``Scored.others``) and the projector (into ``Scored.late``)."""
        for model in self.modelset.models:
            if model is self.primary or self.run == "primary":
                continue
            if self.run == "realistic" and model.threat_model != "realistic":
                continue
            self._score_model(model, batch)
        if self.embed and self.embed_threat is not None:
            proj = self.modelset.projectors[self.embed_threat]
            idx = [i for i, w in enumerate(batch.wins) if w.usable(self.embed_threat)]
            if idx:
                xyz, cluster = proj.project(batch.summaries[idx])
                for i, p, c in zip(idx, xyz, np.asarray(cluster).reshape(-1)):
                    if not np.all(np.isfinite(p)):
                        continue
                    x, y, z = (min(1.0, max(0.0, float(v))) for v in p[:3])
                    s = batch.scored[i]
                    s.late.append(
                        Embedding(
                            x=x,
                            y=y,
                            z=z,
                            phase=s.job.actual,
                            predicted=batch.primary_pred.get(i),
                            cluster=max(0, int(c)),
                            episode_id=s.job.episode_id,
                        )
                    )

    def _score_ood(self, batch: Batch) -> None:
        """Each threat model's OOD score of every window, and the drift gauge it moves."""
        for threat, det in self.modelset.ood.items():
            idx = [i for i, w in enumerate(batch.wins) if w.usable(threat)]
            score = np.full(len(batch.wins), np.nan)
            if idx:
                score[idx] = ood_score(det, batch.summaries[idx])
            batch.ood[threat] = score
            flagged = score[idx] >= FLAG_AT
            d = self.drift.get(threat)
            for f in flagged:  # one step per window: the average forgets at the same pace at any rate
                d = float(f) if d is None else d + DRIFT_ALPHA * (float(f) - d)
            if d is not None:
                self.drift[threat] = d
            if self.metrics is not None and idx:
                self.metrics.windows_flagged.inc(int(flagged.sum()), threat_model=threat)
                self.metrics.ood_drift.set(self.drift[threat], threat_model=threat)

    def _unscored(self, batch: Batch) -> None:
        """A window a threat model cannot score is counted by why; the timeline's threat model
        also sends the deck a prediction-less cell saying why ("no qmp")."""
        for i, (s, win) in enumerate(zip(batch.scored, batch.wins)):
            for threat in self._threats:
                why = win.unusable_reasons(threat)
                if not why:
                    continue
                if self.metrics is not None:
                    for r in why:
                        self.metrics.windows_unscored.inc(threat_model=threat, reason=r)
                if threat == self.primary.threat_model and i not in batch.primary_pred:
                    s.events.append(
                        Prediction(
                            episode_id=s.job.episode_id,
                            window_idx=s.job.w % TIMELINE_CELLS,
                            window_no=s.job.w,
                            actual=s.job.actual,
                            model=self.primary.key,
                            unscored=", ".join(r.replace("_", " ") for r in why),
                        )
                    )

    def _score_model(self, model: LoadedModel, batch: Batch) -> None:
        idx = [i for i, w in enumerate(batch.wins) if w.usable(model.threat_model)]
        if not idx:
            return
        x = batch.tensors[idx] if model.input_kind == "tensor" else batch.summaries[idx]
        probs = self._run(model, x)
        is_primary = model is self.primary
        ood = batch.ood.get(model.threat_model)
        for i, p in zip(idx, probs):
            k = int(np.argmax(p))
            s = batch.scored[i]
            s.usable = True
            if is_primary:
                batch.primary_pred[i] = PHASES[k]
            pred = Prediction(
                episode_id=s.job.episode_id,
                window_idx=s.job.w % TIMELINE_CELLS,
                window_no=s.job.w,
                predicted=PHASES[k],
                actual=s.job.actual,
                model=model.key,
                confidence=min(1.0, max(0.0, float(p[k]))) if math.isfinite(float(p[k])) else None,
                # 6 decimals: a batch and a lone window agree on the wire (numpy's SIMD may not to the ulp)
                ood=round(min(1.0, max(0.0, float(ood[i]))), 6)
                if ood is not None and math.isfinite(ood[i])
                else None,
            )
            (s.events if is_primary else s.others).append(pred)

    def _run(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        """Whole batch in one call when the graph allows it; otherwise one window at a time."""
        t = time.perf_counter()
        probs: np.ndarray | None = None
        if len(x) > 1 and self._batchable.get(model.key, True):
            try:
                probs = np.concatenate(
                    [
                        np.asarray(model.predict_proba(x[i : i + RUN_CHUNK]))
                        for i in range(0, len(x), RUN_CHUNK)
                    ]
                )
                if probs.shape[0] != len(x):
                    raise ValueError(f"batch of {len(x)} gave {probs.shape[0]} rows")
            except Exception as e:  # a graph exported with a fixed batch of 1
                log.info("%s: no batched inference (%s); scoring one window at a time", model.key, e)
                self._batchable[model.key] = False
                probs = None
        if probs is None:
            probs = np.concatenate([np.asarray(model.predict_proba(x[i : i + 1])) for i in range(len(x))])
        dt = time.perf_counter() - t
        if self.metrics is not None:
            self.metrics.windows_inferred.inc(len(x), model=model.key)
            self.metrics.inference_seconds.observe(dt / len(x), model=model.key)
        return probs


# --- what the models directory knows, published once at start (and after a reload) ----------


def startup_events(modelset: ModelSet, bench_file: Path | None = None) -> list[Event]:
    """model_metric per listed model (opened or not: ``--run`` limits what is scored, not what
    the deck's bars show), attack_profile envelopes, model_perf from bench.json if present."""
    events: list[Event] = []
    # oracle first, realistic last: a deck that keys bars by model name alone ("latest
    # wins") then shows the realistic figure, the one a deployment can reach.
    for m in sorted(modelset.listed, key=lambda e: (e.threat_model == "realistic", e.model)):
        if m.metrics is None:
            continue
        acc = m.metrics.accuracy
        lo, hi = acc.ci if acc.ci is not None else (None, None)
        events.append(
            ModelMetric(model=m.model, accuracy=acc.value, ci_low=lo, ci_high=hi, threat_model=m.threat_model)
        )
    for env in modelset.manifest.envelopes:
        curve = [float(v) for v in env.curve if math.isfinite(v)]
        if curve:
            events.append(AttackProfile(name=env.name, curve=curve, shape=env.shape or None))
    bench_file = bench_file if bench_file is not None else modelset.directory / BENCH_FILE
    events.extend(bench_events(bench_file))
    return events


def bench_events(path: Path) -> list[Event]:
    """model_perf points from ``bench.json`` (``schema.artifacts.perf_events``); a missing file
    gives none, a file that does not decode gives none and a warning naming it and the field."""
    try:
        doc = read_doc(path, BenchDoc)
    except FileNotFoundError:
        return []
    except (OSError, ArtifactError) as e:
        log.warning("%s: ignored (rerun `phasewatch bench`): %s", path, e)
        return []
    return list(perf_events(doc))
