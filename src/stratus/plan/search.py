"""Layout search: every TP x PP x DP x micro batch x recompute x interleave x sharding that the
model and cluster allow, the ones that fit in memory ranked by step time.

Tensor parallelism stays inside a node (its collectives run on every layer, twice per pass);
fixed values from the command line restrict the search and the rest is enumerated.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratus.plan.catalog import Cluster, Software
from stratus.plan.cost import RECOMPUTE, ZERO, Candidate, Estimate, estimate, layout_problem
from stratus.plan.efficiency import DEFAULT, Efficiency
from stratus.plan.model import ModelShape

MICRO_BATCHES = (1, 2, 4, 8, 16)
INTERLEAVES = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True)
class Fixed:
    """Values the user pinned; None = search it."""

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    micro_batch: int | None = None
    recompute: str | None = None
    interleave: int | None = None
    zero: int | None = None
    replicate: int | None = None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _replicas(dp: int, zero: int, sw: Software | None, fixed: Fixed) -> list[int]:
    """HSDP replica counts to try: stratus's FSDP can replicate (dp_replicate); the other
    frameworks' data parallelism is Megatron's."""
    if fixed.replicate:
        return [fixed.replicate] if dp % fixed.replicate == 0 else []
    if zero != 3 or sw is None or not sw.stratus:
        return [1]
    return _divisors(dp)


def candidates(
    m: ModelShape, cluster: Cluster, global_batch: int, fixed: Fixed = Fixed(), sw: Software | None = None
):
    """Every valid layout (by the rules of layout_problem, and the framework's), before memory
    and time."""
    gpus = cluster.gpus
    tps = [fixed.tp] if fixed.tp else [t for t in _divisors(gpus) if t <= cluster.gpus_per_node]
    for tp in tps:
        if gpus % tp:
            continue
        pps = [fixed.pp] if fixed.pp else [p for p in _divisors(gpus // tp) if p <= m.layers]
        for pp in pps:
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if fixed.dp and fixed.dp != dp:
                continue
            mbs = [fixed.micro_batch] if fixed.micro_batch else MICRO_BATCHES
            for mb in mbs:
                if global_batch % (dp * mb):
                    continue
                vs = [fixed.interleave] if fixed.interleave else (INTERLEAVES if pp > 1 else (1,))
                for v in vs:
                    for rc in [fixed.recompute] if fixed.recompute else RECOMPUTE:
                        for z in [fixed.zero] if fixed.zero else (sw.zero_levels if sw else ZERO):
                            for r in _replicas(dp, z, sw, fixed):
                                lay = Candidate.of(tp, pp, dp, mb, rc, v, z, r)  # type: ignore[arg-type]
                                if layout_problem(m, gpus, lay, global_batch, sw) is None:
                                    yield lay


def search(
    m: ModelShape,
    cluster: Cluster,
    sw: Software,
    global_batch: int,
    fixed: Fixed = Fixed(),
    eff: Efficiency = DEFAULT,
) -> tuple[list[Estimate], list[Estimate]]:
    """(layouts that fit, fastest first; those that do not fit, least memory first)."""
    fits, over = [], []
    for lay in candidates(m, cluster, global_batch, fixed, sw):
        e = estimate(m, cluster, sw, lay, global_batch, eff)
        (fits if e.fits else over).append(e)
    fits.sort(key=lambda e: (e.step_time_s, e.memory_gb))
    over.sort(key=lambda e: e.memory_gb)
    return fits, over


def explain_no_layout(
    m: ModelShape,
    cluster: Cluster,
    sw: Software,
    global_batch: int,
    fixed: Fixed,
) -> str:
    """Why nothing fits, and the smallest cluster of the same nodes on which something would."""
    gpus = cluster.gpus
    valid = list(candidates(m, cluster, global_batch, fixed, sw))
    if not valid:
        if fixed.tp or fixed.pp or fixed.dp:
            lay = Candidate.of(
                fixed.tp or 1,
                fixed.pp or 1,
                fixed.dp or gpus // ((fixed.tp or 1) * (fixed.pp or 1)),
                fixed.micro_batch or 1,
                fixed.recompute or "none",  # type: ignore[arg-type]
                fixed.interleave or 1,
                fixed.zero or sw.zero_levels[0],
            )
            reason = layout_problem(m, gpus, lay, global_batch, sw)
            if reason:
                return reason
        return (
            f"no parallel layout of {gpus} GPUs divides global batch {global_batch} and the model's "
            f"heads/layers; try a global batch that is a multiple of the GPU count"
        )
    least = min(estimate(m, cluster, sw, lay, global_batch).memory_gb for lay in valid)
    where = smallest_fitting_nodes(m, cluster, sw, global_batch, fixed)
    msg = (
        f"{m.name} fits on no layout of {gpus} x {cluster.gpu.key}: the leanest layout needs "
        f"{least:.1f} GiB per GPU of {cluster.gpu.hbm_gb:.0f} GiB"
    )
    if where:
        n = where
        msg += (
            f"; the smallest cluster of these nodes that fits is {n} nodes ({n * cluster.gpus_per_node} GPUs)"
        )
    else:
        msg += "; no cluster of up to 65,536 such nodes fits it at this global batch"
    return msg


def _fits_anywhere(m, cluster, sw, global_batch, fixed) -> bool:
    fixed = Fixed(tp=fixed.tp, pp=fixed.pp, micro_batch=fixed.micro_batch, recompute=fixed.recompute)
    return any(
        estimate(m, cluster, sw, lay, global_batch).fits
        for lay in candidates(m, cluster, global_batch, fixed, sw)
    )


def smallest_fitting_nodes(m, cluster, sw, global_batch, fixed, limit: int = 65536) -> int | None:
    """Smallest node count (same node type) with a layout that fits: doubling, then a scan down."""
    from dataclasses import replace

    def ok(n: int) -> bool:
        return _fits_anywhere(m, replace(cluster, nodes=n), sw, global_batch, fixed)

    hi = cluster.nodes
    while hi <= limit and not ok(hi):
        hi *= 2
    if hi > limit:
        return None
    # fits are not strictly monotone (divisibility), so scan the last doubling interval upwards
    lo = max(cluster.nodes + 1, hi // 2 + 1)
    step = max(1, (hi - lo) // 64)
    for n in range(lo, hi, step):
        if ok(n):
            return n
    return hi
