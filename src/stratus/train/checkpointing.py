"""The trainer's checkpointer: it decides when a save is due (the policy of each tier), holds
the save in flight (async), commits it, and restores from the newest tier that survives.
Save-path faults are injected here, and every unit of progress in a save or a verification
(a file checksummed) beats the watchdog at the checkpoint limit. (The verification at
start-up runs under the start-up limit.)"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from stratus.checkpoint.local import newest_of_tiers
from stratus.checkpoint.manager import Loaded, PendingSave, SaveError
from stratus.checkpoint.policy import CheckpointPolicy
from stratus.distributed import env as denv
from stratus.errors import RunStopped
from stratus.reliability.faults import FaultInjector
from stratus.reliability.goodput import Goodput
from stratus.reliability.watchdog import Watchdog
from stratus.train.metrics import MetricsWriter
from stratus.train.setup import Job

log = logging.getLogger("stratus.train")


class Checkpointer:
    def __init__(
        self, job: Job, faults: FaultInjector, watchdog: Watchdog, goodput: Goodput, metrics: MetricsWriter
    ):
        self.job, self.faults, self.watchdog, self.goodput, self.metrics = (
            job,
            faults,
            watchdog,
            goodput,
            metrics,
        )
        cfg = job.cfg
        self.policy, self.local_policy = CheckpointPolicy.tiers(cfg.checkpoint, cfg.reliability.mtbf_hours)
        self.local_only = False  # what due() decided: a node-local save, no global one
        self.pending: PendingSave | None = None
        self.limit_s = job.cfg.reliability.checkpoint_timeout_s
        self.meta = {"config_hash": job.cfg.hash(), "model": job.cfg.model.model_dump()}

        def progress() -> None:  # a save or a restore moved on: it may take limit_s more
            faults.slow_save()
            watchdog.beat(limit_s=self.limit_s)

        job.ckpt.progress = progress

    def due(self, step: int, logged: bool) -> bool:
        """Whether a save of either tier is due at this step (a global one supersedes a local one)."""
        global_due = self._due(self.policy, step, logged)
        local_due = self.local_policy is not None and self._due(self.local_policy, step, logged)
        self.local_only = local_due and not global_due
        return global_due or local_due

    def _due(self, policy: CheckpointPolicy, step: int, logged: bool) -> bool:
        if policy.interval_s() is not None:
            # A time interval: one clock decides for every rank, asked on logged steps only
            # (a broadcast every step would stall each one).
            return logged and denv.broadcast_object(self.job.env, policy.due(step))
        return policy.due(step)  # a step rule, the same on every rank

    def maybe_save(self, step: int, state: dict, due: bool, final: bool, loss: float | None) -> float:
        """Save if `due` (what due() said of this step; always at the end of the run).
        Returns the seconds the loop blocked."""
        job = self.job
        if self.pending is not None and job.ckpt.all_written(self.pending):
            self.finish_pending(loss)
        if not (due or final):
            return 0.0
        if self.local_only and not final:
            return self._save_local(step, state, loss)
        started = time.perf_counter()
        self.finish_pending(loss)  # at most one save in flight
        self.watchdog.beat(limit_s=self.limit_s)
        asynchronous = job.cfg.checkpoint.async_save and not final
        try:
            self.pending = job.ckpt.start(step, job.model, job.optimizer, state, self.meta, asynchronous)
            if not asynchronous:
                self.finish_pending(loss)
        except SaveError as e:
            self._failed(e, step, loss)
        blocked = time.perf_counter() - started
        self.policy.saved(blocked)
        self.goodput.checkpoint(blocked)
        self.metrics.event(
            "checkpoint",
            step,
            blocked_s=round(blocked, 3),
            background=self.pending is not None,
            tier="global",
        )
        log.info(
            "checkpoint of step %d: the loop blocked %.2fs%s",
            step,
            blocked,
            " (writing in the background)" if self.pending is not None else "",
        )
        return blocked

    def _save_local(self, step: int, state: dict, loss: float | None) -> float:
        """A node-local save: synchronous (it is a local write and one transfer to a peer)."""
        job, started = self.job, time.perf_counter()
        self.watchdog.beat(limit_s=self.limit_s)
        try:
            job.local.save(step, job.model, job.optimizer, state)
        except OSError as e:
            self._failed(SaveError(str(e)), step, loss)
        blocked = time.perf_counter() - started
        self.local_policy.saved(blocked)
        self.goodput.checkpoint(blocked)
        self.metrics.event("checkpoint", step, blocked_s=round(blocked, 3), tier="local")
        log.info("node-local checkpoint of step %d: the loop blocked %.2fs", step, blocked)
        return blocked

    def finish_pending(self, loss: float | None = None) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        crash = self.faults.due("crash_during_save", pending.step)
        hang = self.faults.due("hang_during_save", pending.step)
        self.watchdog.beat(limit_s=self.limit_s)
        try:
            path = self.job.ckpt.finish(pending, before_commit=_die if crash else _hang if hang else None)
        except SaveError as e:
            self._failed(e, pending.step, loss)
            return
        log.info("saved checkpoint %s", path)
        self.metrics.event("checkpoint_saved", pending.step)
        if self.faults.due("corrupt_checkpoint", pending.step):
            _flip_a_byte(path)

    def newest(self, loss: float | None) -> tuple[int, Path] | None:
        """Collective: the newest verified checkpoint of either tier, once nothing is in flight."""
        self.finish_pending(loss)
        return newest_of_tiers(self.job.ckpt, self.job.local)

    def load(self, path: Path) -> Loaded:
        """Restore from a checkpoint of either tier; local steps after it are dropped."""
        job = self.job
        if job.local is not None and job.local.holds(path):
            loaded = job.local.load(path, job.model, job.optimizer)
        else:
            loaded = job.ckpt.load(path, job.model, job.optimizer)
        if job.local is not None:
            job.local.forget_after(loaded.step)
        return loaded

    def _failed(self, error: SaveError, step: int, loss: float | None) -> None:
        self.metrics.write(step, {"loss": loss, "checkpoint_failed": str(error)})
        self.metrics.event("checkpoint_failed", step, error=str(error))
        if self.job.cfg.checkpoint.on_failure == "stop":
            raise RunStopped(f"{error}; checkpoint.on_failure is stop") from None
        log.error("%s; training goes on (checkpoint.on_failure = continue)", error)


def _die(_tmp: Path) -> None:
    """crash_during_save: the shards are written, the manifest is not."""
    os.kill(os.getpid(), 9)


def _hang(_tmp: Path) -> None:
    """hang_during_save: the shards are written and the commit never comes."""
    while True:
        time.sleep(3600)


def _flip_a_byte(checkpoint: Path) -> None:
    """corrupt_checkpoint: damage a complete checkpoint the way bit rot or a bad disk would."""
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
