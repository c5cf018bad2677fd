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
    pp: int = 1
    stages_per_rank: int = 1  # virtual pipeline stages a rank holds

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def stages(self) -> int:
        return self.pp * self.stages_per_rank if self.pp > 1 else 1

    def dp_rank(self, rank: int) -> int:
        """The mesh is (pp, dp_replicate, dp_shard, tp), tp innermost: tp ranks of a group are
        neighbours (one node) and read the same samples, and so do a pipeline's stages."""
        return rank % (self.dp * self.tp) // self.tp

    def pp_rank(self, rank: int) -> int:
        return rank // (self.dp * self.tp)

    def describe(self) -> str:
        pp = f"pp {self.pp} x " if self.pp > 1 else ""
        return f"{pp}dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp}"


def resolve_layout(pc: ParallelConfig, world_size: int, model: ModelConfig) -> Layout:
    """Fill in dp_shard = -1 and check the layout against the job's ranks and the model."""
    fixed = pc.pp * pc.dp_replicate * pc.tp
    v = pc.stages_per_rank if pc.pp > 1 else 1
    if pc.dp_shard == -1:
        if world_size % fixed:
            named = [("parallel.pp", pc.pp)] if pc.pp > 1 else []
            named += [("parallel.dp_replicate", pc.dp_replicate), ("parallel.tp", pc.tp)]
            raise StratusError(
                f"{' x '.join(k for k, _ in named)} = {' x '.join(str(v) for _, v in named)} = {fixed} "
                f"does not divide the job's {world_size} ranks: choose degrees whose product divides "
                "the world size"
            )
        layout = Layout(pc.dp_replicate, world_size // fixed, pc.tp, pc.pp, v)
    else:
        layout = Layout(pc.dp_replicate, pc.dp_shard, pc.tp, pc.pp, v)
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
    if layout.pp > 1:
        _check_pipeline(layout, pc, model)
    return layout


def _check_pipeline(layout: Layout, pc: ParallelConfig, model: ModelConfig) -> None:
    if model.n_layers < layout.stages:
        raise StratusError(
            f"{layout.stages} pipeline stages (parallel.pp {layout.pp} x {layout.stages_per_rank} a rank) "
            f"need at least as many layers, and the model has {model.n_layers}: lower parallel.pp or "
            "parallel.pp_stages_per_rank"
        )
    if model.tie_embeddings:
        raise StratusError(
            "model.tie_embeddings shares one matrix between the first and the last pipeline stage, "
            "which live on different ranks: set model.tie_embeddings = false, or parallel.pp = 1"
        )


def pipeline_rounds(layout: Layout, pc: ParallelConfig, accum: int) -> tuple[int, int]:
    """(micro batches per pipeline round, rounds per step): the step's `accum` micro batches
    go through the pipeline in rounds of parallel.pp_microbatches."""
    if layout.pp == 1:
        return 1, accum
    per_round = pc.pp_microbatches or accum
    if accum % per_round:
        raise StratusError(
            f"parallel.pp_microbatches ({per_round}) must divide the {accum} micro batches each "
            "data-parallel rank runs a step (train.global_batch / (train.micro_batch x data-parallel ranks))"
        )
    # (gpipe runs with fewer on torch 2.13, all bubble; torch 2.9 refuses it as 1F1B does)
    if pc.pp_schedule in ("gpipe", "1f1b", "dualpipev") and per_round < layout.stages:
        raise StratusError(
            f"parallel.pp_schedule = {pc.pp_schedule} needs at least as many micro batches a round as "
            f"stages ({layout.stages}), and a round has {per_round}: lower train.micro_batch or raise "
            "train.global_batch (or parallel.pp_microbatches)"
        )
    if pc.pp_schedule.startswith("interleaved") and per_round % layout.pp:
        raise StratusError(
            f"parallel.pp_schedule = {pc.pp_schedule} runs its micro batches in groups of parallel.pp "
            f"({layout.pp}), and a round has {per_round}: make it a multiple (train.global_batch, "
            "train.micro_batch or parallel.pp_microbatches)"
        )
    return per_round, accum // per_round


def split_layers(n_layers: int, stages: int) -> list[list[int]]:
    """Consecutive layers per stage, as even as the count allows. Extra layers go to the
    middle stages first, then the first: the last stage also computes the output projection
    and the loss, the largest single matmul at a 128k vocabulary."""
    base, extra = divmod(n_layers, stages)
    sizes = [base] * stages
    for s in ([*range(1, stages - 1), 0, stages - 1] if stages > 1 else [0])[:extra]:
        sizes[s] += 1
    bounds = [sum(sizes[:s]) for s in range(stages + 1)]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]
