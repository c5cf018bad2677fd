"""The straggler check: every straggler_interval steps, one rank-local probe is timed
between two barriers, so a rank's time is its own work and the barrier at the end absorbs
the others' idling. A rank slower than the median by the threshold is named."""

from __future__ import annotations

import logging
import socket
import statistics
import time

import torch.distributed as dist

from stratus.data.loader import rank_micro_batches
from stratus.reliability.faults import FaultInjector

log = logging.getLogger("stratus.reliability")


class StragglerCheck:
    def __init__(self, job, faults: FaultInjector):
        self.job, self.faults = job, faults
        self.work_times: list[float] = []  # this rank's own compute per step, before injected delays

    def due(self, step: int) -> bool:
        interval = self.job.cfg.reliability.straggler_interval
        return self.job.env.distributed and bool(interval) and step % interval == 0

    def step_done(self, work_s: float) -> None:
        self.work_times.append(work_s)
        del self.work_times[:-10]
        self.faults.slow_down(work_s)

    def run(self, samples_seen: int) -> dict:
        job, rc = self.job, self.job.cfg.reliability
        dist.barrier()
        started = time.perf_counter()
        self._probe(samples_seen)
        mine = (time.perf_counter() - started, socket.gethostname())
        times: list = [None] * job.env.world_size
        dist.all_gather_object(times, mine)
        dist.barrier()
        median = statistics.median(t for t, _ in times)
        slow = [
            {"rank": r, "host": h, "seconds": round(t, 4), "vs_median": round(t / median - 1, 3)}
            for r, (t, h) in enumerate(times)
            if t >= median * (1 + rc.straggler_threshold)
        ]
        for s in slow:
            log.warning(
                "straggler: rank %d on %s took %.3fs, %.0f%% above the median %.3fs",
                s["rank"],
                s["host"],
                s["seconds"],
                100 * s["vs_median"],
                median,
            )
        return {"stragglers": slow} if slow else {}

    def _probe(self, samples_seen: int) -> None:
        """The rank-local part of a step: the batch reading of the next step and any injected
        slowness (collectives would hide the difference)."""
        job = self.job
        for first, count in rank_micro_batches(
            samples_seen, job.global_batch, job.cfg.train.micro_batch, job.dp_rank, job.layout.dp
        ):
            job.sampler.batch(first, count)
        self.faults.slow_down(statistics.median(self.work_times) if self.work_times else 0.0)
