"""Read what a run directory holds, as it is: metrics.jsonl, timeline.jsonl, goodput.json,
restarts.jsonl, the fault markers, hang dumps and config.toml. A run killed mid-line, or one
that never got as far as some file, gives what exists and a named gap for the rest."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratus.errors import StratusError

FILES = ("metrics.jsonl", "timeline.jsonl", "goodput.json", "restarts.jsonl", "config.toml")


@dataclass
class Marker:
    """Something that happened at a wall time: a fault, a restart, a hang dump, a checkpoint."""

    time: float
    kind: str
    label: str
    step: int | None = None


@dataclass
class Run:
    path: Path
    label: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    goodput: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    faults: list[Marker] = field(default_factory=list)
    hangs: list[Marker] = field(default_factory=list)
    chat_evals: list[dict[str, Any]] = field(default_factory=list)  # `stratus eval --chat RUN`
    gaps: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, where the lines have it. A step logged twice (done
        again after a restart or a rollback) keeps its last value: the curve is the run's
        trajectory as it stands."""
        last = {r["step"]: float(r[key]) for r in self.trajectory() if _number(r.get(key))}
        return list(last), list(last.values())

    def trajectory(self) -> list[dict[str, Any]]:
        """metrics.jsonl by step, the last line of each step winning; spike lines (the loss
        that was rolled back) left out."""
        last = {r["step"]: r for r in self.metrics if not r.get("spike")}
        return [last[s] for s in sorted(last)]

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.timeline if e.get("event") in kinds]

    @property
    def start(self) -> dict[str, Any]:
        """The newest start event: what the run last ran on."""
        starts = self.events("start")
        return starts[-1] if starts else {}

    @property
    def ettr(self) -> float | None:
        """Productive time over wall time, as goodput.json last recorded them."""
        g = self.goodput
        wall = g.get("last_update", 0) - g.get("first_start", 0)
        return g.get("productive_s", 0) / wall if wall > 0 else None

    @property
    def first_start(self) -> float | None:
        if self.goodput.get("first_start"):
            return float(self.goodput["first_start"])
        starts = self.events("start")
        times = [s.get("process_start", s["time"]) for s in starts] + [
            r["time"] for r in self.metrics if "time" in r
        ]
        return min(times) if times else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_run(path: Path, label: str | None = None) -> Run:
    if not path.is_dir():
        raise StratusError(
            f"run directory {path} does not exist: give the run.dir of a run (such as runs/demo)"
        )
    if not any((path / name).exists() for name in FILES):
        raise StratusError(
            f"{path} is not a run directory: it has none of {', '.join(FILES)}; give the run.dir of a run"
        )
    run = Run(path, label or path.name)
    run.metrics = _jsonl(path / "metrics.jsonl", run.gaps, "no step was logged")
    run.timeline = _jsonl(path / "timeline.jsonl", run.gaps, "starts and checkpoints are not on the timeline")
    run.restarts = _jsonl(path / "restarts.jsonl", run.gaps, None)  # absent: the run never failed
    run.chat_evals = _jsonl(path / "chat_eval.jsonl", run.gaps, None)  # absent: never evaluated
    run.goodput = _json(path / "goodput.json", run.gaps)
    try:
        run.config_text = (path / "config.toml").read_text(encoding="utf-8")
    except OSError:
        run.gaps.append("config.toml is missing: the resolved config is not shown")
    run.faults = _fault_markers(path / "faults")
    run.hangs = _hang_markers(path / "hangs")
    return run


def parse_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int], int]:
    """A run's JSON-lines file: the objects that parse, the numbers of the lines that do not
    (a last one is a line cut by a kill), and the number of lines."""
    rows, bad = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad, len(lines)


def _jsonl(path: Path, gaps: list[str], missing: str | None) -> list[dict[str, Any]]:
    """The lines that parse; a gap for the rest, and for a missing file that should be there."""
    if not path.is_file():
        if missing is not None:
            gaps.append(f"{path.name} is missing: {missing}")
        return []
    rows, bad, lines = parse_jsonl(path)
    if bad:
        last = bad[-1] == lines
        where = f"line {bad[0]}" if len(bad) == 1 else f"{len(bad)} lines (first: line {bad[0]})"
        why = "cut off (the run was killed while writing it)" if last and len(bad) == 1 else "not JSON"
        gaps.append(f"{path.name}: {where} of {lines} {'is' if len(bad) == 1 else 'are'} {why}; left out")
    return rows


def _json(path: Path, gaps: list[str]) -> dict[str, Any]:
    if not path.is_file():
        gaps.append(f"{path.name} is missing: the wall-time split and ETTR are unknown")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        gaps.append(f"{path.name} is torn (not JSON): the wall-time split and ETTR are unknown")
        return {}
    return value if isinstance(value, dict) else {}


def _fault_markers(folder: Path) -> list[Marker]:
    """RUN/faults/<kind>-step<N>-rank<R>-<n>: each holds the wall time it fired."""
    out = []
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        m = re.fullmatch(r"(\w+)-(step(\d+)|always)-rank(\d+)-\d+", p.name)
        if not m:
            continue
        try:
            fired = float(p.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            fired = p.stat().st_mtime
        step = int(m.group(3)) if m.group(3) else None
        where = f" at step {step}" if step is not None else ""
        out.append(Marker(fired, "fault", f"{m.group(1)}{where} (rank {m.group(4)})", step))
    return sorted(out, key=lambda k: k.time)


def _hang_markers(folder: Path) -> list[Marker]:
    """RUN/hangs/rank<R>-<YYYYmmddTHHMMSS>.txt: the watchdog's stack dumps, written once at
    the moment of the dump (its modification time is the finer clock)."""
    out = []
    for p in sorted(folder.glob("rank*-*.txt")) if folder.is_dir() else []:
        m = re.fullmatch(r"rank(\d+)-\d{8}T\d{6}\.txt", p.name)
        if m:
            out.append(Marker(p.stat().st_mtime, "hang", f"hang dump, rank {m.group(1)}"))
    return sorted(out, key=lambda k: k.time)
