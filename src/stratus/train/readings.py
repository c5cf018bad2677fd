"""The numbers each training step leaves on the device (its loss, the objective's statistics,
the gradient norm), held there until the loop reads them: on logged steps and before a
checkpoint, all the steps since the last read in one host sync. Between reads nothing of
the step waits for a value, so a GPU runs ahead of the host as it should; a host read every
step would drain its queue each time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reading:
    step: int
    samples_before: int  # the data position the step started from (a rollback skips from it)
    time: float  # wall time the step was taken, for the timeline
    loss: float
    stats: tuple[float, ...]
    grad_norm: float

    @property
    def finite(self) -> bool:
        """Both are global (a mean over ranks, a norm over every shard): a NaN on any rank
        makes them NaN on every rank, so the ranks agree without another collective."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class Unread:
    def __init__(self) -> None:
        self._steps: list[tuple[int, int, float]] = []
        self._values: list[torch.Tensor] = []

    def add(self, step: int, before: int, loss: torch.Tensor, stats: torch.Tensor, norm: torch.Tensor):
        """Keep a step's global loss (1,), statistics (n,) and norm () on the device; `before`
        is the data position (global samples) the step started from."""
        self._steps.append((step, before, time.time()))
        self._values.append(torch.cat([loss.float().view(1), stats.float().view(-1), norm.float().view(1)]))

    def read(self) -> list[Reading]:
        """Every step since the last read, in order: one host sync for all of them."""
        if not self._steps:
            return []
        rows = torch.stack(self._values).tolist()
        out = [
            Reading(step, before, at, row[0], tuple(row[1:-1]), row[-1])
            for (step, before, at), row in zip(self._steps, rows, strict=True)
        ]
        self._steps, self._values = [], []
        return out
