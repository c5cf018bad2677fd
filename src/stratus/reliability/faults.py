"""Fault injection, for tests and for rehearsing a run: `kind@key=value:key=value`, several
separated by commas, from `reliability.faults` and the STRATUS_FAULTS variable.

    kill@step=37:rank=1          SIGKILL the rank at the start of step 37
    hang@step=50                 stop making progress at step 50 (the watchdog must catch it)
    nan@step=20                  make step 20's loss NaN on the rank
    spike@step=30:factor=50      report step 30's loss multiplied by factor to the spike detector
    slow@rank=0:factor=2         make every step of the rank take factor times as long
    crash_during_save@step=40    die half-way through writing the checkpoint of step 40
    corrupt_checkpoint@step=60   flip a byte of the checkpoint of step 60 once it is complete
    hang_during_save@step=40     stop for good with the checkpoint of step 40 written, not committed
    slow_save@factor=3           take factor seconds more at each step of every save and verification

A fault without rank= hits rank 0. Each fires once per run (times=N: up to N times, to
rehearse a crash loop): before firing, the rank creates RUN/faults/<spec>-<n> exclusively, so
a restarted worker finds it and does not fire again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stratus.errors import StratusError

if TYPE_CHECKING:
    import torch

KINDS = {
    "kill",
    "hang",
    "nan",
    "spike",
    "slow",
    "crash_during_save",
    "corrupt_checkpoint",
    "hang_during_save",
    "slow_save",
}
NEEDS_STEP = KINDS - {"slow", "slow_save"}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None = None
    rank: int = 0
    factor: float = 1.0
    times: int = 1

    @property
    def name(self) -> str:
        """A file name that identifies the fault within the run."""
        step = f"step{self.step}" if self.step is not None else "always"
        return f"{self.kind}-{step}-rank{self.rank}"


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, _, args = spec.partition("@")
        if kind not in KINDS:
            raise StratusError(f"fault {spec!r}: unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        values: dict[str, str] = {}
        for part in filter(None, args.split(":")):
            key, eq, value = part.partition("=")
            if not eq or key not in ("step", "rank", "factor", "times"):
                raise StratusError(f"fault {spec!r}: {part!r} is not step=N, rank=N, factor=X or times=N")
            values[key] = value
        try:
            fault = Fault(
                kind,
                int(values["step"]) if "step" in values else None,
                int(values.get("rank", 0)),
                float(values.get("factor", 50.0 if kind == "spike" else 2.0 if kind == "slow" else 1.0)),
                int(values.get("times", 1)),
            )
        except ValueError:
            raise StratusError(f"fault {spec!r}: step and rank are integers, factor a number") from None
        if kind in NEEDS_STEP and fault.step is None:
            raise StratusError(f"fault {spec!r}: {kind} needs step=N")
        faults.append(fault)
    return faults


class FaultInjector:
    """The faults aimed at this rank, each fired at most once per run."""

    def __init__(self, faults: list[Fault], rank: int, run_dir: Path):
        # every rank parses the same list, so every rank knows whether any spike is planned
        self.any_spike = any(f.kind == "spike" for f in faults)
        self.faults = [f for f in faults if f.rank == rank]
        self.dir = run_dir / "faults"
        self.slow_factor, self.save_delay_s = 1.0, 0.0
        for f in self.faults:
            if f.kind == "slow" and self._claim(f):
                self.slow_factor = f.factor
            if f.kind == "slow_save" and self._claim(f):
                self.save_delay_s = f.factor

    def _claim(self, fault: Fault) -> bool:
        """True at most fault.times per run: each firing creates its marker file exclusively."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for n in range(1, fault.times + 1):
            try:
                fd = os.open(self.dir / f"{fault.name}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"{time.time()}\n".encode())
            os.fsync(fd)
            os.close(fd)
            return True
        return False

    def due(self, kind: str, step: int) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and f.step == step and self._claim(f):
                return f
        return None

    def poison(self, step: int) -> bool:
        """nan: this rank's loss of the step becomes NaN."""
        return self.due("nan", step) is not None

    def reported_loss(self, step: int, loss: torch.Tensor, all_reduce_max) -> torch.Tensor:
        """spike: the loss the detector sees (a device tensor), multiplied on the rank it
        targets and then seen by every rank (one extra collective, only in runs that plan a
        spike)."""
        spike = self.due("spike", step)
        if spike is not None:
            loss = loss * spike.factor
        return all_reduce_max(loss) if self.any_spike else loss

    def at_step_start(self, step: int) -> None:
        """kill and hang act on the process itself."""
        if self.due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.due("hang", step):
            while True:  # a rank stuck for good, as in a deadlocked collective
                time.sleep(3600)

    def slow_save(self) -> None:
        """slow_save: a storage system that takes this long for every file."""
        if self.save_delay_s:
            time.sleep(self.save_delay_s)

    def slow_down(self, step_seconds: float) -> None:
        if self.slow_factor > 1.0:
            time.sleep(step_seconds * (self.slow_factor - 1.0))


def configured_faults(config_text: str) -> list[Fault]:
    return parse_faults(",".join(filter(None, [config_text, os.environ.get("STRATUS_FAULTS", "")])))
