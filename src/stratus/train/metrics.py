"""Where training numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard
event files, and the device peak that MFU is measured against."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s by device name (vendor figures, ../shared/reference).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None
) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None  # unknown: MFU is left out rather than guessed
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


class MetricsWriter:
    """Rank 0 writes; other ranks hold a writer that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        # held open for the run (appending one line per logged step); closed by close()
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "events"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
