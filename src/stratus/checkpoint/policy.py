"""When to checkpoint: every N steps, every M minutes, or at the Young/Daly interval
sqrt(2 x save cost x MTBF), which minimizes the expected time lost to saves plus the work
redone after failures, from the measured cost of a save."""

from __future__ import annotations

import math
import time

from stratus.config import CheckpointConfig


def young_daly_interval_s(save_cost_s: float, mtbf_s: float) -> float:
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


class CheckpointPolicy:
    def __init__(self, cfg: CheckpointConfig, mtbf_hours: float):
        self.cfg, self.mtbf_s = cfg, mtbf_hours * 3600.0
        self.last_save = time.monotonic()
        self.save_cost_s: float | None = None

    @property
    def time_based(self) -> bool:
        """Time-based decisions differ between ranks' clocks; rank 0's is broadcast."""
        return self.cfg.every != "steps"

    def interval_s(self) -> float | None:
        if self.cfg.every == "minutes":
            return self.cfg.minutes * 60.0
        if self.cfg.every == "auto" and self.save_cost_s is not None:
            return young_daly_interval_s(self.save_cost_s, self.mtbf_s)
        return None

    def due(self, step: int) -> bool:
        """Before a save has been measured, `auto` uses checkpoint.interval steps."""
        interval = self.interval_s()
        if interval is not None:
            return time.monotonic() - self.last_save >= interval
        return bool(self.cfg.interval) and step % self.cfg.interval == 0

    def saved(self, blocking_s: float) -> None:
        self.last_save = time.monotonic()
        self.save_cost_s = blocking_s if self.save_cost_s is None else 0.5 * (self.save_cost_s + blocking_s)
