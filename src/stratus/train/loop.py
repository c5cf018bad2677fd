"""`stratus train`: the training loop. Runs as one process or as every rank under torchrun.

One optimizer step = global_batch sequences: each data-parallel rank runs
global_batch / (micro_batch x ranks) micro batches, accumulating gradients, then clip,
AdamW, schedule. The batch a rank reads is a pure function of the data position (global
samples seen), so resuming from a checkpoint continues the exact sample sequence.

Every step the ranks agree (one all-reduce) on the loss and on whether it and the gradient
norm are finite: a non-finite step skips its update everywhere; a spike rolls back to the
last checkpoint and skips the data that caused it. A watchdog thread ends a rank that stops
making progress; faults can be injected to rehearse all of this.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stratus.checkpoint.manager import PendingSave, SaveError
from stratus.checkpoint.policy import CheckpointPolicy
from stratus.config import Config
from stratus.data.loader import rank_micro_batches
from stratus.distributed import env as denv
from stratus.distributed.layout import resolve_layout
from stratus.reliability.anomaly import SpikeDetector
from stratus.reliability.faults import FaultInjector, configured_faults
from stratus.reliability.goodput import Goodput
from stratus.reliability.watchdog import Watchdog
from stratus.train.console import StepProgress
from stratus.train.evaluate import perplexity, validation_loss
from stratus.train.metrics import MetricsWriter, device_peak_flops, peak_memory_gb
from stratus.train.setup import Job, build_job
from stratus.train.step import clip, forward_backward

log = logging.getLogger("stratus.train")


class RunStopped(Exception):
    """The run stopped on purpose (repeated spikes, a failed save with on_failure = stop):
    restarting would not help, so supervisors do not."""


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
        self.step, self.samples_seen, self.resumed_from = 0, 0, None
        self.detector = SpikeDetector(rc.spike_zscore, rc.spike_window, rc.spike_min_steps, rc.max_spikes)
        self.faults = FaultInjector(configured_faults(rc.faults), env.rank, job.run)
        self.goodput = Goodput(job.run, env.is_main)
        self.watchdog = watchdog
        save_limit = rc.checkpoint_timeout_s

        def progress() -> None:  # a save or a restore moved on: it may take save_limit more
            self.faults.slow_save()
            watchdog.beat(limit_s=save_limit)

        job.ckpt.progress = progress
        self.policy = CheckpointPolicy(cfg.checkpoint, rc.mtbf_hours)
        self.pending: PendingSave | None = None
        self.metrics = MetricsWriter(job.run, env.is_main, cfg.log.tensorboard)
        self.meta = {"config_hash": cfg.hash(), "model": cfg.model.model_dump()}
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.work_times: list[float] = []  # this rank's own compute per step, before injected delays
        if job.resume_from is not None:
            self._restore(job.resume_from, with_detector=True)
            self.resumed_from = self.step
            log.info(
                "resumed from %s (step %d, %d samples seen)", job.resume_from, self.step, self.samples_seen
            )
        self._log_start()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> Summary:
        cfg, end = self.job.cfg, self.job.cfg.train.stop_at or self.job.cfg.train.steps
        progress = StepProgress(
            self.job.console, self.job.rich and self.job.env.is_main, self.step, cfg.train.steps
        )
        self.watchdog.beat()
        self.goodput.training_started()
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < end:
                started = time.perf_counter()
                record = self.train_step()
                seconds = time.perf_counter() - started
                self.goodput.step(self.step, seconds)
                window_steps += 1
                if self._log_due(end):
                    record.update(self._throughput(window_start, window_steps))
                    progress.update(self.step, f"loss {self.last_loss:.3f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.job.val_sampler is not None and (
                    self.step % cfg.eval.interval == 0 or self.step == end
                ):
                    record.update(self._evaluate())
                record.update(self._stragglers())
                if record:
                    record.setdefault("loss", round(self.last_loss, 5))
                    self.metrics.write(self.step, record)
                saved = self._checkpoint(final=self.step == end)
                window_start += saved  # keep checkpoint stalls out of the throughput
                self.goodput.save(force=bool(saved))
                self.watchdog.beat()
            self._finish_pending()
            if self.job.sampler.verifier is not None:  # no run succeeds on a damaged shard
                self.job.sampler.verifier.wait()
        finally:
            progress.close()
            self.goodput.save()
            self.metrics.close()
        if self.resumed_from is not None and self.resumed_from >= end:
            log.info(
                "the run in %s is already at step %d (asked to train to %d): nothing to do; "
                "raise train.steps to continue",
                self.job.run,
                self.resumed_from,
                end,
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
        return Summary(self.job.run, self.step, self.last_loss, self.val_loss, unigram, self.resumed_from, g)

    def train_step(self) -> dict:
        """One optimizer step, or a skipped one. Returns what the metrics line must record."""
        job, env, tc = self.job, self.job.env, self.job.cfg.train
        step = self.step + 1
        self.faults.at_step_start(step)
        started = time.perf_counter()
        loss_local, norm = self._forward_backward(step)
        # One host sync a step, for both numbers. Both are already global (the mean over
        # ranks; the norm over every shard), so a NaN on any rank makes them NaN on all:
        # they agree on skipping without another collective.
        loss, grad_norm = torch.stack([denv.all_reduce_mean(env, loss_local), norm.float()]).tolist()
        spike = self.faults.due("spike", step)
        if spike is not None:
            loss *= spike.factor
        if self.faults.any_spike:  # a spike injected on one rank is seen by all; no collective otherwise
            loss = max(denv.all_reduce_max(env, loss), loss)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.last_loss = loss
        record: dict = {}
        if not finite:
            self.detector.skipped_nonfinite += 1
            record["skipped"] = "nonfinite"
            log.warning(
                "step %d: non-finite loss or gradient norm on some rank; update skipped on every "
                "rank (%d so far)",
                step,
                self.detector.skipped_nonfinite,
            )
        elif self.detector.is_spike(loss):
            job.optimizer.zero_grad(set_to_none=True)
            return self._rollback(step, loss)
        else:
            job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.scheduler.step()
        self.step, self.samples_seen = step, self.samples_seen + job.global_batch
        self.work_times.append(time.perf_counter() - started)
        self.faults.slow_down(self.work_times[-1])
        record["grad_norm"] = round(grad_norm, 5) if math.isfinite(grad_norm) else None
        record["skipped_nonfinite"] = self.detector.skipped_nonfinite
        return record if (record.get("skipped") or self._log_due(job.cfg.train.stop_at or tc.steps)) else {}

    def _forward_backward(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's mean loss over its micro batches, and the global gradient norm (device
        tensors: reading them is the caller's one host sync)."""
        job, tc = self.job, self.job.cfg.train
        micro = rank_micro_batches(
            self.samples_seen, job.global_batch, tc.micro_batch, job.dp_rank, job.layout.dp
        )
        batches = (
            tuple(t.to(job.env.device, non_blocking=True) for t in job.sampler.batch(first, count))
            for first, count in micro
        )
        poison = self.faults.due("nan", step) is not None
        loss = forward_backward(job.model, batches, job.accum, job.autocast, job.loss_context, poison)
        return loss, clip(job.model, tc.grad_clip)

    # --- anomalies -------------------------------------------------------------------------

    def _rollback(self, step: int, loss: float) -> dict:
        """Back to the newest checkpoint; the data goes on from past the spike plus
        spike_skip_steps global batches, so the batches around the spike are not seen again."""
        job, rc = self.job, self.job.cfg.reliability
        if self.detector.too_many:
            raise RunStopped(
                f"loss spike {self.detector.spikes} of reliability.max_spikes = {rc.max_spikes} at step "
                f"{step} (loss {loss:.4f}); the run is unstable: lower train.lr or raise "
                "train.warmup_steps, then resume"
            )
        self._finish_pending()
        skip_to = self.samples_seen + (1 + rc.spike_skip_steps) * job.global_batch
        found = job.ckpt.find()
        if found is not None:
            self._restore(found[1], with_detector=False)
        self.samples_seen = skip_to
        log.warning(
            "step %d: loss spike (%.4f); rolled back to step %d, data skipped to sample %d",
            step,
            loss,
            self.step,
            skip_to,
        )
        return {
            "loss": round(loss, 5),
            "spike": True,
            "rollback_from": step,
            "rollback_to": self.step,
            "data_skipped_to": skip_to,
        }

    def _restore(self, path: Path, with_detector: bool) -> None:
        loaded = self.job.ckpt.load(path, self.job.model, self.job.optimizer)
        self.step, self.samples_seen = loaded.step, int(loaded.trainer["samples_seen"])
        self.job.scheduler.load_state_dict(loaded.trainer["scheduler"])
        if with_detector:
            self.detector.load_state_dict(loaded.trainer.get("anomaly", {}))

    # --- checkpoints -----------------------------------------------------------------------

    def _checkpoint(self, final: bool) -> float:
        """Save when due (always at the end of the run). Returns the seconds the loop blocked."""
        job, env = self.job, self.job.env
        if self.pending is not None and job.ckpt.all_written(self.pending):
            self._finish_pending()
        if self.policy.time_based:
            # One clock decides for every rank, asked on logged steps only: a broadcast every
            # step would stall each one.
            due = self._log_due(end=self.job.cfg.train.stop_at or self.job.cfg.train.steps) and (
                denv.broadcast_object(env, self.policy.due(self.step))
            )
        else:
            due = self.policy.due(self.step)
        if not (due or final):
            return 0.0
        started = time.perf_counter()
        self._finish_pending()  # at most one save in flight
        self.watchdog.beat(limit_s=job.cfg.reliability.checkpoint_timeout_s)
        trainer = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.samples_seen * job.cfg.data.seq_len,
            "scheduler": job.scheduler.state_dict(),
            "anomaly": self.detector.state_dict(),
        }
        try:
            self.pending = job.ckpt.start(
                self.step,
                job.model,
                job.optimizer,
                trainer,
                self.meta,
                asynchronous=job.cfg.checkpoint.async_save and not final,
            )
            if not job.cfg.checkpoint.async_save or final:
                self._finish_pending()
        except SaveError as e:
            self._save_failed(e)
        blocked = time.perf_counter() - started
        self.policy.saved(blocked)
        self.goodput.checkpoint(blocked)
        log.info(
            "checkpoint of step %d: the loop blocked %.2fs%s",
            self.step,
            blocked,
            " (writing in the background)" if self.pending is not None else "",
        )
        return blocked

    def _finish_pending(self) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        crash = self.faults.due("crash_during_save", pending.step)
        hang = self.faults.due("hang_during_save", pending.step)
        self.watchdog.beat(limit_s=self.job.cfg.reliability.checkpoint_timeout_s)
        try:
            path = self.job.ckpt.finish(pending, before_commit=_die if crash else _hang if hang else None)
        except SaveError as e:
            self._save_failed(e)
            return
        log.info("saved checkpoint %s", path)
        if self.faults.due("corrupt_checkpoint", pending.step):
            _flip_a_byte(path)

    def _save_failed(self, error: SaveError) -> None:
        self.metrics.write(self.step, {"loss": self.last_loss, "checkpoint_failed": str(error)})
        if self.job.cfg.checkpoint.on_failure == "stop":
            raise RunStopped(f"{error}; checkpoint.on_failure is stop") from None
        log.error("%s; training goes on (checkpoint.on_failure = continue)", error)

    # --- reporting -------------------------------------------------------------------------

    def _log_due(self, end: int) -> bool:
        return self.step % self.job.cfg.log.interval == 0 or self.step == end

    def _throughput(self, window_start: float, window_steps: int) -> dict:
        job, tc = self.job, self.job.cfg.train
        elapsed = time.perf_counter() - window_start
        tokens_per_s = job.global_batch * job.cfg.data.seq_len * window_steps / elapsed
        devices = job.env.world_size  # every device computes; tp and pp ranks share one batch
        peak = device_peak_flops(job.env.device, job.dtype, job.cfg.log.peak_tflops)
        flops_per_token = job.model.flops_per_token(job.cfg.data.seq_len)
        values = {
            "loss": round(self.last_loss, 5),
            "lr": job.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_per_device": round(tokens_per_s / devices, 1),
            "mfu": round(flops_per_token * tokens_per_s / (peak * devices), 4) if peak else None,
            "memory_gb": round(denv.all_reduce_max(job.env, peak_memory_gb(job.env.device)), 3),
            "tokens_seen": self.samples_seen * job.cfg.data.seq_len,
            "ettr": self.goodput.summary()["ettr"],
        }
        eta = (tc.steps - self.step) * elapsed / window_steps
        log.info(
            f"step {self.step}/{tc.steps} | loss {self.last_loss:.4f} | lr {values['lr']:.2e} "
            f"| {tokens_per_s:,.0f} tok/s"
            + (f" | mfu {values['mfu']:.1%}" if peak else "")
            + f" | {values['memory_gb']:.2f} GB | eta {eta:.0f}s"
        )
        return values

    def _evaluate(self) -> dict:
        job = self.job
        self.val_loss, n = validation_loss(
            job.model,
            job.val_sampler,
            job.cfg.eval.batches,
            job.cfg.train.micro_batch,
            job.env,
            job.dp_rank,
            job.layout.dp,
            job.autocast,
            job.loss_context,
        )
        log.info(
            f"step {self.step} | validation loss {self.val_loss:.4f} | "
            f"perplexity {perplexity(self.val_loss):.2f} | {n} tokens"
        )
        self.watchdog.beat()
        return {"val_loss": round(self.val_loss, 5), "val_ppl": round(perplexity(self.val_loss), 3)}

    def _stragglers(self) -> dict:
        """Every straggler_interval steps, one step is timed between two barriers, so a rank's
        time is its own work (waits inside collectives excepted) and the barrier at the end
        absorbs the others' idling. A rank slower than the median by the threshold is named."""
        job, rc = self.job, self.job.cfg.reliability
        if not (job.env.distributed and rc.straggler_interval and self.step % rc.straggler_interval == 0):
            return {}
        dist.barrier()
        started = time.perf_counter()
        self.train_step_probe()
        mine = (time.perf_counter() - started, socket.gethostname())
        times: list = [None] * job.env.world_size
        dist.all_gather_object(times, mine)
        dist.barrier()
        median = statistics.median(t for t, _ in times)
        slow = [
            {"rank": r, "host": h, "seconds": round(t, 4), "vs_median": round(t / median - 1, 3)}
            for r, (t, h) in enumerate(times)
            if t >= median * (1 + rc.straggler_threshold)
        ]
        for s in slow:
            log.warning(
                "straggler: rank %d on %s took %.3fs, %.0f%% above the median %.3fs",
                s["rank"],
                s["host"],
                s["seconds"],
                100 * s["vs_median"],
                median,
            )
        return {"stragglers": slow} if slow else {}

    def train_step_probe(self) -> None:
        """The rank-local part of a step that the straggler check times: the batch reading of
        the next step and any injected slowness (collectives would hide the difference)."""
        job = self.job
        for first, count in rank_micro_batches(
            self.samples_seen, job.global_batch, job.cfg.train.micro_batch, job.dp_rank, job.layout.dp
        ):
            job.sampler.batch(first, count)
        self.faults.slow_down(statistics.median(self.work_times[-10:]) if self.work_times else 0.0)

    def _log_start(self) -> None:
        job, tc = self.job, self.job.cfg.train
        log.info(
            "model %.2fM parameters (%.2fM without embeddings) | %d ranks (%s) | %d data-parallel x %d "
            "micro batch x %d accumulation = %d sequences of %d tokens per step | device %s %s "
            "| unigram baseline %s nats",
            job.model.num_params() / 1e6,
            job.model.num_params(False) / 1e6,
            job.env.world_size,
            job.layout.describe(),
            job.layout.dp,
            tc.micro_batch,
            job.accum,
            job.global_batch,
            job.cfg.data.seq_len,
            job.env.device,
            str(job.dtype).removeprefix("torch."),
            job.data_manifest["splits"]["train"].get("unigram_entropy"),
        )


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
