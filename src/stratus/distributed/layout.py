"""The parallel layout: degrees from [parallel] checked against the job and the model, then
the device mesh. Checks run on every rank before any collective, so a bad layout is one
clear error and a prompt exit everywhere, never a hang."""

from __future__ import annotations

from dataclasses import dataclass

from stratus.config import ModelConfig, ParallelConfig
from stratus.errors import StratusError


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def dp_rank(self, rank: int) -> int:
        """The mesh is (dp_replicate, dp_shard, tp), tp innermost: tp ranks of a group are
        neighbours (one node) and read the same samples."""
        return rank // self.tp

    def describe(self) -> str:
        return f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp}"


def resolve_layout(pc: ParallelConfig, world_size: int, model: ModelConfig) -> Layout:
    """Fill in dp_shard = -1 and check the layout against the job's ranks and the model."""
    fixed = pc.dp_replicate * pc.tp
    if pc.dp_shard == -1:
        if world_size % fixed:
            raise StratusError(
                f"parallel.dp_replicate x parallel.tp = {pc.dp_replicate} x {pc.tp} = {fixed} does not "
                f"divide the job's {world_size} ranks: choose degrees whose product divides the world size"
            )
        layout = Layout(pc.dp_replicate, world_size // fixed, pc.tp)
    else:
        layout = Layout(pc.dp_replicate, pc.dp_shard, pc.tp)
    if layout.world_size != world_size:
        raise StratusError(
            f"parallel layout {layout.describe()} = {layout.world_size} ranks, but the job has {world_size}: "
            "make the degrees multiply to the world size (parallel.dp_shard = -1 takes the rest)"
        )
    for what, n in (
        ("model.n_heads", model.n_heads),
        ("model.n_kv_heads", model.kv_heads),
        ("the MLP width (model.ffn_hidden)", model.ffn_width),
    ):
        if n % layout.tp:
            raise StratusError(f"parallel.tp ({layout.tp}) must divide {what} ({n})")
    if pc.loss_parallel and layout.tp == 1:
        raise StratusError("parallel.loss_parallel needs parallel.tp > 1")
    return layout
