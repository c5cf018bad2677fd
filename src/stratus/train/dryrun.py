"""`stratus dryrun`: the real training code at cluster size, in one CPU process.

A fake process group of world size W stands in for the cluster and FakeTensorMode for the
GPU's memory: tensors carry shapes and dtypes but no storage, and collectives return at
once. What runs is what `stratus train` runs: the layout checks, the device mesh, the model
built on the meta device, `parallelize` (TP+SP, FSDP/HSDP, activation checkpointing), the
optimizer, and full optimizer steps through train/step.py. Rank 0's view is measured; under
the layouts stratus runs every rank holds the same shapes.

What it cannot see: kernel time (there is none), torch.compile (blocks run eager; compile
fuses elementwise temporaries away, so the eager peak is the upper bound), and the CUDA
caching allocator. The fit check adds the planner's allowance for the last.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from stratus import counts
from stratus.config import Config
from stratus.data.manifest import read_manifest
from stratus.distributed.layout import Layout, pipeline_rounds, resolve_layout
from stratus.distributed.parallelize import build_mesh
from stratus.distributed.pipeline import rank_stages
from stratus.errors import StratusError
from stratus.plan.catalog import Gpu
from stratus.plan.efficiency import DEFAULT as PLANNER
from stratus.train.optim import build_optimizer
from stratus.train.setup import (
    batch_shape,
    check_job,
    make_pipeline,
    materialize,
    precision,
    resolve_vocab,
    sharded_model,
)
from stratus.train.step import clip, forward_backward, pipelined_forward_backward, update

GIB = 2**30
ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")
# The Llama 3 tokenizer's 128,256 tokens: the vocabulary a config with vocab_size 0 gets
# when no prepared corpus is at hand to say its size.
DEFAULT_VOCAB = 128256
# Micro batches run per step. Memory peaks in the first two (the second one starts with the
# first one's gradients already reduce-scattered), and every further one repeats the same
# ops and collectives; per-step counts are scaled up to the config's accumulation.
MICRO_BATCHES_RUN = 2

# The tracker's categories, grouped the way a person reads a memory budget.
CATEGORIES = {
    "parameters": ("Sharded Param", "Unsharded Param", "Parameter", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "activations": ("Activation",),
    "temporaries": ("Temp", "All Gather", "Reduce Scatter", "Inputs", "Other"),
}


_ATEN = torch.ops.aten


def _kv_heads_as_query_heads(formula, query_at: int):
    """A FLOP formula for attention that sees key and value with the query's head count.
    Under grouped-query attention the kernel broadcasts each key/value head over its group of
    query heads, and torch 2.13 counts it so; torch 2.9's formula asserts equal head counts.
    The formulas read shapes, so the shapes alone are widened (arguments query_at + 1, + 2)."""

    def count(*args, **kwargs):
        args, heads = list(args), args[query_at].shape[1]  # (batch, heads, seq, head_dim)
        for i in (query_at + 1, query_at + 2):
            shape = args[i].shape
            args[i] = torch.Size((shape[0], heads, *shape[2:]))
        return formula(*args, **kwargs)

    return count


# torch's FLOP formulas, plus the CPU flash-attention kernel that a CPU dry run runs where a
# GPU runs the flash or memory-efficient one (the same arithmetic).
FLOPS = {
    **flop_registry,
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _kv_heads_as_query_heads(
        flop_registry[_ATEN._scaled_dot_product_flash_attention], query_at=0
    ),
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _kv_heads_as_query_heads(
        flop_registry[_ATEN._scaled_dot_product_flash_attention_backward], query_at=1
    ),
}
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "barrier", "monitored_barrier")


class _LocalOpsOnly:
    """A dispatch mode that sees only this rank's local ops (the census, and torch's memory
    trackers counting only what this rank allocates, as torch 2.13's do):
    a DTensor op is left to DTensor (NotImplemented) and the local ops it becomes on this
    rank's shards are counted, while the ops DTensor runs on whole-tensor fakes to work out
    placements (in a fake mode other than the one the tracker was entered in) are not.
    torch 2.9's trackers count those too: llama3-8b on 64 ranks read 120 GiB of optimizer
    state instead of 0.9. On torch 2.13 this changes nothing."""

    def __enter__(self):
        self._entered_in = active_fake_mode()
        return super().__enter__()  # type: ignore[misc]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        if active_fake_mode() is not self._entered_in:
            return func(*args, **(kwargs or {}))  # DTensor's placement propagation
        return self.local_op(func, types, args, kwargs or {})

    def local_op(self, func, types, args, kwargs):
        """An op on this rank's own tensors: what is counted."""
        return super().__torch_dispatch__(func, types, args, kwargs)  # type: ignore[misc]


@dataclass
class Census(_LocalOpsOnly, TorchDispatchMode):
    """What this rank computes and sends: the FLOPs of its own kernels (torch's formulas,
    FlopCounterMode's, on the shapes this rank holds), and
    the collectives it issues with the bytes of the largest buffer each one moves, by op and
    process-group size."""

    flops: int = 0
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__()

    def local_op(self, func, types, args, kwargs):
        out = func(*args, **kwargs)
        if func.namespace in _COLLECTIVE_NAMESPACES:
            self._collective(func, args, kwargs, out)
        elif func._overloadpacket in FLOPS:
            self.flops += FLOPS[func._overloadpacket](*args, **kwargs, out_val=out)
        return out

    def _collective(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1].rstrip("_")
        if name in _NOT_COLLECTIVES:
            return
        group = None
        for spec, value in zip(func._schema.arguments, args, strict=False):
            if spec.name in ("group_name", "process_group", "group") or isinstance(value, torch.ScriptObject):
                group = _group_size(value) or group
        key = f"{name} ({group} ranks)" if group else name
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.calls[key] += 1
        self.bytes[key] += max(
            (t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor)), default=0
        )

    def snapshot(self) -> tuple[int, Counter, Counter]:
        return self.flops, self.calls.copy(), self.bytes.copy()


def _group_size(arg: Any) -> int | None:
    """The size of a collective's process group: c10d ops take it boxed as a ScriptObject,
    functional collectives by its registered name."""
    with contextlib.suppress(Exception):
        if isinstance(arg, torch.ScriptObject):
            return dist.ProcessGroup.unbox(arg).size()
        if isinstance(arg, str):
            return _resolve_process_group(arg).size()
    return None


@dataclass
class Report:
    config: str
    world_size: int
    layout: str
    gpu: str
    params: int
    accum: int
    micro_batches_run: int
    tokens_per_step: int
    memory_gib: dict[str, float]
    tracker_gib: dict[str, float]
    peak_gib: float
    allowance_gib: float
    hbm_gib: float
    fits: bool
    margin_gib: float
    flops_per_step: float
    flops_estimate: float
    collectives: dict[str, dict[str, float]]
    seconds: float
    knobs: list[str]
    notes: list[str]
    stages_gib: dict[str, float] = field(default_factory=dict)  # peak by pipeline rank measured

    def verdict(self) -> str:
        if self.fits:
            return f"fits, {self.margin_gib:.1f} GiB free"
        return f"does not fit by {-self.margin_gib:.1f} GiB: try {', '.join(self.knobs)}"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verdict": self.verdict()}


def dry_run(cfg: Config, world_size: int, gpu: Gpu, steps: int = 2, label: str = "") -> Report:
    started = time.perf_counter()
    layout = resolve_layout(cfg.parallel, world_size, cfg.model)
    if steps < 1:
        raise StratusError(f"--steps must be at least 1 (got {steps})")
    cfg, notes = _resolve_vocab(cfg)
    if cfg.train.compile:
        notes.append("torch.compile is off in the dry run: blocks run eager")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})})
    check_job(cfg, layout)
    if cfg.parallel.pp_schedule in ZERO_BUBBLE and layout.pp > 1:
        raise StratusError(
            f"the dry run cannot measure parallel.pp_schedule = {cfg.parallel.pp_schedule} yet: a "
            "zero-bubble schedule splits each backward into input and weight gradients, and torch's "
            "memory tracker cannot follow that (autograd.grad over its hooks); dry-run the same stages "
            "with 1f1b or interleaved_1f1b"
        )
    tc = cfg.train
    global_batch, accum = batch_shape(tc, layout)
    # a pipeline runs whole rounds: its in-flight micro batches are what its memory holds
    run_micro = (
        pipeline_rounds(layout, cfg.parallel, accum)[0] if layout.pp > 1 else min(accum, MICRO_BATCHES_RUN)
    )
    # Every rank of a pipeline stage holds the same shapes; the stages differ. The first pp
    # rank keeps the most micro batches in flight, the last one the logits: both are measured.
    ranks = [0] if layout.pp == 1 else [0, (layout.pp - 1) * layout.dp * layout.tp]
    measured = {rank: _measure_as(cfg, layout, world_size, rank, steps, run_micro) for rank in ranks}
    worst = max(ranks, key=lambda r: sum(by_category(measured[r][1])[1].values()))
    _, peak, per_step = measured[worst]
    stages = {}
    if layout.pp > 1:
        for rank in ranks:
            ids = rank_stages(layout, layout.pp_rank(rank), cfg.parallel.pp_schedule)
            stages[f"pp rank {layout.pp_rank(rank)} (stages {ids})"] = round(
                sum(by_category(measured[rank][1])[1].values()), 3
            )
        notes.append(f"peak of pp rank {layout.pp_rank(worst)}, the larger of the first and the last")

    tracker_gib, memory = by_category(peak)
    total = sum(memory.values())
    allowance = PLANNER.reserved_gb + PLANNER.fragmentation * total
    margin = gpu.hbm_gb - total - allowance
    # The last step is representative (the first one also creates the optimizer state);
    # the micro batches' share scales to the config's accumulation.
    (micro_flops, micro_calls, micro_bytes), (tail_flops, tail_calls, tail_bytes) = per_step[-1]
    scale = accum / run_micro
    collectives = {
        key: {
            "calls": round(micro_calls[key] * scale + tail_calls[key]),
            "gib": round((micro_bytes[key] * scale + tail_bytes[key]) / GIB, 3),
        }
        for key in sorted(set(micro_calls) | set(tail_calls))
    }
    tokens = global_batch * cfg.data.seq_len
    ranks_per_batch = layout.tp * layout.pp  # a tp group, and a pipeline's stages, share a dp rank's work
    flops_step = micro_flops * scale + tail_flops
    return Report(
        config=label,
        world_size=world_size,
        layout=layout.describe(),
        gpu=gpu.name,
        params=counts.param_count(counts.shape_of(cfg.model, cfg.data.seq_len)),
        accum=accum,
        micro_batches_run=run_micro,
        tokens_per_step=tokens,
        memory_gib={k: round(v, 3) for k, v in memory.items()},
        tracker_gib={k: round(v, 3) for k, v in tracker_gib.items()},
        peak_gib=round(total, 3),
        allowance_gib=round(allowance, 3),
        hbm_gib=gpu.hbm_gb,
        fits=margin >= 0,
        margin_gib=round(margin, 3),
        flops_per_step=flops_step,
        flops_estimate=counts.model_flops_per_token(counts.shape_of(cfg.model, cfg.data.seq_len))
        * tokens
        / layout.dp
        / ranks_per_batch,
        collectives=collectives,
        seconds=round(time.perf_counter() - started, 1),
        knobs=_knobs(cfg, layout, memory),
        notes=notes,
        stages_gib=stages,
    )


def _measure_as(cfg: Config, layout: Layout, world_size: int, rank: int, steps: int, micro: int) -> tuple:
    """measure() as `rank` of a fake process group of the job's size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        mesh = build_mesh(layout, "cpu") if world_size > 1 else None
        with warnings.catch_warnings(), _stages_static():
            # DTensor's RNG is CUDA-only; the fake weights' values do not matter here
            warnings.filterwarnings("ignore", message="DTensor random operators")
            return measure(cfg, layout, mesh, steps, micro, fake=True, rank=rank)
    finally:
        dist.destroy_process_group()
        _forget_meshes()


def _forget_meshes() -> None:
    """Drop DTensor's sharding and redistribution caches. They are keyed by mesh, and a mesh
    compares equal to one of the same shape from a destroyed process group: a later dry run
    in this process would reuse plans that name the dead group's collectives. Private, and
    different between torch versions: 2.9 keeps one Python cache and a transform cache, 2.13
    adds a native fast path and redistribution planners."""
    from torch.distributed.tensor import DTensor, _redistribute

    cached = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
    (getattr(cached, "cache_clear", None) or cached.cache.cache_clear)()
    for clear in (
        getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None),
        getattr(_redistribute, "clear_redistribute_planner_cache", None),
        getattr(getattr(_redistribute, "_gen_transform_infos", None), "cache_clear", None),
    ):
        if clear is not None:
            clear()


@contextlib.contextmanager
def _stages_static() -> Iterator[None]:
    """torch 2.13's schedules open with a vote over the pipeline: every stage with static
    metadata votes STATIC, and a stage reads the result from its neighbour. Under the fake
    group nothing arrives, and a fake tensor's value cannot be read; every stratus stage
    has static metadata (pipeline.Activations), so the result is set to what the vote gives.
    (torch 2.9 has no vote.)"""
    from torch.distributed.pipelining import schedules

    mode = getattr(schedules, "InferenceMode", None)
    if mode is None:
        yield
        return

    def static(self, stages, has_backward, p2p_done) -> None:
        for stage in stages:
            stage._inference_mode = mode.STATIC

    with mock.patch.object(schedules._PipelineSchedule, "_warmup_p2p", static):
        yield


class _RepeatedForwards:
    """A pipeline stage runs its forward once per micro batch of a round before their
    backwards. torch's trackers take a root module's second forward for the next iteration
    and refuse it; their per-module records are bookkeeping the dry run does not read (it
    reads the peak, which a reset keeps), so they are started afresh there instead."""

    def _restart_if_repeated(self, module: torch.nn.Module) -> None:
        if module not in self.memory_tracking or self._mod_tracker.is_bw:
            return
        name = self._mod_tracker.get_known_fqn(module)
        if set(self._mod_tracker.parents) - {name} == {"Global"}:
            self.reset_mod_stats()

    def _pre_fw_hook(self, module, inputs) -> None:
        self._restart_if_repeated(module)
        super()._pre_fw_hook(module, inputs)

    def _pre_bw_hook(self, module, args) -> None:
        if module in self.memory_tracking:  # else its record was started afresh since its forward
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module, args) -> None:
        if module in self.memory_tracking:
            super()._post_bw_hook(module, args)

    def _fsdp_state_pre_forward(self, fsdp_mod, orig):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

        def pre_forward(*args, **kwargs):
            self._restart_if_repeated(fsdp_mod)
            return inner(*args, **kwargs)

        return pre_forward


class FSDPTracker(_RepeatedForwards, _LocalOpsOnly, FSDPMemTracker):
    pass


class Tracker(_RepeatedForwards, _LocalOpsOnly, MemTracker):
    pass


@contextlib.contextmanager
def _own_fake_mode_for_dtensor() -> Iterator[None]:
    from torch.distributed.tensor import _sharding_prop

    # create=True: a torch whose propagator does not look for the active mode needs no patch
    with mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *args: None, create=True):
        yield


def _minus(a: tuple, b: tuple) -> tuple[int, Counter, Counter]:
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def by_category(peak: dict) -> tuple[dict[str, float], dict[str, float]]:
    """The tracker's peak snapshot in GiB: as it names the categories, and grouped."""
    snap = next(iter(peak.values()), {})
    tracker_gib = {getattr(k, "value", k): v / GIB for k, v in snap.items() if k != "Total"}
    return tracker_gib, {cat: sum(tracker_gib.get(k, 0.0) for k in keys) for cat, keys in CATEGORIES.items()}


def measure(
    cfg: Config, layout: Layout, mesh: Any, steps: int, micro_batches: int, fake: bool, rank: int = 0
) -> tuple[int, dict, list]:
    """Run `steps` training steps of `micro_batches` each (the first of one, when there are
    more steps: it only has to create the optimizer's state; under pipelining every step is
    one round of the schedule) on this rank, with fake tensors or real ones (a real process
    group then), under torch's memory tracker and the census: (the parameters this rank
    holds, the tracker's peak snapshot, each step's census split into the micro batches'
    part and the clip + optimizer part)."""
    tc, cpu = cfg.train, torch.device("cpu")
    dtype_name = "float32" if tc.dtype == "float32" else "bfloat16"  # a dry run is of a GPU
    dtype, autocast, param_dtype = precision(dtype_name, cpu, layout)
    parts = sharded_model(cfg, layout, mesh, cpu, "meta", param_dtype, rank)
    model = parts.model
    # DTensor works out output placements by running each op on whole-tensor fakes, in
    # the active fake mode if there is one. The tracker and the census skip ops of any
    # mode but the one they were entered in, so DTensor gets a fake mode of its own here;
    # else its whole-tensor shapes would count as this rank's memory and FLOPs.
    with _fake_modes() if fake else contextlib.nullcontext():
        materialize(model, cpu, tc.seed, rank, layout, parts.stage_modules)
        optimizer = build_optimizer(model, tc, cpu)
        pipe = None
        if layout.pp > 1:
            pipe = make_pipeline(cfg, layout, mesh, parts, cpu, micro_batches, dtype, param_dtype)
        tracker = FSDPTracker(model, optimizer) if isinstance(model, FSDPModule) else Tracker()
        if not isinstance(tracker, FSDPMemTracker):
            tracker.track_external(model, optimizer)
        census = Census()
        per_step = []
        loss_context = loss_parallel if cfg.parallel.loss_parallel else contextlib.nullcontext
        with tracker:
            for step in range(steps):
                micro = 1 if step == 0 and steps > 1 and pipe is None else micro_batches
                batches = _micro_batches(
                    tc.micro_batch, cfg.data.seq_len, cfg.model.vocab_size, micro, tracker
                )
                with census:
                    start = census.snapshot()
                    if pipe is None:
                        loss, _ = forward_backward(model, batches, micro, autocast, loss_context)
                    else:
                        scale = 1.0 / (micro * tc.micro_batch * cfg.data.seq_len)
                        loss, _ = pipelined_forward_backward(
                            pipe, batches, autocast, loss_context, False, scale
                        )
                    mid = census.snapshot()
                    update(optimizer, loss, clip(model, tc.grad_clip, pipe.group if pipe else None))
                    end = census.snapshot()
                per_step.append((_minus(mid, start), _minus(end, mid)))
                tracker.reset_mod_stats()
    return model.num_params(), tracker.get_tracker_snapshot("peak"), per_step


@contextlib.contextmanager
def _fake_modes() -> Iterator[None]:
    with FakeTensorMode(allow_non_fake_inputs=True), _own_fake_mode_for_dtensor():
        yield


def _micro_batches(
    micro_batch: int, seq_len: int, vocab: int, count: int, tracker: MemTracker
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fake token batches; between two micro batches (after the previous backward) the
    tracker closes its per-module records, as it needs before a module runs again."""
    for i in range(count):
        if i:
            tracker.reset_mod_stats()
        yield torch.randint(0, vocab, (micro_batch, seq_len)), torch.randint(0, vocab, (micro_batch, seq_len))


def _resolve_vocab(cfg: Config) -> tuple[Config, list[str]]:
    if cfg.model.vocab_size:
        return cfg, []
    try:
        vocab = int(read_manifest(cfg.data.path)["tokenizer"]["vocab_size"])
        source = f"the tokenizer of {cfg.data.path}"
    except StratusError:
        vocab, source = DEFAULT_VOCAB, f"Llama 3's {DEFAULT_VOCAB:,} tokens (no prepared corpus at data.path)"
    cfg = resolve_vocab(cfg, vocab)
    return cfg, [f"model.vocab_size {cfg.model.vocab_size} from {source}"]


def _knobs(cfg: Config, layout: Layout, memory: dict[str, float]) -> list[str]:
    """What would lower the peak, biggest lever first."""
    knobs = []
    pc, tc = cfg.parallel, cfg.train
    if memory["activations"] + memory["temporaries"] >= memory["parameters"] + memory["optimizer"]:
        if pc.activation_checkpoint != "full":
            knobs.append("parallel.activation_checkpoint = full")
        if tc.micro_batch > 1:
            knobs.append(f"train.micro_batch = {tc.micro_batch // 2} (accumulation keeps the global batch)")
        knobs.append("a shorter data.seq_len")
    if layout.dp_replicate > 1:
        knobs.append("parallel.dp_replicate = 1 (shard over every GPU)")
    knobs.append(f"parallel.tp = {layout.tp * 2}" if layout.tp < 8 else "more GPUs")
    return knobs
