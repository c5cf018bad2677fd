"""A per-rank hang watchdog: when no step finishes within the timeout, every thread's stack
goes to RUN/hangs/ and the process exits, so the job restarts instead of idling until
NCCL's own (much longer) timeout. A stopped process (SIGSTOP) cannot run its own watchdog;
the other ranks' watchdogs, or the supervisor's heartbeat check, catch that case."""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from pathlib import Path

from stratus.reliability import EXIT_HANG

log = logging.getLogger("stratus.reliability")


class Watchdog:
    def __init__(self, timeout_s: float, run_dir: Path, rank: int, heartbeat_file: Path | None = None):
        self.timeout_s, self.run_dir, self.rank = timeout_s, run_dir, rank
        self.heartbeat_file = heartbeat_file
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stratus-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Progress was made (a step, an evaluation, a checkpoint)."""
        self._last = time.monotonic()
        if self.heartbeat_file is not None:  # for a supervisor watching from outside
            self.heartbeat_file.touch()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        hangs = self.run_dir / "hangs"
        hangs.mkdir(parents=True, exist_ok=True)
        path = hangs / f"rank{self.rank}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        with open(path, "w") as f:
            f.write(
                f"rank {self.rank}: no progress for {idle:.0f}s (reliability.hang_timeout_s = "
                f"{self.timeout_s:g}); stacks of every thread:\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error(
            "hang: no step finished for %.0fs; stacks dumped to %s; exiting so the job restarts", idle, path
        )
        for h in logging.getLogger("stratus").handlers:
            h.flush()
        os._exit(EXIT_HANG)
