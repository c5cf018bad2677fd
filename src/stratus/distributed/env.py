"""Process-group set-up: one process, or every rank under torchrun (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("stratus.distributed")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_preference: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the job's process group when torchrun launched us (it sets RANK and WORLD_SIZE);
    otherwise run as the single rank of a world of one, with no process group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = round_store(rank, world, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, device)


def round_store(rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """The store this restart round's process group meets in, or None for torch's default.

    torchrun (torch 2.4 and later) hands its workers the agent's own TCPStore and keeps that
    one store across restarts, so every key a killed round wrote is still there when the next
    round starts: gloo's peer addresses, NCCL's unique id. A restarted rank that reads its
    peer's key before the peer has rewritten it connects to a dead process's port ("Connection
    refused") and the restart is lost (torch issue 135712). One agent numbers its rounds
    consistently, so its restart count scopes the keys to the round. Several agents count
    their restarts independently; there the agent must give each round a fresh store, which
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 does (`stratus launch` sets it)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// with rank 0 hosting a new store each round: nothing stale
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0:
            log.warning(
                "torchrun shares one TCPStore across restarts on %s nodes, so a restart can read a "
                "dead round's addresses; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                "environment (stratus launch does)",
                os.environ["GROUP_WORLD_SIZE"],
            )
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"stratus/round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def teardown() -> None:
    """Leave the process group, and give gloo's worker threads the moment they need to drop
    their last collective's tensors. A worker frees a finished collective after waking its
    caller, and freeing a tensor that Python owns takes the GIL. If the interpreter is
    finalizing by then, CPython ends the thread from inside a C++ destructor, which is
    std::terminate: the rank exits with SIGABRT after its work is done, and torchrun counts a
    finished job as failed (seen in 1 of ~10 two-rank runs on a busy machine). Sleeping
    releases the GIL, so the waiting worker takes it first and finishes."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.2)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's value of obj on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(env: DistEnv, obj) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_reduce_max(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_ranks_true(env: DistEnv, flag: bool) -> bool:
    """Collective: True only when flag is True on every rank."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
