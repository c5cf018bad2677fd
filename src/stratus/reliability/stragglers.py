"""Stragglers: each rank times its own compute of every step (the forward and backward
passes), and on a logged step at least straggler_interval steps after the last check the
ranks gather their mean time per step and name a rank that stands out from its peers.

What "own compute" means, by device:
- CPU: the main thread's time on a CPU plus its time waiting for one (runnable, not
  scheduled), from /proc/thread-self/schedstat. Time blocked in a collective, waiting on a
  slower peer, counts for neither, so the peers that wait are not blamed. A rank that shares
  its cores with other work, or runs on slower ones, takes longer. Where schedstat is
  missing, the thread's CPU time stands in (it does not see contention).
- CUDA: events around the passes on the compute stream, read on the check step only (one
  sync there). This is GPU time, and it includes the stream's waits on collectives that
  FSDP overlaps, so a peer that waits on a slow rank shows part of that rank's delay.

A rank is named when its time is straggler_threshold above the median of all ranks and,
with 4 or more ranks, its robust z-score (against the median absolute deviation) is at
least straggler_zscore. With 2 or 3 ranks a z-score says nothing, so the ratio alone decides.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stratus.reliability.faults import FaultInjector

log = logging.getLogger("stratus.reliability")
SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _cpu_clock() -> float:
    """Seconds this thread ran or was ready to run."""
    try:
        on_cpu, waiting, _ = SCHEDSTAT.read_text().split()
        return (int(on_cpu) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class ComputeClock:
    """This rank's compute time over a window of steps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds, self.steps = 0.0, 0
        self._events: list = []

    @contextlib.contextmanager
    def timing(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = _cpu_clock()
            yield
            self.seconds += _cpu_clock() - began
        self.steps += 1

    def take(self) -> float | None:
        """Mean seconds per step since the last take (None if no step ran), and a new window."""
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events.clear()
        mean = self.seconds / self.steps if self.steps else None
        self.seconds, self.steps = 0.0, 0
        return mean


def outliers(times: list[float], threshold: float, zscore: float) -> list[tuple[int, float, float]]:
    """(rank, ratio to the median - 1, robust z) of each rank that stands out."""
    median = statistics.median(times)
    mad = statistics.median(abs(t - median) for t in times)
    out = []
    for rank, t in enumerate(times):
        ratio = t / median - 1 if median > 0 else 0.0
        z = (t - median) / (1.4826 * mad) if mad > 0 else (float("inf") if t > median else 0.0)
        if ratio >= threshold and (len(times) < 4 or z >= zscore):
            out.append((rank, ratio, z))
    return out


class StragglerCheck:
    def __init__(self, job, faults: FaultInjector):
        self.job, self.faults = job, faults
        self.clock = ComputeClock(job.env.device)
        self.last_check = 0

    def timing(self):
        """Around a step's passes; nothing at all where no check can ever be due (one process,
        or straggler_interval 0), so no event or clock read piles up unread."""
        if not (self.job.env.distributed and self.job.cfg.reliability.straggler_interval):
            return contextlib.nullcontext()
        return self.clock.timing()

    def step_done(self, step_seconds: float) -> None:
        self.faults.slow_down(step_seconds)  # the slow fault: a rank whose steps all take longer

    def due(self, step: int, logged: bool) -> bool:
        interval = self.job.cfg.reliability.straggler_interval
        return self.job.env.distributed and bool(interval) and logged and step - self.last_check >= interval

    def run(self, step: int) -> dict:
        """Collective, on a logged step: every rank's compute per step; the outliers named."""
        rc = self.job.cfg.reliability
        self.last_check = step
        mine = (self.clock.take() or 0.0, socket.gethostname())
        gathered: list = [None] * self.job.env.world_size
        dist.all_gather_object(gathered, mine)
        times = [t for t, _ in gathered]
        median = statistics.median(times)
        slow = []
        for rank, ratio, z in outliers(times, rc.straggler_threshold, rc.straggler_zscore):
            host = gathered[rank][1]
            slow.append(
                {"rank": rank, "host": host, "seconds": round(times[rank], 4), "vs_median": round(ratio, 3)}
            )
            log.warning(
                "straggler: rank %d on %s computes a step in %.3fs, %.0f%% above the median %.3fs%s",
                rank,
                host,
                times[rank],
                100 * ratio,
                median,
                f" (z {z:.1f})" if len(times) >= 4 else "",
            )
        record: dict = {"compute_s": [round(t, 4) for t in times]}
        if slow:
            record["stragglers"] = slow
        return record
