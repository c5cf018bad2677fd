"""A per-rank hang watchdog: when no step finishes within the timeout, every thread's stack
goes to RUN/hangs/ and the process exits, so the job restarts instead of idling until
NCCL's own (much longer) timeout. A stopped process (SIGSTOP) cannot run its own watchdog;
the other ranks' watchdogs, or the supervisor's heartbeat check, catch that case."""

from __future__ import annotations

import contextlib
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

    def start(self, limit_s: float | None = None) -> Watchdog:
        """Watch from now; the first progress must come within limit_s (start-up takes longer
        than a step: a busy machine, a large checkpoint to restore)."""
        hangs = self.run_dir / "hangs"
        hangs.mkdir(parents=True, exist_ok=True)
        for stale in hangs.glob(f"native-rank{self.rank}-*.txt"):  # left empty by a killed process
            if stale.stat().st_size == 0:
                stale.unlink()
        self._native_path = hangs / f"native-rank{self.rank}-{os.getpid()}.txt"
        self._native = open(self._native_path, "w")  # noqa: SIM115 - held for faulthandler until stop()
        self._arm(limit_s)  # no heartbeat yet: a supervisor watches it only once steps have begun
        self._thread.start()
        return self

    def beat(self, limit_s: float | None = None) -> None:
        """Progress was made (a step, an evaluation, a checkpoint); the next must come within
        limit_s, by default the hang timeout."""
        self._arm(limit_s)
        if self.heartbeat_file is not None:  # for a supervisor watching from outside
            self.heartbeat_file.touch()

    def _arm(self, limit_s: float | None) -> None:
        self._limit = max(self.timeout_s, limit_s or 0)
        self._last = time.monotonic()
        faulthandler.dump_traceback_later(1.5 * self._limit + 5, exit=True, file=self._native)

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        self._native.close()
        if self._native_path.stat().st_size == 0:  # nothing hung: leave no empty file behind
            self._native_path.unlink()
            with contextlib.suppress(OSError):
                self._native_path.parent.rmdir()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self._limit:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        hangs = self.run_dir / "hangs"
        hangs.mkdir(parents=True, exist_ok=True)
        path = hangs / f"rank{self.rank}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        with open(path, "w") as f:
            f.write(
                f"rank {self.rank}: no progress for {idle:.0f}s (limit {self._limit:g}s, "
                f"reliability.hang_timeout_s = {self.timeout_s:g}); stacks of every thread:\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error(
            "hang: no step finished for %.0fs; stacks dumped to %s; exiting so the job restarts", idle, path
        )
        for h in logging.getLogger("stratus").handlers:
            h.flush()
        self._native.close()
        self._native_path.unlink()  # this dump says it all; the native backstop never fired
        os._exit(EXIT_HANG)
