"""Logging for a run: train.log in the run directory and the console, every line tagged with
its rank; a rich progress bar with ETA on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def use_rich(mode: str) -> bool:
    return mode == "rich" or (mode == "auto" and sys.stdout.isatty())


def setup_logging(run_dir: Path | None, rank: int, rich: bool) -> Console:
    console = Console()
    root = logging.getLogger("stratus")
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    tag = f"[rank{rank}] "
    if rich and rank == 0:
        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter(tag + "%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(tag + "%(message)s"))
    if rank != 0:
        handler.setLevel(logging.WARNING)  # one voice on the console; every rank in its log
    root.addHandler(handler)
    if run_dir is not None:
        name = "train.log" if rank == 0 else f"train.rank{rank}.log"
        fh = logging.FileHandler(run_dir / name, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s " + tag + "%(levelname)s %(message)s"))
        root.addHandler(fh)
    return console


class StepProgress:
    """A progress bar over optimizer steps (rich), or nothing when lines are plain."""

    def __init__(self, console: Console, enabled: bool, start: int, total: int):
        self._bar = None
        if enabled:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("", total=total, completed=start)
            self._bar.start()

    def update(self, step: int, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
