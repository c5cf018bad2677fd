"""Parallelism applied to the unchanged model, in torchtitan's order: tensor + sequence
parallel, activation checkpointing, per-block compile, then FSDP2 (HSDP when replicated).

The model's submodule names are the plan: column-wise q/k/v and w1/w3, row-wise wo and w2
whose outputs are sharded along the sequence, sequence-parallel norms, a vocabulary-sharded
output (gathered, or kept sharded for loss parallelism).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from stratus.config import ParallelConfig
from stratus.distributed.layout import Layout

# Selective recompute keeps the outputs of the expensive ops and recomputes the cheap
# elementwise ones (norms, activations, RoPE) in backward (torchtitan's op-level policy).
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """(pp, dp_replicate, dp_shard, tp), pp outermost (across nodes: it sends only
    activations between neighbours) and tp innermost (within a node)."""
    shape, names = (layout.dp_replicate, layout.dp_shard, layout.tp), ("dp_replicate", "dp_shard", "tp")
    if layout.pp > 1:
        shape, names = (layout.pp, *shape), ("pp", *names)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    if layout.dp_shard > 1 and layout.tp > 1:
        # The gradient norm of FSDP x TP parameters is partial over both dimensions: with the
        # pair flattened DTensor reduces it in one all-reduce, not two in a row (found by the
        # dry run: torch warns of 2 sequential all-reduces at every clip).
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return mesh


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    layout: Layout,
    pc: ParallelConfig,
    compile_blocks: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shard the model (or a pipeline stage's part of it) over the mesh in place and return it."""
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], pc.loss_parallel)
    if pc.activation_checkpoint != "none":
        apply_activation_checkpointing(model, pc.activation_checkpoint)
    if compile_blocks:
        for block in model.layers.values():
            block.compile()
    if layout.dp > 1:
        dims = ("dp_replicate", "dp_shard") if layout.dp_replicate > 1 else ("dp_shard",)
        apply_fsdp(model, mesh[dims], param_dtype, pipelined=layout.pp > 1)
    return model


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, sequence_parallel: bool = True
) -> None:
    """Megatron's plan: q/k/v and w1/w3 split by output (heads, hidden units), wo and w2 by
    input, so a block costs two all-reduces. With sequence_parallel (training) the norms and
    residuals between blocks are sharded along the sequence and the all-reduces become a
    reduce-scatter and an all-gather; without it (serving, as vLLM's) every activation
    between blocks is whole on every rank, and the logits are gathered for sampling."""
    if not sequence_parallel:
        _tensor_parallel_replicated(model, tp_mesh)
        return
    # a pipeline stage may hold neither end of the model (None): plan only what it has
    ends = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    present = {name: plan for name, plan in ends.items() if getattr(model, name) is not None}
    tied = model.output is not None and model.output.weight is getattr(model.tok_embeddings, "weight", None)
    if present:
        parallelize_module(model, tp_mesh, present)
    if tied:  # both weights are sharded along the vocabulary: share the one DTensor again
        model.output.weight = model.tok_embeddings.weight
    # Attention is called as attention(x, cos, sin, cache, layer, mask): only x is sharded.
    attention_inputs = (Shard(1), None, None, None, None, None)
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=attention_inputs,
                    desired_input_layouts=(Replicate(), None, None, None, None, None),
                ),
                **_BLOCK_MATMULS,
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            },
        )


_BLOCK_MATMULS = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
}


def _tensor_parallel_replicated(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The plan without sequence parallelism: inputs and outputs of every sharded module are
    plain, whole tensors, so attention sees its rank's heads as ordinary tensors (and the
    serving engine's KV cache holds only those heads)."""
    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    if tied:
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                **_BLOCK_MATMULS,
                "attention.wo": RowwiseParallel(),
                "feed_forward.w2": RowwiseParallel(),
            },
        )


def _selective_policy():
    def policy(ctx, op, *args, **kwargs):
        # recompute every other matmul would save more memory; keeping all is the simple,
        # fast end of selective recompute
        return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    for name, block in list(model.layers.items()):
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            model.layers[name] = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=_selective_policy
            )


def apply_fsdp(
    model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None, pipelined: bool = False
) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, output). With bf16 parameters
    the gradients are still reduced in fp32. Under pipelining a stage runs forward once per
    micro batch before their backwards: its blocks keep their parameters gathered between
    them rather than all-gather them again for every micro batch (torchtitan's default)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not pipelined)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not pipelined)
