"""Tensor-parallel serving: a model larger than one device, served from N ranks.

    torchrun --nproc-per-node N -m stratus serve RUN --tp N

Every rank loads the model and shards it with the training TP plan (distributed/
parallelize.py) without sequence parallelism, as vLLM does: each rank holds its heads'
q/k/v, its part of the FFN and of the vocabulary, and a KV pool of its own heads. Rank 0
runs the engine and the HTTP server. Before each forward it broadcasts the step's plan
(block tables, tokens, positions: a few lists), and the other ranks run the same forward on
their shards; the all-reduces inside it are the only other traffic. Only rank 0 samples, from
logits gathered whole. When rank 0's engine stops it sends None, and the others return.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from stratus.distributed.parallelize import apply_tensor_parallel
from stratus.errors import StratusError
from stratus.inference.engine import Engine, StepPlan, execute
from stratus.model import Transformer

# A server waits for requests for as long as it runs: the ranks that follow rank 0 block in
# a broadcast between requests, which the default 30-minute collective timeout would end.
# torchrun's agent ends the job when any rank dies, so a long timeout hides no hang.
IDLE_TIMEOUT = timedelta(days=365)


def init(tp: int, device: str) -> tuple[str, object]:
    """The process group and the tp mesh of this torchrun job: (this rank's device, mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise StratusError(
            f"--tp {tp} needs {tp} processes and this job has {world}: launch with "
            f"`torchrun --nproc-per-node {tp} -m stratus serve ... --tp {tp}`"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=IDLE_TIMEOUT)
    return device, init_device_mesh(device.split(":")[0], (tp,), mesh_dim_names=("tp",))


def shard(model: Transformer, mesh) -> Transformer:
    """The model's matmuls split over the tp ranks (heads, hidden units, vocabulary)."""
    tp = mesh.size()
    cfg = model.cfg
    for what, n in (
        ("attention heads", cfg.n_heads),
        ("key/value heads", cfg.kv_heads),
        ("FFN hidden units", model.layers["0"].feed_forward.w1.out_features),
        ("vocabulary entries", cfg.vocab_size),
    ):
        if n % tp:
            raise StratusError(f"--tp {tp} does not divide the model's {n} {what}: choose a --tp that does")
    apply_tensor_parallel(model, mesh["tp"], loss_parallel=False, sequence_parallel=False)
    return model


def broadcaster() -> Callable[[StepPlan | None], None]:
    """Rank 0's side: send each step's plan (None at the end) to every other rank."""

    def send(plan: StepPlan | None) -> None:
        dist.broadcast_object_list([plan], src=0)

    return send


def follow(engine: Engine) -> None:
    """A rank other than 0: run every step rank 0 runs, on this rank's shards, until it
    sends None. The logits are rank 0's to sample; here they are dropped."""
    while True:
        box: list[StepPlan | None] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        execute(engine.model, engine.pool, box[0], engine.device)
