"""Where training numbers go: metrics.jsonl (one JSON object per logged step, with its wall
time), timeline.jsonl (what happened when: starts, checkpoints, the end), TensorBoard event
files, the Prometheus endpoint and experiment trackers; and the device peak that MFU is
measured against."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from stratus.distributed.env import all_reduce_max

log = logging.getLogger("stratus.train")


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None
) -> float | None:
    """The device's dense bf16 peak from the one hardware catalog (plan/catalog.toml, with a
    site's $STRATUS_PLAN_CATALOG on top), or log.peak_tflops."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None  # unknown: MFU is left out rather than guessed
    from stratus.plan.catalog import load_catalog

    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    gpu = load_catalog().gpu_for_device(torch.cuda.get_device_name(device), memory_gib)
    return gpu.peak_flops if gpu else None


def device_name(device: torch.device) -> str:
    """What the run's report calls the hardware: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU ({model}, {os.cpu_count()} cores)"


def run_facts(job) -> dict[str, Any]:
    """What a run runs on and how, for its timeline's start events."""
    return {
        "world_size": job.env.world_size,
        "layout": job.layout.describe(),
        "device": device_name(job.env.device),
        "dtype": str(job.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),  # a CPU rank's compute (plan --from-run)
        "params": job.model.num_params(),
        "global_batch": job.global_batch,
        "seq_len": job.cfg.data.seq_len,
        "objective": job.cfg.train.objective,
        "unigram_baseline": job.data_manifest["splits"]["train"].get("unigram_entropy"),
    }


def peak_memory_gb(env) -> torch.Tensor:
    """This rank's peak memory, as a tensor on its device for the all-reduce (the biggest rank)."""
    if env.device.type == "cuda":
        gb = torch.cuda.max_memory_allocated(env.device) / 1e9
    else:
        gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB
    return torch.tensor(gb, dtype=torch.float64, device=env.device)


class Throughput:
    """The metrics logger's clock: due every log.interval steps and at the last one; measures
    tokens/s and MFU over the steps since the last logged one, checkpoint stalls excluded."""

    def __init__(self, job, end: int):
        self.job, self.end = job, end
        self.reset()

    def reset(self) -> None:
        """A new window starts now (at the start of training, after each logged step)."""
        self.start, self.steps = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        return step % self.job.cfg.log.interval == 0 or step == self.end

    def step_done(self) -> None:
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def report(self, step: int, loss: float, samples_seen: int, ettr: float) -> dict[str, Any]:
        job, tc = self.job, self.job.cfg.train
        elapsed = time.perf_counter() - self.start
        tokens_per_s = job.global_batch * job.cfg.data.seq_len * self.steps / elapsed
        devices = job.env.world_size  # every device computes; tp and pp ranks share one batch
        peak = device_peak_flops(job.env.device, job.dtype, job.cfg.log.peak_tflops)
        flops_per_token = job.model.flops_per_token(job.cfg.data.seq_len)
        values = {
            "loss": round(loss, 5),
            "lr": job.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_per_device": round(tokens_per_s / devices, 1),
            "mfu": round(flops_per_token * tokens_per_s / (peak * devices), 4) if peak else None,
            "memory_gb": round(float(all_reduce_max(job.env, peak_memory_gb(job.env))), 3),
            "tokens_seen": samples_seen * job.cfg.data.seq_len,
            "ettr": ettr,
        }
        eta = (tc.steps - step) * elapsed / self.steps
        log.info(
            f"step {step}/{tc.steps} | loss {loss:.4f} | lr {values['lr']:.2e} | {tokens_per_s:,.0f} tok/s"
            + (f" | mfu {values['mfu']:.1%}" if peak else "")
            + f" | {values['memory_gb']:.2f} GB | eta {eta:.0f}s"
        )
        self.reset()
        return values


class MetricsWriter:
    """Rank 0 writes; other ranks hold a writer that does nothing. Besides the two JSONL
    files, every sink (TensorBoard, Prometheus, trackers) gets the same numbers."""

    def __init__(self, run_dir: Path, enabled: bool, log_cfg):
        self.enabled = enabled
        self._sinks: list = []
        if not enabled:
            self._jsonl = self._timeline = None
            return
        # held open for the run (appending one line per logged step); closed by close()
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._timeline = open(run_dir / "timeline.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if log_cfg.tensorboard:
            self._sinks.append(TensorBoardSink(run_dir / "events"))
        if log_cfg.prometheus_port is not None:
            from stratus.train.prometheus import PrometheusSink

            self._sinks.append(PrometheusSink(log_cfg.prometheus_port))
        if log_cfg.trackers:
            from stratus.train.trackers import open_trackers

            self._sinks.extend(open_trackers(log_cfg.trackers, run_dir))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._jsonl.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self._sinks:
            sink.write(step, numbers)

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A line of timeline.jsonl: something that happened at a wall time (report's markers)."""
        if not self.enabled:
            return
        record = {"event": kind, "step": step, "time": round(time.time(), 3), **fields}
        self._timeline.write(json.dumps(record) + "\n")
        self._timeline.flush()
        for sink in self._sinks:
            sink.event(kind, step, record)

    def close(self) -> None:
        for f in (self._jsonl, self._timeline):
            if f:
                f.close()
        for sink in self._sinks:
            sink.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, numbers: dict[str, float]) -> None:
        for key, value in numbers.items():
            self._tb.add_scalar(key, value, step)

    def event(self, kind: str, step: int, record: dict) -> None:
        pass  # TensorBoard has no place for events; the report draws them

    def close(self) -> None:
        self._tb.close()
