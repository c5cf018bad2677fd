"""When to checkpoint: every N steps, every M minutes, or at the Young/Daly interval
sqrt(2 x save cost x MTBF), which minimizes the expected time lost to saves plus the work
redone after failures, from the measured cost of a save. Each tier (the global DCP
checkpoints, the node-local ones) has a policy of its own, from its own measured cost."""

from __future__ import annotations

import time
from typing import Literal

from stratus.config import CheckpointConfig
from stratus.plan.reliability import young_interval


class CheckpointPolicy:
    def __init__(
        self, every: Literal["steps", "minutes", "auto"], interval: int, minutes: float, mtbf_s: float
    ):
        self.every, self.interval, self.minutes, self.mtbf_s = every, interval, minutes, mtbf_s
        self.last_save = time.monotonic()
        self.save_cost_s: float | None = None

    @classmethod
    def tiers(
        cls, cfg: CheckpointConfig, mtbf_hours: float
    ) -> tuple[CheckpointPolicy, CheckpointPolicy | None]:
        """The global tier's policy, and the node-local tier's (None without one). With a local
        tier under `auto`, the local interval answers every failure, and the global one only
        the share the local tier cannot recover (1 - local_covers): a longer MTBF."""
        mtbf_s = mtbf_hours * 3600.0
        if not cfg.local_dir:
            return cls(cfg.every, cfg.interval, cfg.minutes, mtbf_s), None
        local_every = "auto" if cfg.every == "auto" else "steps"
        return (
            cls(cfg.every, cfg.interval, cfg.minutes, mtbf_s / (1.0 - cfg.local_covers)),
            cls(local_every, cfg.local_interval, cfg.minutes, mtbf_s),
        )

    @property
    def time_based(self) -> bool:
        """Time-based decisions differ between ranks' clocks; rank 0's is broadcast."""
        return self.every != "steps"

    def interval_s(self) -> float | None:
        if self.every == "minutes":
            return self.minutes * 60.0
        if self.every == "auto" and self.save_cost_s is not None:
            return young_interval(self.save_cost_s, self.mtbf_s)
        return None

    def due(self, step: int) -> bool:
        """Before a save has been measured, `auto` uses the step interval."""
        interval = self.interval_s()
        if interval is not None:
            return time.monotonic() - self.last_save >= interval
        return bool(self.interval) and step % self.interval == 0

    def saved(self, blocking_s: float) -> None:
        self.last_save = time.monotonic()
        self.save_cost_s = blocking_s if self.save_cost_s is None else 0.5 * (self.save_cost_s + blocking_s)
