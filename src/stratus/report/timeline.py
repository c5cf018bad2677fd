"""A run's wall time as segments (start-up, productive, recomputed, checkpoint, down) and
the markers that explain them, rebuilt from timeline.jsonl, metrics.jsonl, restarts.jsonl,
the fault markers and the hang dumps. goodput.json keeps the exact totals (the trainer adds
every step's time); the drawing places them in time, step for step between logged lines,
so its split can differ from the totals by the steps between two logged lines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stratus.report.run import Marker, Run

# each category and the field of goodput.json that counts the same time
CATEGORIES = {
    "start-up": "startup_s",
    "productive": "productive_s",
    "recomputed": "recomputed_s",
    "checkpoint": "checkpoint_s",
    "down": "downtime_s",
}


@dataclass
class Segment:
    start: float  # seconds since the run first started
    end: float
    category: str


@dataclass
class Timeline:
    origin: float  # wall time of second 0
    segments: list[Segment]
    markers: list[Marker]  # times are seconds since origin

    def total(self, category: str) -> float:
        return sum(s.end - s.start for s in self.segments if s.category == category)


def build_timeline(run: Run) -> Timeline | None:
    origin = run.first_start
    if origin is None:
        return None
    starts = sorted(run.events("start"), key=lambda e: e["time"])
    points = sorted(
        [(r["time"], r["step"]) for r in run.metrics if "time" in r]
        + [(e["time"], e["step"]) for e in run.timeline if "time" in e],
    )
    segments: list[Segment] = []
    high_water = 0
    for i, start in enumerate(starts):
        born = float(start.get("process_start", start["time"]))
        next_born = (
            float(starts[i + 1].get("process_start", starts[i + 1]["time"])) if i + 1 < len(starts) else None
        )
        mine = [(t, s) for t, s in points if t >= start["time"] and (next_born is None or t < next_born)]
        # a life trains until its last recorded point; from there to the next start it is
        # down (hung until the watchdog fired, dead, or restarting), as goodput counts it
        end = max([start["time"], *(t for t, _ in mine)])
        segments.append(Segment(born - origin, start["time"] - origin, "start-up"))
        # steps up to the high water of earlier lives are done again: recomputed
        caught_up = start["time"]
        if start["step"] < high_water and mine:
            times, steps = zip(*[(start["time"], start["step"]), *mine], strict=True)
            steps_arr = np.maximum.accumulate(np.asarray(steps, dtype=float))
            caught_up = float(np.interp(high_water, steps_arr, times)) if steps_arr[-1] >= high_water else end
        if caught_up > start["time"]:
            segments.append(Segment(start["time"] - origin, caught_up - origin, "recomputed"))
        if end > caught_up:
            segments.append(Segment(caught_up - origin, end - origin, "productive"))
        if next_born is not None and next_born > end:
            segments.append(Segment(end - origin, next_born - origin, "down"))
        high_water = max([high_water, *(s for _, s in mine)])
    for e in run.events("checkpoint"):
        blocked = float(e.get("blocked_s", 0.0))
        if blocked > 0:
            segments.append(Segment(e["time"] - blocked - origin, e["time"] - origin, "checkpoint"))
    return Timeline(origin, segments, _markers(run, origin))


def _markers(run: Run, origin: float) -> list[Marker]:
    out = [Marker(m.time - origin, m.kind, m.label, m.step) for m in (*run.faults, *run.hangs)]
    for r in run.restarts:
        out.append(
            Marker(
                r["time"] - origin,
                "restart",
                f"restart {r.get('restart', '?')}: {r.get('failure', 'failed')}, resumed from step "
                f"{r.get('resume_step', '?')}",
                r.get("resume_step"),
            )
        )
    labels = {
        "checkpoint_saved": "checkpoint",
        "checkpoint_failed": "checkpoint failed",
        "skipped_nonfinite": "skipped (non-finite)",
        "rollback": "spike rollback",
    }
    for e in run.events(*labels):
        text = labels[e["event"]] + f" at step {e['step']}"
        if e["event"] == "rollback":
            text += f" to step {e.get('to_step', '?')}"
        out.append(Marker(e["time"] - origin, e["event"], text, e["step"]))
    return sorted(out, key=lambda m: m.time)
