"""Step time, memory and MFU of one parallel layout: the analytical cost model.

One optimizer step on the bottleneck pipeline stage is

    step = (m + (p - 1)/v) x t_microbatch          1F1B pipeline with its bubble (v = interleave)
         + exposed pipeline send/receive
         + exposed data-parallel reduce-scatter / all-gather (what backward/forward did not hide)
         + optimizer update (memory-bound)

and t_microbatch is forward + backward (+ recompute) of that stage's layers for one micro batch:
GEMMs at a shape-dependent efficiency, attention, memory-bound elementwise kernels, and the
tensor-parallel collectives the framework does not overlap. Units: seconds, bytes, FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from stratus.distributed.layout import Layout
from stratus.errors import StratusError
from stratus.plan import model as M
from stratus.plan.catalog import Cluster, Gpu, Software
from stratus.plan.comm import collective_time, group_for, p2p_time
from stratus.plan.efficiency import DEFAULT, KERNELS_PER_LAYER, UNFUSED_FACTOR, Efficiency, gemm_efficiency
from stratus.plan.memory import stratus_memory, stratus_pipeline_memory
from stratus.plan.model import ModelShape, Recompute

RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")
# 1: optimizer state sharded over DP (Megatron's distributed optimizer, ZeRO-1); 2: gradients too,
# reduce-scattered every micro batch; 3: weights too (FSDP / ZeRO-3), gathered for every pass
ZERO = (1, 2, 3)


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a parallel layout (the trainer's own type, so a plan is a
    layout stratus can be given) with the step's other choices."""

    layout: Layout
    micro_batch: int
    recompute: Recompute = "none"
    zero: int = 1

    @classmethod
    def of(
        cls,
        tp: int,
        pp: int,
        dp: int,
        micro_batch: int,
        recompute: Recompute = "none",
        interleave: int = 1,
        zero: int = 1,
        replicate: int = 1,
    ) -> Candidate:
        """Megatron's vocabulary: dp data-parallel ranks (sharded or not, as zero says); under
        HSDP, `replicate` replicas of dp / replicate FSDP ranks each."""
        return cls(Layout(replicate, dp // replicate, tp, pp, interleave), micro_batch, recompute, zero)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def replicate(self) -> int:
        return self.layout.dp_replicate

    @property
    def interleave(self) -> int:
        return self.layout.stages_per_rank

    @property
    def gpus(self) -> int:
        return self.layout.world_size


@dataclass
class Estimate:
    candidate: Candidate
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (no recompute) per second per GPU, as Megatron reports
    mfu: float
    memory_gb: float
    fits: bool
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per step
    memory: dict[str, float] = field(default_factory=dict)  # GiB per GPU

    def as_dict(self) -> dict[str, Any]:
        lay = self.candidate
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "dp": lay.dp,
            "dp_replicate": lay.replicate,
            "micro_batch": lay.micro_batch,
            "recompute": lay.recompute,
            "interleave": lay.interleave,
            "zero": lay.zero,
            "step_time_s": round(self.step_time_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tflops_per_gpu": round(self.tflops_per_gpu, 2),
            "mfu": round(self.mfu, 4),
            "memory_gb_per_gpu": round(self.memory_gb, 2),
            "fits": self.fits,
            "breakdown": {k: round(v, 6) for k, v in self.breakdown.items()},
            "memory": {k: round(v, 3) for k, v in self.memory.items()},
        }


def layout_problem(
    m: ModelShape, gpus: int, layout: Candidate, global_batch: int, sw: Software | None = None
) -> str | None:
    """Why this layout cannot run this model (in this framework), or None. The search skips;
    the CLI reports."""
    t, p, d, b, v = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.interleave
    if min(t, p, d, b, v) < 1:
        return "tp, pp, dp, micro batch and interleave must be at least 1"
    if t * p * d != gpus:
        return f"tp x pp x dp = {t} x {p} x {d} = {t * p * d}, but the cluster has {gpus} GPUs"
    if m.heads % t or m.kv_heads % t:
        return f"tp {t} must divide the attention heads ({m.heads}) and KV heads ({m.kv_heads})"
    if m.ffn_hidden % t:
        return f"tp {t} must divide the MLP width ({m.ffn_hidden})"
    if p > m.layers:
        return f"pp {p} is more than the {m.layers} layers"
    if global_batch % (d * b):
        return f"global batch {global_batch} is not a multiple of dp x micro batch = {d} x {b}"
    if layout.replicate > 1 and (layout.zero != 3 or (sw is not None and not sw.stratus)):
        return "dp replicas (HSDP) are FSDP's, in stratus: zero 3 under --software stratus"
    if v > 1:
        if p == 1:
            return "interleave > 1 needs pp > 1"
        if v > m.layers // p:
            return f"interleave {v} leaves a model chunk with no layer ({m.layers} layers over pp {p})"
        if (global_batch // (d * b)) % p:
            return "interleaved 1F1B needs the micro batches per step to be a multiple of pp"
    if layout.recompute not in RECOMPUTE:
        return f"recompute must be one of {', '.join(RECOMPUTE)}"
    if layout.zero not in ZERO:
        return "zero must be 1 (optimizer state sharded), 2 (and gradients) or 3 (FSDP: and weights)"
    if sw is not None and layout.zero not in sw.zero_levels:
        return f"{sw.key} shards at ZeRO {' or '.join(map(str, sw.zero_levels))}, not {layout.zero}"
    if sw is not None and sw.stratus:
        return _stratus_problem(m, layout, global_batch)
    return None


def _stratus_problem(m: ModelShape, c: Candidate, global_batch: int) -> str | None:
    """What stratus's own layout checks say of the candidate (they run on every rank before
    `stratus train` joins a group): the planner proposes only what the trainer accepts."""
    from stratus.counts import model_config_of
    from stratus.distributed.layout import pipeline_rounds, resolve_layout
    from stratus.plan.emit import parallel_config

    pc = parallel_config(c)
    try:
        layout = resolve_layout(pc, c.gpus, model_config_of(m))
        pipeline_rounds(layout, pc, global_batch // (layout.dp * c.micro_batch))
    except StratusError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class _LayerTimes:
    fwd: float  # compute, one layer, one micro batch
    bwd: float
    recompute: float
    tp_fwd: float  # tensor-parallel collectives before overlap
    tp_bwd: float
    tp_recompute: float


def _gemm(flops_m: float, n: float, k: float, gpu: Gpu, hbm: float, eff) -> float:
    """Roofline of one matmul: the slower of its compute at the shape's efficiency and its HBM traffic."""
    flops = 2 * flops_m * n * k
    compute = flops / (gpu.peak_flops * gemm_efficiency(gpu.gemm_fraction, flops_m, n, k, eff))
    traffic = gpu.compute_bytes * (flops_m * k + k * n + flops_m * n) / hbm
    return max(compute, traffic)


@lru_cache(maxsize=65536)
def _layer_times(
    m: ModelShape, cluster: Cluster, sw: Software, tp: int, micro_batch: int, recompute: str, eff: Efficiency
) -> _LayerTimes:
    gpu = cluster.gpu
    peak, frac, a = gpu.peak_flops, gpu.gemm_fraction, gpu.compute_bytes
    hbm = gpu.hbm_gbps * 1e9 * eff.hbm_fraction
    T = micro_batch * m.seq_len  # tokens in the micro batch
    h, f, s = m.hidden, m.ffn_hidden, m.seq_len
    up = (2 if m.gated else 1) * f
    gemms = [(T, (h + 2 * m.kv_dim) / tp, h), (T, h, h / tp), (T, up / tp, h), (T, h, f / tp)]
    g_fwd = sum(_gemm(rows, n, k, gpu, hbm, eff) for rows, n, k in gemms)
    # attention core, forward: QK^T and AV over all s keys = 4 T s h / tp FLOPs
    heads = m.heads / tp
    attn_flops = 4 * T * s * h / tp
    if sw.flash_attention:
        rate = peak * frac * eff.sustained_fraction * eff.attention_fraction
        a_fwd = 0.5 * attn_flops / rate  # causal: blocks above the diagonal are skipped
        a_bwd = 2.5 * a_fwd  # the backward recomputes the scores: 5 matmuls to the forward's 2
        a_recompute = 0.0  # nothing of the attention core is stored, nothing to recompute
    else:  # scores materialised: batched (s x d_head) @ (d_head x s) matmuls plus softmax traffic
        per = _gemm(s, s, m.head_dim, gpu, hbm, eff) * micro_batch * heads
        score_bytes = a * micro_batch * heads * s * s
        passes = 4 + (3 if m.arch == "gpt" else 0)  # write, softmax read+write, read for AV (+ dropout)
        a_fwd = 2 * per + passes * score_bytes / hbm
        a_bwd = 2 * a_fwd
        a_recompute = a_fwd if recompute == "selective" else 0.0
    # memory-bound elementwise kernels (bytes counted at bf16); with SP the hidden-sized ones
    # run on T/tp tokens
    e_bytes = eff.elementwise_bytes * (1 if sw.fused_elementwise else UNFUSED_FACTOR) * a / 2
    h_split = tp if sw.sequence_parallel else 1
    elem = e_bytes * T * (h / h_split + f / tp) / hbm
    e_fwd, e_bwd = elem / 3, 2 * elem / 3
    gap = KERNELS_PER_LAYER * eff.kernel_gap_us * 1e-6
    fwd = g_fwd + a_fwd + e_fwd + gap / 3
    bwd = 2 * g_fwd + a_bwd + e_bwd + 2 * gap / 3
    if recompute == "full":
        rec = fwd
    elif recompute == "selective":  # attention core (without flash), or norms + activation function
        rec = a_recompute + (0.0 if not sw.flash_attention else 0.5 * e_fwd)
    else:
        rec = 0.0
    # tensor parallel: with SP 2 all-gathers + 2 reduce-scatters of (T, h) per pass; without SP
    # 2 all-reduces (the same bytes). The backward mirrors the forward.
    tp_fwd = 0.0
    if tp > 1:
        group = group_for(tp, 1, cluster.gpus_per_node)
        act = a * T * h
        tp_fwd = 2 * (
            collective_time("all_gather", act, group, cluster, eff)
            + collective_time("reduce_scatter", act, group, cluster, eff)
        )
    tp_rec = tp_fwd if recompute == "full" else 0.0
    return _LayerTimes(fwd, bwd, rec, tp_fwd, tp_fwd, tp_rec)


def _head_time(m: ModelShape, cluster: Cluster, sw: Software, tp: int, micro_batch: int, eff) -> float:
    """Output projection + cross-entropy (forward + backward) on the last stage, one micro batch."""
    gpu = cluster.gpu
    hbm = gpu.hbm_gbps * 1e9 * eff.hbm_fraction
    T = micro_batch * m.seq_len
    logits = _gemm(T, m.vocab / tp, m.hidden, gpu, hbm, eff)
    ce = eff.cross_entropy_bytes * T * m.vocab / tp / hbm
    t = 3 * logits + ce
    if tp > 1:
        group = group_for(tp, 1, cluster.gpus_per_node)
        t += 2 * collective_time("all_gather", gpu.compute_bytes * T * m.hidden, group, cluster, eff)
    return t


def head_share(m: ModelShape) -> float:
    """The output layer's work in blocks (by FLOPs), to place it in the pipeline."""
    return M.head_forward_flops_per_token(m) / M.layer_forward_flops_per_token(m)


def stage_layers(m: ModelShape, pp: int, head_layers: float) -> tuple[int, int, int]:
    """Layers on (the first stage, each middle stage at most, the last stage).

    The last stage also runs the output layer, worth `head_layers` blocks, so layers are placed
    to balance that (uneven stages, as Megatron's and Llama 3's pipelines allow). Among equally
    fast placements the first stage gets the fewest layers: it holds the most micro batches in
    flight (1F1B warm-up), as Llama 3 did. Interleaving cuts each stage's layers into chunks.
    """
    L = m.layers
    if pp == 1:
        return L, 0, L
    best: tuple[float, int, int, int, int] | None = None
    for last in range(1, L - pp + 2):
        rest = L - last
        if pp == 2:
            first, middle = rest, 0
        else:
            middle = -(-rest // (pp - 1))
            first = rest - (pp - 2) * middle
            if first < 1:
                continue
        load = max(first, middle, last + head_layers)
        key = (round(load, 9), first, -last, middle, last)
        if best is None or key < best:
            best = key
    assert best is not None
    _, first, _, middle, last = best
    return first, middle, last


def estimate(
    m: ModelShape,
    cluster: Cluster,
    sw: Software,
    layout: Candidate,
    global_batch: int,
    eff: Efficiency = DEFAULT,
) -> Estimate:
    problem = layout_problem(m, cluster.gpus, layout, global_batch, sw)
    if problem:
        raise StratusError(problem)
    t, p, d, b, v = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.interleave
    a = cluster.gpu.compute_bytes
    micro_batches = global_batch // (d * b)
    lt = _layer_times(m, cluster, sw, t, b, layout.recompute, eff)
    head = _head_time(m, cluster, sw, t, b, eff)
    layer_total = lt.fwd + lt.bwd + lt.recompute
    exposed_tp = (1 - sw.tp_overlap) * (lt.tp_fwd + lt.tp_bwd + lt.tp_recompute)
    per_layer = layer_total + exposed_tp
    first, middle, last = stage_layers(m, p, head_share(m))
    # one micro batch through the bottleneck stage (forward + backward), and its layer count
    t_mb, layers_mb = last * per_layer + head, last
    if max(first, middle) * per_layer > t_mb:
        layers_mb = max(first, middle)
        t_mb = layers_mb * per_layer
    tp_mb = layers_mb * exposed_tp
    compute_mb = t_mb - tp_mb
    pipeline = (micro_batches + (p - 1) / v) * t_mb
    bubble = (p - 1) / v * t_mb

    # pipeline sends/receives: activations (T, h), split over TP ranks with SP (scatter-gather)
    exposed_p2p = 0.0
    if p > 1:
        act = a * b * m.seq_len * m.hidden / (t if sw.sequence_parallel else 1)
        crosses = t * d >= cluster.gpus_per_node
        one = p2p_time(act, crosses, cluster, eff)
        hops = 2 * (p - 1) if sw.p2p_overlap else 2 * (micro_batches * v + p - 1)
        exposed_p2p = hops * one

    # data parallel over the largest stage's parameters
    layer_p = M.layer_params(m)
    embed = m.vocab * m.hidden
    stage_params = max(first, middle, last) * layer_p + embed if p > 1 else M.param_count(m)
    local = stage_params / t
    # FSDP's collectives run inside a replica (HSDP; the mesh is pp x replicate x shard x tp)
    shards = layout.layout.dp_shard
    group = group_for(shards, t, cluster.gpus_per_node)
    rs = collective_time("reduce_scatter", local * sw.grad_bytes, group, cluster, eff)
    ag = collective_time("all_gather", local * a, group, cluster, eff)
    fwd_mb = layers_mb * (lt.fwd + (1 - sw.tp_overlap) * lt.tp_fwd)
    bwd_mb = t_mb - fwd_mb
    if sw.stratus and p > 1:
        # a stratus stage gathers its parameters once a round and reduce-scatters its whole
        # gradients after the round's last backward (plan/memory.py holds the same)
        exposed_dp = max(0.0, rs - bwd_mb) + max(0.0, ag - fwd_mb) if sw.dp_overlap else rs + ag
    elif layout.zero == 1:
        # with overlap, grads reduce during the last backward and params gather during the first forward
        exposed_dp = max(0.0, rs - bwd_mb) + max(0.0, ag - fwd_mb) if sw.dp_overlap else rs + ag
    elif layout.zero == 2:  # gradients reduce-scattered after every micro batch's backward
        if sw.dp_overlap:
            exposed_dp = micro_batches * max(0.0, rs - bwd_mb) + max(0.0, ag - fwd_mb)
        else:
            exposed_dp = micro_batches * rs + ag
    else:  # FSDP: gather for forward and again for backward, reduce-scatter, every micro batch
        if sw.dp_overlap:
            exposed_dp = micro_batches * (max(0.0, ag - fwd_mb) + max(0.0, ag + rs - bwd_mb))
        else:
            exposed_dp = micro_batches * (2 * ag + rs)
    if layout.replicate > 1:
        # HSDP: the replicas all-reduce their gradient shards once a step, in the last
        # backward (train/step.py: set_requires_all_reduce on the last micro batch)
        across = group_for(layout.replicate, t * shards, cluster.gpus_per_node)
        ar = collective_time("all_reduce", local / shards * sw.grad_bytes, across, cluster, eff)
        exposed_dp += max(0.0, ar - bwd_mb) if sw.dp_overlap else ar
    hbm = cluster.gpu.hbm_gbps * 1e9 * eff.hbm_fraction
    optimizer = local / shards * eff.optimizer_bytes / hbm

    step = pipeline + exposed_p2p + exposed_dp + optimizer
    tokens = global_batch * m.seq_len
    model_flops = tokens * M.model_flops_per_token(m)
    tflops = model_flops / step / cluster.gpus / 1e12
    memory = memory_per_gpu(m, cluster, sw, layout, micro_batches, (first, middle, last), eff)
    total = memory["total"]
    breakdown = {
        "compute": micro_batches * compute_mb,  # includes recompute and the output layer
        "tp_comm": micro_batches * tp_mb,
        "pipeline_bubble": bubble,
        "pp_comm": exposed_p2p,
        "dp_comm": exposed_dp,
        "optimizer": optimizer,
    }
    return Estimate(
        candidate=layout,
        step_time_s=step,
        tokens_per_s=tokens / step,
        tflops_per_gpu=tflops,
        mfu=tflops * 1e12 / cluster.gpu.peak_flops,
        memory_gb=total,
        fits=total <= cluster.gpu.hbm_gb,
        breakdown=breakdown,
        memory=memory,
    )


def memory_per_gpu(
    m: ModelShape,
    cluster: Cluster,
    sw: Software,
    layout: Candidate,
    micro_batches: int,
    stages: tuple[int, int, int],
    eff: Efficiency = DEFAULT,
) -> dict[str, float]:
    """GiB per GPU on the fullest stage: the first (most micro batches in flight), the second
    (one fewer, but maybe more layers) or the last (the output layer and its logits).

    stratus is counted as it runs (plan/memory.py); the other frameworks by Korthikanti's
    and Megatron's accounting."""
    t, p, d, b, v = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.interleave
    a = cluster.gpu.compute_bytes
    if sw.stratus:
        # stratus as it runs (plan/memory.py), checked against the dry run of the real code;
        # a plan's pipeline runs all of a step's micro batches in one round (emit.py)
        if p == 1:
            held = stratus_memory(m, layout.layout, b, layout.recompute, micro_batches, eff=eff, act_bytes=a)
        else:
            held = stratus_pipeline_memory(
                m, layout.layout, b, layout.recompute, micro_batches, "1f1b", eff, act_bytes=a
            )
        return {
            "weights": held["parameters"],
            "grads": held["gradients"],
            "optimizer": held["optimizer"],
            "activations": held["activations"],
            "temporaries": held["temporaries"],
            "allowance": held["allowance"],
            "total": held["total"],
        }
    first, middle, last = stages
    layer_p = M.layer_params(m)
    embed = m.vocab * m.hidden
    act_layer = M.activation_bytes_per_layer(
        m, b, t, layout.recompute, sw.sequence_parallel, sw.flash_attention
    )
    working = 0.0
    if layout.recompute == "full":  # the block being recomputed holds its whole activation set
        working = M.activation_bytes_per_layer(m, b, t, "none", sw.sequence_parallel, sw.flash_attention)
    # 1F1B: stage i holds p - i micro batches in flight; interleaving adds (p-1)/(p v) (Korthikanti)
    extra = 1 + (p - 1) / (p * v) if v > 1 else 1.0
    if p == 1:
        candidates = [(m.layers, 1, True, M.param_count(m))]
    else:
        candidates = [(first, min(micro_batches, p) * extra, False, first * layer_p + embed)]
        if p > 2:
            candidates.append((middle, min(micro_batches, p - 1) * extra, False, middle * layer_p))
        candidates.append((last, 1, True, last * layer_p + embed))
    stages_mem = []
    for layers, flight, is_last, stage_params in candidates:
        params = stage_params / t
        acts = layers * act_layer * flight + working
        if is_last:
            acts += M.logits_bytes(m, b, t)
        if layout.zero == 1:
            weights, grads, opt = 2 * params, sw.grad_bytes * params, 12 * params / d
        elif layout.zero == 2:  # plus one bucket of unreduced gradients (a block's worth)
            weights, opt = 2 * params, 12 * params / d
            grads = sw.grad_bytes * (params / d + layer_p / t)
        else:  # FSDP keeps shards, plus the gathered weights of two blocks (current + prefetched)
            full = 2 * layer_p / t
            weights = 2 * params / d + 2 * full
            grads = sw.grad_bytes * params / d + sw.grad_bytes * layer_p / t
            opt = 12 * params / d
        stages_mem.append((weights, grads, opt, acts))
    weights, grads, opt, acts = max(stages_mem, key=sum)
    gb = 2**30  # GiB, the unit of the catalog's hbm_gb and of nvidia-smi
    dynamic = (weights + grads + opt + acts) / gb
    allowance = eff.reserved_gb + eff.fragmentation * dynamic
    return {
        "weights": weights / gb,
        "grads": grads / gb,
        "optimizer": opt / gb,
        "activations": acts / gb,  # the logits included
        "temporaries": 0.0,
        "allowance": allowance,
        "total": dynamic + allowance,
    }
