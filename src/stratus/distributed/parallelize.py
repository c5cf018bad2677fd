"""Applies data parallelism to the unchanged model.

For now: plain replication (DDP) when the job has more than one rank. FSDP2, HSDP and
tensor/sequence parallelism from a [parallel] config section replace this in one place.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stratus.distributed.env import DistEnv


def parallelize(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.world_size == 1 or not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
