"""The computation of one optimizer step, shared by the trainer and the dry run: the
micro batches' forward and backward with gradient accumulation, clipping, and the update,
which a non-finite loss or norm skips on the device. Nothing here reads a value to the
host: the dry run runs these same functions on fake tensors, where a read would fail."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from stratus.data.packing import IGNORE
from stratus.distributed.pipeline import Pipeline


def token_loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of (batch, seq, vocab) logits, summed over the targets trained
    on (IGNORE is not), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=IGNORE)


class TokenLoss:
    """Next-token cross-entropy, summed over the targets trained on (pretraining, SFT)."""

    stat_names: tuple[str, ...] = ()

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...], autocast) -> tuple:
        x, y, *doc = batch  # packed chat data carries each token's document number
        with autocast:
            logits = model(x, doc=doc[0]) if doc else model(x)  # (micro_batch, seq, vocab)
        return token_loss_sum(logits, y), None


TOKEN_LOSS = TokenLoss()


def forward_backward(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    accum: int,
    autocast: contextlib.AbstractContextManager,
    loss_context: Callable[[], Any],
    poison: bool = False,
    scale: float | None = None,
    objective: Callable = TOKEN_LOSS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of `accum` micro batches. The objective turns one into a
    summed loss (and summed statistics, such as DPO's reward margin); targets IGNORE are not
    trained on.

    Each micro batch's sums are multiplied by `scale`: data-parallel ranks over what the
    whole global batch sums over (the targets trained on, or the pairs). FSDP averages
    gradients over the ranks, so the update is the mean over the step however its work
    falls across ranks and micro batches (without scale: the mean over this rank's tokens).
    Returns this rank's share of the loss and of the statistics: their mean over ranks is
    the step's (device tensors: reading them is a host sync, left to the caller)."""
    loss_sum, stats_sum = None, None
    for i, batch in enumerate(batches):
        if isinstance(model, FSDPModule):
            # Every micro batch's gradients are reduce-scattered at once, so a rank only ever
            # holds its shard of them (deferring that would keep every block's whole fp32
            # gradient until the last micro batch: 8B x 4 bytes = 32 GB a GPU for llama3-8b). Only
            # HSDP's all-reduce across replicas, over gradients already sharded, waits.
            model.set_requires_all_reduce(i == accum - 1)
        factor = scale if scale is not None else 1.0 / (batch[1].numel() * accum)
        with loss_context():
            loss, stats = objective(model, batch, autocast)
            loss = loss * factor
            if poison:
                loss = loss * float("nan")
            loss.backward()
        loss = local(loss.detach())
        loss_sum = loss if loss_sum is None else loss_sum + loss
        if stats is not None:
            stats = local(stats.detach()).float() * factor
            stats_sum = stats if stats_sum is None else stats_sum + stats
    return loss_sum, (stats_sum if stats_sum is not None else loss_sum.new_zeros(0))


def pipelined_forward_backward(
    pipe: Pipeline,
    batches: Iterable[tuple[torch.Tensor, ...]],
    autocast: contextlib.AbstractContextManager,
    loss_context: Callable[[], Any],
    poison: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_backward's contract under pipeline parallelism: the micro batches go through
    the schedule in rounds of pipe.microbatches, and the last stage sums their token losses
    times `scale`, so the gradients are those of forward_backward. Only the last stage has a
    loss: it returns its share times the pipeline's depth and the other stages zero, so that
    the mean over all ranks is the step's loss with no collective of its own."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        summed = token_loss_sum(logits, y) * scale
        return summed * float("nan") if poison else summed

    pipe.loss = loss
    total, group = None, []
    for batch in batches:
        group.append(batch)
        if len(group) < pipe.microbatches:
            continue
        x, y, *doc = (torch.cat(parts) for parts in zip(*group, strict=True))
        group = []
        with loss_context(), autocast:
            for part in pipe.run(x, y, doc[0] if doc else None, train=True):
                part = local(part.detach())
                total = part if total is None else total + part
    device = pipe.stages[0].device
    share = total * dist.get_world_size(pipe.group) if total is not None else torch.zeros((), device=device)
    if poison:  # a stage without the loss still makes the step's loss, and so its update, NaN
        share = share * float("nan")
    return share, share.new_zeros(0)


def clip(model: nn.Module, max_norm: float, pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global gradient norm before clipping (over every shard: FSDP's and TP's DTensor
    gradients reduce to one norm), as a device tensor.

    Tensor parallelism leaves some gradients partial: a sequence-parallel norm's weight gets
    each rank's sum over its own part of the sequence. They are summed here, before the norm
    and the update read them. torch 2.9 takes the norm of a partial gradient wrongly, so the
    clip scale was off and a tp 2 run trained its norms apart from one process; torch 2.13
    sums them itself, and the dry run counts the same all-reduces with this as without.

    Under pipeline parallelism each rank holds some stages' gradients: their squared norms
    are summed over the pipeline (pp_group) so that every stage clips by the one global norm."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(x.is_partial() for x in g.placements):
            summed = [Replicate() if x.is_partial() else x for x in g.placements]
            p.grad = g.redistribute(g.device_mesh, summed)
    if pp_group is None:
        return local(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf))
    params = [p for p in model.parameters() if p.grad is not None]
    squared = local(torch.nn.utils.get_total_norm([p.grad for p in params])) ** 2
    dist.all_reduce(squared, group=pp_group)
    norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm or math.inf, norm)
    return norm


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, norm: torch.Tensor) -> None:
    """The optimizer step, skipped when the global loss or gradient norm is not finite,
    decided on the device: the fused AdamW kernel takes a found_inf flag (the one GradScaler
    uses) and then leaves parameters, moments and step count as they were. Only where no
    fused kernel exists is the flag read on the host (a sync every step)."""
    skip = ~(torch.isfinite(loss).all() & torch.isfinite(norm).all())
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        optimizer.step()
    elif not skip.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def local(t: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (a replicated loss or norm), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t
