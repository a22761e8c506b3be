"""The daemon's scoring loop: ready windows in, events out (``edge.daemon.Daemon`` runs it).

Each tick's ready windows are extracted and scored by the primary at once (the timeline's
latency); the other models and the projector then run on the windows of several ticks
together (``REST_WINDOWS`` or ``REST_S``, whichever comes first): fewer, larger session runs
and thread hops for events nobody waits on.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import trio

from edge.broadcast import Broadcaster
from edge.infer import Batch, Engine
from edge.tail import WindowJob

log = logging.getLogger("edge.daemon")

# The non-primary models and the projector run on this many windows or on what this many
# seconds brought, whichever comes first (their events are not what the timeline waits for).
REST_WINDOWS: Final = 8
REST_S: Final = 0.25


class ScoringLoop:
    """What the loop reads of the daemon."""

    engine: Engine | None
    broadcaster: Broadcaster
    latency: Any  # edge.metrics histogram
    all_predictions: bool
    max_batch: int
    _limiter: trio.CapacityLimiter
    _jobs_rx: trio.MemoryReceiveChannel[WindowJob]

    async def _infer_loop(self) -> None:
        rest: list[Batch] = []
        rest_engine: Engine | None = None
        since = 0.0
        while True:
            job: WindowJob | None = None
            with trio.move_on_at(since + REST_S if rest else math.inf):
                job = await self._jobs_rx.receive()
            engine = self.engine
            if rest and (job is None or engine is not rest_engine):
                await self._score_rest(rest_engine, rest)
                rest = []
            if job is None or engine is None:
                continue
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._jobs_rx.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                # the timeline's events first (one model); the others and the projector later
                batch = await trio.to_thread.run_sync(engine.score_primary, jobs, limiter=self._limiter)
            except Exception:  # one bad batch must not end the live view
                log.exception("scoring %d windows failed", len(jobs))
                continue
            now = trio.current_time()
            for s in batch.scored:
                self.broadcaster.publish_many(s.events)
                self.latency.observe(max(0.0, now - s.job.ready_at))
            if not rest:
                since = now
            rest.append(batch)
            rest_engine = engine
            if sum(len(b.scored) for b in rest) >= REST_WINDOWS or now - since >= REST_S:
                await self._score_rest(engine, rest)
                rest = []

    async def _score_rest(self, engine: Engine | None, batches: list[Batch]) -> None:
        if engine is None:
            return
        batch = Batch.merge(batches)
        try:
            await trio.to_thread.run_sync(engine.score_rest, batch, limiter=self._limiter)
        except Exception:
            log.exception("scoring %d windows failed", len(batch.scored))
            return
        for s in batch.scored:
            self.broadcaster.publish_many(s.late)
            if self.all_predictions:
                self.broadcaster.publish_many(s.others)
