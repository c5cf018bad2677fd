"""`stratus train`: the training loop. Runs as one process or as every rank under torchrun.

One optimizer step = global_batch sequences: each data-parallel rank runs
global_batch / (micro_batch x ranks) micro batches, accumulating gradients, then clip,
AdamW, schedule. The batch a rank reads is a pure function of the data position (global
samples seen), so resuming from a checkpoint continues the exact sample sequence.

Every step the ranks agree on the loss (one all-reduce, no host sync): a non-finite loss or
gradient norm skips the update on the device, everywhere. The host reads the steps' numbers
only on logged steps and before a checkpoint, all at once: a spike found there rolls back
to the last checkpoint (always one from before the spike) and skips the data that caused
it. A watchdog thread ends a rank that stops making progress; faults can be injected to
rehearse all of this.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stratus.config import Config
from stratus.data.loader import rank_micro_batches
from stratus.distributed import env as denv
from stratus.distributed.layout import resolve_layout
from stratus.errors import RunStopped
from stratus.reliability.anomaly import SpikeDetector
from stratus.reliability.faults import FaultInjector, configured_faults
from stratus.reliability.goodput import Goodput
from stratus.reliability.stragglers import StragglerCheck
from stratus.reliability.watchdog import Watchdog
from stratus.train.checkpointing import Checkpointer
from stratus.train.console import StepProgress
from stratus.train.evaluate import Validator
from stratus.train.metrics import MetricsWriter, Throughput, run_facts
from stratus.train.readings import Reading, Unread
from stratus.train.setup import Job, build_job, check_job
from stratus.train.step import clip, forward_backward, pipelined_forward_backward, update
from stratus.train.trackers import check_trackers

log = logging.getLogger("stratus.train")


@dataclass
class Summary:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    unigram_baseline: float | None
    resumed_from: int | None
    goodput: dict


def train(cfg: Config) -> Summary:
    # Checked on every rank before any collective: a bad layout fails fast everywhere.
    layout = resolve_layout(cfg.parallel, int(os.environ.get("WORLD_SIZE", 1)), cfg.model)
    check_job(cfg, layout)
    check_trackers(cfg.log.trackers)
    # Watch from the start: a rank can also hang while joining the group (gloo and NCCL
    # set-up can wait on a peer that died), loading or restoring.
    rank = int(os.environ.get("RANK", 0))
    heartbeat = os.environ.get("STRATUS_HEARTBEAT") if rank == 0 else None
    watchdog = Watchdog(
        cfg.reliability.hang_timeout_s, Path(cfg.run.dir), rank, Path(heartbeat) if heartbeat else None
    ).start(limit_s=cfg.reliability.startup_timeout_s)
    env = denv.setup(cfg.train.device, cfg.parallel.timeout_s)
    try:
        return Trainer(build_job(cfg, env, layout), watchdog).run()
    finally:
        watchdog.stop()
        denv.teardown()


class Trainer:
    def __init__(self, job: Job, watchdog: Watchdog):
        self.job, cfg, env = job, job.cfg, job.env
        rc = cfg.reliability
        self.end = cfg.train.stop_at or cfg.train.steps
        self.step, self.samples_seen, self.resumed_from = 0, 0, None
        self.last_loss: float | None = None
        self.unread = Unread()  # the steps' numbers, on the device until the next read
        self.detector = SpikeDetector(rc.spike_zscore, rc.spike_window, rc.spike_min_steps, rc.max_spikes)
        # Each component decides when it is due and keeps its own state; faults reach all of
        # them through the one injector.
        self.faults = FaultInjector(configured_faults(rc.faults), env.rank, job.run)
        self.goodput = Goodput(job.run, env.is_main)
        self.watchdog = watchdog
        self.metrics = MetricsWriter(job.run, env.is_main, cfg.log)
        self.throughput = Throughput(job, self.end)
        self.checkpointer = Checkpointer(job, self.faults, watchdog, self.goodput, self.metrics)
        self.validator = Validator(job, watchdog)
        self.stragglers = StragglerCheck(job, self.faults)
        if job.resume_from is not None:
            self._restore(job.resume_from, with_detector=True)
            self.resumed_from = self.step
            log.info(
                "resumed from %s (step %d, %d samples seen)", job.resume_from, self.step, self.samples_seen
            )
        self._log_start()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> Summary:
        job, end = self.job, self.end
        progress = StepProgress(job.console, job.rich and job.env.is_main, self.step, job.cfg.train.steps)
        self.watchdog.beat()
        self.goodput.training_started()
        self._event_start()
        self.throughput.reset()
        try:
            while self.step < end:
                started = time.perf_counter()
                self.train_step()
                self.goodput.step(self.step, time.perf_counter() - started)
                self.throughput.step_done()
                logged, validate = self.throughput.due(self.step), self.validator.due(self.step, end)
                save = self.checkpointer.due(self.step, logged) or self.step == end
                # The host reads the steps' numbers only here, and always before a save, so
                # that no checkpoint keeps a step that was not judged.
                record = self.read_steps(logged) if logged or validate or save else {}
                if record.get("spike"):  # rolled back: the state this step ended in is gone
                    self.metrics.write(self.step, record)
                    self.watchdog.beat()
                    continue
                if job.shard_check is not None and (logged or self.step == end):
                    job.shard_check.agree(job.env, wait=self.step == end)  # before the last save
                if logged:
                    ettr = self.goodput.summary()["ettr"]
                    record.update(self.throughput.report(self.step, self.last_loss, self.samples_seen, ettr))
                    progress.update(self.step, f"loss {self.last_loss:.3f}")
                if validate:
                    record.update(self.validator.run(self.step))
                if self.stragglers.due(self.step, logged):
                    record.update(self.stragglers.run(self.step))
                if record:
                    record.setdefault("loss", round(self.last_loss, 5))
                    self.metrics.write(self.step, record)
                saved = self.checkpointer.maybe_save(
                    self.step, self._state(), save, final=self.step == end, loss=self.last_loss
                )
                self.throughput.exclude(saved)  # keep checkpoint stalls out of the throughput
                self.goodput.save(force=bool(saved))
                self.watchdog.beat()
            self.checkpointer.finish_pending(self.last_loss)
            self.metrics.event("end", self.step, goodput=self.goodput.summary())
        finally:
            progress.close()
            self.goodput.save()
            self.metrics.close()
        return self._summary()

    def train_step(self) -> None:
        """One optimizer step (skipped on the device if its loss or norm is not finite),
        queued with nothing read back: its numbers wait in self.unread."""
        job, env = self.job, self.job.env
        step = self.step + 1
        self.faults.at_step_start(step)
        started = time.perf_counter()
        loss_local, stats, norm = self._forward_backward(step)
        # Global values (means over ranks; the norm over every shard), so a NaN on any rank
        # is a NaN on all: they skip the same update without another collective.
        means = denv.all_reduce_mean(env, torch.cat([loss_local.view(1).float(), stats]))
        loss = self.faults.reported_loss(step, means[:1], lambda t: denv.all_reduce_max(env, t))
        update(job.optimizer, loss, norm)
        job.scheduler.step()
        self.unread.add(step, self.samples_seen, loss, means[1:], norm)
        self.step, self.samples_seen = step, self.samples_seen + job.global_batch
        self.stragglers.step_done(time.perf_counter() - started)

    def read_steps(self, logged: bool) -> dict:
        """The one host sync since the last read: every step's numbers, judged in order. A
        non-finite step (already skipped) is counted and gets its metrics line; a spike rolls
        back. Returns what the newest step's line must record (nothing if it needs none)."""
        record: dict = {}
        for r in self.unread.read():
            self.last_loss = r.loss
            if not r.finite:
                self.detector.skipped_nonfinite += 1
                self.metrics.event("skipped_nonfinite", r.step, time=round(r.time, 3))
                log.warning(
                    "step %d: non-finite loss or gradient norm on some rank; update skipped on every "
                    "rank (%d so far)",
                    r.step,
                    self.detector.skipped_nonfinite,
                )
            elif self.detector.is_spike(r.loss):
                return self._rollback(r)
            record = self._record(r)
            if not r.finite and r.step != self.step:  # a skipped step always has its line
                self.metrics.write(r.step, {**record, "time": round(r.time, 3)})
        return record if (logged or record.get("skipped")) else {}

    def _record(self, r: Reading) -> dict:
        record: dict = {"skipped": "nonfinite"} if not r.finite else {}
        record["loss"] = round(r.loss, 5)
        record["grad_norm"] = round(r.grad_norm, 5) if math.isfinite(r.grad_norm) else None
        record.update((k, round(v, 5)) for k, v in zip(self.job.objective.stat_names, r.stats, strict=True))
        record["skipped_nonfinite"] = self.detector.skipped_nonfinite
        return record

    def _forward_backward(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the step's loss and statistics, and the global gradient norm
        (device tensors: reading them is the caller's one host sync)."""
        job, tc = self.job, self.job.cfg.train
        micro = rank_micro_batches(
            self.samples_seen, job.global_batch, tc.micro_batch, job.dp_rank, job.layout.dp
        )
        batches = (
            tuple(t.to(job.env.device, non_blocking=True) for t in job.sampler.batch(first, count))
            for first, count in micro
        )
        poison = self.faults.poison(step)
        # the step's loss is the mean over all it trains on (tokens, or pairs), on all ranks
        scale = job.layout.dp / max(1, job.sampler.targets(self.samples_seen, job.global_batch))
        pipe = job.pipeline
        with self.stragglers.timing():  # this rank's own compute, for the straggler check
            if pipe is not None:
                loss, stats = pipelined_forward_backward(
                    pipe, batches, job.autocast, job.loss_context, poison, scale
                )
            else:
                loss, stats = forward_backward(
                    job.model,
                    batches,
                    job.accum,
                    job.autocast,
                    job.loss_context,
                    poison,
                    scale,
                    job.objective,
                )
        return loss, stats, clip(job.model, tc.grad_clip, pipe.group if pipe else None)

    # --- anomalies and checkpoints -----------------------------------------------------------

    def _rollback(self, spike: Reading) -> dict:
        """Back to the newest checkpoint, which is from before the spike (a save first judges
        every step before it); the data goes on from past the spike plus spike_skip_steps
        global batches, so the batches around the spike are not seen again. With no
        checkpoint yet there is nothing to go back to: the steps since the spike stay."""
        job, rc = self.job, self.job.cfg.reliability
        if self.detector.too_many:
            raise RunStopped(
                f"loss spike {self.detector.spikes} of reliability.max_spikes = {rc.max_spikes} at step "
                f"{spike.step} (loss {spike.loss:.4f}); the run is unstable: lower train.lr or raise "
                "train.warmup_steps, then resume"
            )
        skip_to = spike.samples_before + (1 + rc.spike_skip_steps) * job.global_batch
        self.unread.read()  # the steps after the spike, taken from the state being left
        found = self.checkpointer.newest(spike.loss)
        if found is not None:
            self._restore(found[1], with_detector=False)
        self.samples_seen = max(skip_to, self.samples_seen)
        self.metrics.event("rollback", spike.step, loss=round(spike.loss, 5), to_step=self.step)
        log.warning(
            "step %d: loss spike (%.4f); rolled back to step %d, data skipped to sample %d",
            spike.step,
            spike.loss,
            self.step,
            self.samples_seen,
        )
        return {
            "loss": round(spike.loss, 5),
            "spike": True,
            "rollback_from": spike.step,
            "rollback_to": self.step,
            "data_skipped_to": self.samples_seen,
        }

    def _restore(self, path: Path, with_detector: bool) -> None:
        loaded = self.checkpointer.load(path)
        self.step, self.samples_seen = loaded.step, int(loaded.trainer["samples_seen"])
        self.job.scheduler.load_state_dict(loaded.trainer["scheduler"])
        if with_detector:
            self.detector.load_state_dict(loaded.trainer.get("anomaly", {}))

    def _state(self) -> dict:
        """What a checkpoint records besides the model and optimizer."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.samples_seen * self.job.cfg.data.seq_len,
            "scheduler": self.job.scheduler.state_dict(),
            "anomaly": self.detector.state_dict(),
        }

    # --- reporting -------------------------------------------------------------------------

    def _summary(self) -> Summary:
        if self.resumed_from is not None and self.resumed_from >= self.end:
            log.info(
                "the run in %s is already at step %d (asked to train to %d): nothing to do; "
                "raise train.steps to continue",
                self.job.run,
                self.resumed_from,
                self.end,
            )
        g = self.goodput.summary()
        log.info(
            "goodput: ETTR %.1f%% of %.0fs wall | productive %.0fs, recomputed %.0fs, checkpoints %.0fs, "
            "start-up %.0fs, downtime %.0fs over %d restarts",
            100 * g["ettr"],
            g["wall_s"],
            g["productive_s"],
            g["recomputed_s"],
            g["checkpoint_s"],
            g["startup_s"],
            g["downtime_s"],
            g["restarts"],
        )
        unigram = self.job.data_manifest["splits"]["train"].get("unigram_entropy")
        val = self.validator.val_loss
        return Summary(self.job.run, self.step, self.last_loss, val, unigram, self.resumed_from, g)

    def _event_start(self) -> None:
        """timeline.jsonl: this process's start, and what it runs on (the report's header)."""
        g = self.goodput
        self.metrics.event(
            "start",
            self.step,
            process_start=round(g.started, 3),
            restarts=g.state["restarts"],
            **run_facts(self.job),
        )

    def _log_start(self) -> None:
        job, tc = self.job, self.job.cfg.train
        log.info(
            "model %.2fM parameters (%.2fM without embeddings) | %d ranks (%s) | %d data-parallel x %d "
            "micro batch x %d accumulation = %d %s of %d tokens per step | device %s %s "
            "| unigram baseline %s nats",
            job.model.num_params() / 1e6,
            job.model.num_params(False) / 1e6,
            job.env.world_size,
            job.layout.describe(),
            job.layout.dp,
            tc.micro_batch,
            job.accum,
            job.global_batch,
            "preference pairs (2 sequences each)" if tc.objective == "dpo" else "sequences",
            job.cfg.data.seq_len,
            job.env.device,
            str(job.dtype).removeprefix("torch."),
            job.data_manifest["splits"]["train"].get("unigram_entropy"),
        )
