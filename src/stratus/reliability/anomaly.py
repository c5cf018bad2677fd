"""Loss anomalies: non-finite values skip the update; spikes (a z-score over a running
window) roll the run back to the last checkpoint and skip the data that caused them, as
PaLM did (it restarted about 100 steps before a spike and skipped 200-500 batches)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class SpikeDetector:
    def __init__(self, zscore: float, window: int, min_steps: int, max_spikes: int):
        self.zscore, self.min_steps, self.max_spikes = zscore, min_steps, max_spikes
        self.window: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.skipped_nonfinite = 0

    def is_spike(self, loss: float) -> bool:
        """Judge a finite loss against the window; a normal loss joins the window, a spike
        does not (it would inflate the spread the next judgement uses)."""
        if len(self.window) >= self.min_steps:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            if loss > mean + self.zscore * max(std, 1e-3 * abs(mean), 1e-8):
                self.spikes += 1
                return True
        self.window.append(loss)
        return False

    @property
    def too_many(self) -> bool:
        return self.spikes >= self.max_spikes

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "spikes": self.spikes,
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(state.get("window", []))
        self.spikes = int(state.get("spikes", 0))
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
