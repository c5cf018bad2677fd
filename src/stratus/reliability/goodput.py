"""Where a run's wall time went, across restarts: productive steps (each step counted once),
recomputed steps (lost work done again after a restart or rollback), checkpoint stalls,
start-up, and downtime between a failure and the next start. ETTR, the effective training
time ratio, is productive time over wall time since the run first started."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from stratus.atomic import write_atomic

FIELDS = ("productive_s", "recomputed_s", "checkpoint_s", "startup_s", "downtime_s")


def process_start_time() -> float:
    """When this process started (Linux /proc), so interpreter and import time count as start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # finer than /proc/stat's btime
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Goodput:
    def __init__(self, run_dir: Path, enabled: bool, started: float | None = None):
        self.path, self.enabled = run_dir / "goodput.json", enabled
        self.started = started or process_start_time()
        self.state: dict[str, Any] = {
            "first_start": self.started,
            "high_water": 0,
            "restarts": 0,
            **dict.fromkeys(FIELDS, 0.0),
        }
        if self.path.is_file():
            try:
                previous = json.loads(self.path.read_text())
            except ValueError:
                previous = None  # a torn file costs the history, never the run
            if previous:
                self.state.update(previous)
                self.state["restarts"] += 1
                self.state["downtime_s"] += max(0.0, self.started - previous["last_update"])
        self._training_started = False

    def training_started(self) -> None:
        if not self._training_started:
            self._training_started = True
            self.state["startup_s"] += time.time() - self.started

    def step(self, step: int, seconds: float) -> None:
        if step > self.state["high_water"]:
            self.state["productive_s"] += seconds
            self.state["high_water"] = step
        else:
            self.state["recomputed_s"] += seconds

    def checkpoint(self, seconds: float) -> None:
        self.state["checkpoint_s"] += seconds

    def summary(self) -> dict[str, Any]:
        wall = max(1e-9, time.time() - self.state["first_start"])
        out = {k: round(self.state[k], 3) for k in FIELDS}
        return {
            "wall_s": round(wall, 3),
            **out,
            "restarts": self.state["restarts"],
            "ettr": round(self.state["productive_s"] / wall, 4),
        }

    def save(self, force: bool = True) -> None:
        """No fsync; unforced, at most once a second (the loop asks every step), so a lost
        update costs about a second of history."""
        if not self.enabled or (not force and time.time() - self.state.get("last_update", 0) < 1.0):
            return
        self.state["last_update"] = time.time()
        write_atomic(self.path, json.dumps(self.state), fsync=False)
