"""The computation of one optimizer step, shared by the trainer and the dry run: the
micro batches' forward and backward with gradient accumulation, then clipping. Taking the
update (or skipping it) is the caller's, since only the trainer knows about anomalies."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def forward_backward(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accum: int,
    autocast: contextlib.AbstractContextManager,
    loss_context: Callable[[], Any],
    poison: bool = False,
) -> torch.Tensor:
    """Accumulate the gradients of `accum` micro batches; returns this rank's mean loss
    (a tensor on the device: reading it is a host sync, left to the caller)."""
    loss_sum = None
    for i, (x, y) in enumerate(batches):
        if isinstance(model, FSDPModule):
            # Every micro batch's gradients are reduce-scattered at once, so a rank only ever
            # holds its shard of them (deferring that would keep every block's whole fp32
            # gradient until the last micro batch: 8B x 4 bytes = 32 GB a GPU for llama3-8b). Only
            # HSDP's all-reduce across replicas, over gradients already sharded, waits.
            model.set_requires_all_reduce(i == accum - 1)
        with loss_context():
            with autocast:
                logits = model(x)  # (micro_batch, seq, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            if poison:
                loss = loss * float("nan")
            (loss / accum).backward()
        loss = local(loss.detach())
        loss_sum = loss if loss_sum is None else loss_sum + loss
    return loss_sum / accum


def clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (over every shard: FSDP's and TP's DTensor
    gradients reduce to one norm), as a device tensor."""
    return local(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf))


def local(t: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (a replicated loss or norm), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t
