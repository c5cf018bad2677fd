"""Pipeline parallelism with torch.distributed.pipelining, applied to the unchanged model.

Stages are runs of consecutive layers; the first also holds the token embedding, the last
the final norm and the output projection. A rank keeps one model (`Transformer` with the
layers of its stages only, and None for the parts it does not own), so parameter names are
the whole model's (`layers.7.attention.wq.weight` on whichever rank holds layer 7): DCP
checkpoints reshard between pipeline layouts by name, and the optimizer, the clip and the
checkpoint see one module as without pipelining. With several stages a rank (interleaved
and V schedules) each stage runs a view of that model holding its own layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from stratus.config import ModelConfig
from stratus.distributed.layout import Layout, split_layers
from stratus.errors import StratusError
from stratus.model import Transformer

# parallel.pp_schedule -> the name torch.distributed.pipelining knows it by
SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "interleaved_zb": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}
V_SHAPED = ("zbv", "dualpipev")  # rank r holds stages r and 2 pp - 1 - r
# Unless told not to, the last stage keeps every micro batch's output (the logits) until the
# round ends, to return them merged: 2 GiB a micro batch at 128k vocabulary and 8k tokens,
# found by the dry run, and the merge concatenates them all once more. torch 2.13 can be told
# (return_outputs=False); on older torch _Stage drops them itself.
_CAN_DROP_OUTPUTS = "return_outputs" in inspect.signature(PipelineScheduleSingle.step).parameters


def rank_stages(layout: Layout, pp_rank: int, schedule: str) -> list[int]:
    """The stage indices a pipeline rank runs: a loop (r, r + pp, ...) or a V (r, 2 pp - 1 - r)."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * layout.pp - 1 - pp_rank]
    return [pp_rank + k * layout.pp for k in range(layout.stages_per_rank)]


@dataclass
class Parts:
    """This rank's model (only its stages' parameters) and the module each stage runs."""

    model: Transformer
    stage_ids: list[int]
    stage_modules: list[Transformer]
    layers: list[list[int]]  # every stage's layers, for the log line


def split_model(model: Transformer, layout: Layout, pp_rank: int, schedule: str) -> Parts:
    """Keep the parts of `model` this rank's stages own (in place) and return them."""
    layers = split_layers(model.cfg.n_layers, layout.stages)
    if layout.pp == 1:
        return Parts(model, [0], [model], layers)
    ids = rank_stages(layout, pp_rank, schedule)
    last = layout.stages - 1
    mine = {str(i) for s in ids for i in layers[s]}
    for name in [n for n in model.layers if n not in mine]:
        del model.layers[name]
    if 0 not in ids:
        model.tok_embeddings = None
    if last not in ids:
        model.norm, model.output = None, None
    if len(ids) == 1:
        return Parts(model, ids, [model], layers)
    views = [_stage_view(model, layers[s], s == 0, s == last) for s in ids]
    return Parts(model, ids, views, layers)


def _stage_view(model: Transformer, layers: list[int], first: bool, last: bool) -> Transformer:
    """A Transformer over some of `model`'s own submodules (shared, not copied)."""
    view = Transformer.__new__(Transformer)
    nn.Module.__init__(view)
    view.cfg = model.cfg
    view.tok_embeddings = model.tok_embeddings if first else None
    view.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    view.norm = model.norm if last else None
    view.output = model.output if last else None
    view.register_buffer("rope_cos", model.rope_cos, persistent=False)
    view.register_buffer("rope_sin", model.rope_sin, persistent=False)
    return view


class _Stage(PipelineStage):
    """torch's stage, with its communicator warm-up made consistent, as newer torch makes it.
    torch 2.9 sends an int64 to the next stage where that stage posts a float32 receive (gloo
    checks sizes and aborts: "8 vs 4. Received data size doesn't match"), and under a V
    schedule it sends to the rank itself, where gloo has no link ("Pair is not connected").
    The warm-up only opens the links: its tensors go as float32, and never to this rank."""

    def _get_init_p2p_neighbors_ops(self) -> list[dist.P2POp]:
        ops = [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]
        return [
            op
            if op.tensor.dtype == torch.float32
            else dist.P2POp(op.op, op.tensor.float(), group=op.group, group_peer=op.group_peer)
            for op in ops
        ]

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward_one_chunk(*args, **kwargs)
        if self.is_last and not _CAN_DROP_OUTPUTS and self.output_chunks:
            # the loss is computed from `output`, and backward keeps its own reference; the
            # kept copy only feeds the merge at the round's end, which stratus never reads:
            # an empty stand-in merges to nothing
            self.output_chunks[-1] = torch.empty(0)
        return output


@dataclass(frozen=True)
class Activations:
    """The tensors that flow between stages, known before any runs: each stage is given its
    inputs and outputs as static metadata (meta tensors), so no stage learns them by running
    a forward and sending the result to its neighbour. That is what lets the dry run build
    the pipeline under a fake process group, where nothing a neighbour sends arrives."""

    micro_batch: int
    seq_len: int
    model: ModelConfig
    tp: int  # the hidden states between stages are sequence shards under tensor parallelism
    hidden_dtype: torch.dtype  # the residual stream's: FSDP's parameter dtype, else fp32
    logits_dtype: torch.dtype  # the compute dtype

    def stage_io(self, stage: int, stages: int) -> tuple[torch.Tensor, torch.Tensor]:
        meta = torch.device("meta")
        shape = (self.micro_batch, self.seq_len // self.tp, self.model.d_model)
        hidden = torch.empty(shape, dtype=self.hidden_dtype, device=meta)
        if stage == 0:
            inputs = torch.empty(self.micro_batch, self.seq_len, dtype=torch.long, device=meta)
        else:
            inputs = hidden.requires_grad_()
        if stage < stages - 1:
            return inputs, hidden.detach().requires_grad_()
        # whole logits: under loss parallelism a DTensor of this (global) shape, as torch 2.9 checks
        logits = torch.empty(
            self.micro_batch, self.seq_len, self.model.vocab_size, dtype=self.logits_dtype, device=meta
        )
        return inputs, logits.requires_grad_()


@dataclass
class Pipeline:
    """The schedule over this rank's stages. `loss` is what the last stage computes from a
    micro batch's output and targets; the trainer sets it before each round."""

    schedule: object
    stages: list[PipelineStage]
    group: dist.ProcessGroup
    microbatches: int  # a round's
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None)

    def run(self, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor | None, train: bool) -> list:
        """One round: the batch is cut into the schedule's micro batches along dim 0. Returns
        the last stage's per-micro-batch losses (empty on other ranks)."""
        losses: list = []
        kwargs = {"doc": doc.contiguous()} if doc is not None else {}  # every stage's attention needs it
        # the tokens to the first stage and the targets to the last, as each alone uses them;
        # contiguous, because a stage checks each round's inputs against the first round's
        # strides (torch 2.9), and a validation window is a slice of a longer row
        x, y = x.contiguous(), y.contiguous()
        args = (x,) if any(s.is_first for s in self.stages) else ()
        target = y if any(s.is_last for s in self.stages) else None
        run = self.schedule.step if train else self.schedule.eval
        if _CAN_DROP_OUTPUTS:
            kwargs["return_outputs"] = False
        run(*args, target=target, losses=losses if target is not None else None, **kwargs)
        return losses


def build_pipeline(
    parts: Parts,
    layout: Layout,
    pp_group: dist.ProcessGroup,
    device: torch.device,
    schedule: str,
    microbatches: int,
    activations: Activations,
) -> Pipeline:
    try:
        cls = get_schedule_class(SCHEDULES[schedule])
    except ValueError as e:  # an older torch without this schedule
        raise StratusError(
            f"parallel.pp_schedule = {schedule}: this torch ({torch.__version__}) has no such schedule ({e})"
        ) from None
    stages = [
        _Stage(module, s, layout.stages, device, *activations.stage_io(s, layout.stages), group=pp_group)
        for s, module in zip(parts.stage_ids, parts.stage_modules, strict=True)
    ]
    pipe = Pipeline(None, stages, pp_group, microbatches)
    # Sums, not means: the trainer's loss already carries the step's normalization, so the
    # micro batches' gradients add up as gradient accumulation's do without pipelining.
    kwargs = dict(loss_fn=lambda out, y: pipe.loss(out, y), scale_grads=False)
    if issubclass(cls, PipelineScheduleSingle):
        pipe.schedule = cls(stages[0], microbatches, **kwargs)
    else:
        pipe.schedule = cls(stages, microbatches, **kwargs)
    return pipe


def describe(parts: Parts) -> str:
    sizes = [len(x) for x in parts.layers]
    uneven = " (uneven)" if len(set(sizes)) > 1 else ""
    return f"{len(sizes)} stages of {sizes} layers{uneven}; this rank runs stages {parts.stage_ids}"
