"""Time to train, failures, checkpoint interval and effective training time ratio (ETTR).

Failures arrive as a Poisson process whose rate grows with the node count. Each one costs a
restart (detect, reschedule, reload: MegaScale reports under 10 + 15 minutes) and the work since
the last checkpoint (half an interval on average). Checkpoints cost their write time. With
interval T, checkpoint cost d, restart R and job MTBF M, the share of wall-clock time that
advances training is, to first order,

    ETTR = 1 / (1 + d/T + (R + (T + d)/2) / M)

and T is set by Daly's higher-order optimum (Young's sqrt(2 d M) to first order).

With a node-local tier (checkpoint.local_dir: each node writes its share to its own disk and
copies it to a peer node, so the cost d_l is a node's share over the local bandwidth), a
share c of the failures (a process, a rank, a node replaced at the same size) resumes from
the local tier and loses half a local interval T_l; the rest lose half a global one:

    ETTR = 1 / (1 + d/T + d_l/T_l + (R + c (T_l + d_l)/2 + (1 - c)(T + d)/2) / M)

T_l is Daly's at MTBF M, and T at M / (1 - c): the global tier answers only the failures
the local one cannot, which is the policy the trainer's checkpoint.every = auto follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stratus.errors import StratusError

# Failures per 1,000 node-days. Llama 3 405B: 419 unexpected interruptions in 54 days on 2,048
# nodes = 3.8; Kokolis et al. (HPCA 2025) measured 6.50 and 2.34 on two Meta clusters.
DEFAULT_FAILURES_PER_1000_NODE_DAYS = 3.8
DEFAULT_RESTART_MIN = 15.0  # detection + diagnosis < 10 min, back to pre-crash progress < 15 min
DEFAULT_STORAGE_GBPS = 100.0  # aggregate write bandwidth of a parallel filesystem, GB/s
DEFAULT_LOCAL_COVERS = 0.9  # share of failures the node-local tier recovers (checkpoint.local_covers)
CHECKPOINT_BYTES_PER_PARAM = 14  # bf16 weights (2) + fp32 master copy (4) + Adam moments (8)
VIABLE_ETTR = 0.5  # below this a run spends more time failing than training


@dataclass(frozen=True)
class Reliability:
    nodes: int
    mtbf_h: float
    checkpoint_s: float
    interval_s: float
    restart_s: float
    ettr: float
    local_checkpoint_s: float | None = None  # the node-local tier, when planned
    local_interval_s: float | None = None
    local_covers: float = 0.0

    @property
    def viable(self) -> bool:
        return self.ettr >= VIABLE_ETTR


def young_interval(d: float, mtbf: float) -> float:
    return math.sqrt(2 * d * mtbf)


def daly_interval(d: float, mtbf: float) -> float:
    """Daly (2006): sqrt(2dM)(1 + (1/3) sqrt(d/2M) + (1/9)(d/2M)) - d for d < 2M, else M."""
    if d >= 2 * mtbf:
        return mtbf
    x = d / (2 * mtbf)
    return math.sqrt(2 * d * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - d


def ettr(
    interval: float,
    d: float,
    restart: float,
    mtbf: float,
    local_interval: float | None = None,
    local_d: float = 0.0,
    covers: float = 0.0,
) -> float:
    """The share of wall-clock time that trains; with a local tier, the two-tier formula."""
    saves = d / interval
    lost = (interval + d) / 2
    if local_interval is not None:
        saves += local_d / local_interval
        lost = covers * (local_interval + local_d) / 2 + (1 - covers) * lost
    return 1.0 / (1.0 + saves + (restart + lost) / mtbf)


def job_mtbf_s(nodes: int, failures_per_1000_node_days: float | None, mtbf_h: float | None) -> float:
    """The job's mean time between failures: from a given MTBF, else from the per-node rate."""
    if mtbf_h is not None:
        if mtbf_h <= 0:
            raise StratusError("--mtbf-hours must be positive")
        return mtbf_h * 3600
    rate = failures_per_1000_node_days
    if rate is None:
        rate = DEFAULT_FAILURES_PER_1000_NODE_DAYS
    if rate <= 0:
        raise StratusError("--failures-per-1000-node-days must be positive")
    per_day = rate * nodes / 1000
    return 86400 / per_day


def checkpoint_seconds(params: float, storage_gbps: float) -> float:
    if storage_gbps <= 0:
        raise StratusError("--storage-gbps must be positive")
    return params * CHECKPOINT_BYTES_PER_PARAM / (storage_gbps * 1e9)


def plan_reliability(
    nodes: int,
    params: float,
    *,
    failures_per_1000_node_days: float | None = None,
    mtbf_h: float | None = None,
    restart_min: float = DEFAULT_RESTART_MIN,
    storage_gbps: float = DEFAULT_STORAGE_GBPS,
    local_gbps: float | None = None,
    local_covers: float = DEFAULT_LOCAL_COVERS,
) -> Reliability:
    """With local_gbps (a node's write bandwidth to its local tier), the two-tier plan."""
    mtbf = job_mtbf_s(nodes, failures_per_1000_node_days, mtbf_h)
    d = checkpoint_seconds(params, storage_gbps)
    restart = restart_min * 60
    if local_gbps is None:
        interval = daly_interval(d, mtbf)
        return Reliability(nodes, mtbf / 3600, d, interval, restart, ettr(interval, d, restart, mtbf))
    if local_gbps <= 0:
        raise StratusError("--local-gbps must be positive")
    if not 0 <= local_covers < 1:
        raise StratusError("--local-covers is a share of failures: at least 0 and below 1")
    d_local = checkpoint_seconds(params / nodes, local_gbps)  # each node writes its share at once
    interval, local_interval = daly_interval(d, mtbf / (1 - local_covers)), daly_interval(d_local, mtbf)
    value = ettr(interval, d, restart, mtbf, local_interval, d_local, local_covers)
    return Reliability(nodes, mtbf / 3600, d, interval, restart, value, d_local, local_interval, local_covers)


def training_days(tokens: float, tokens_per_s: float, ettr_value: float) -> float:
    """Wall-clock days: the failure-free time divided by the share of time that trains."""
    return tokens / tokens_per_s / ettr_value / 86400


def expected_failures(
    days: float, nodes: int, failures_per_1000_node_days: float | None, mtbf_h: float | None
) -> float:
    return days * 86400 / job_mtbf_s(nodes, failures_per_1000_node_days, mtbf_h)


def ettr_table(
    nodes_now: int,
    params: float,
    *,
    failures_per_1000_node_days: float | None = None,
    mtbf_h: float | None = None,
    restart_min: float = DEFAULT_RESTART_MIN,
    storage_gbps: float = DEFAULT_STORAGE_GBPS,
    local_gbps: float | None = None,
    local_covers: float = DEFAULT_LOCAL_COVERS,
    max_nodes: int = 65536,
) -> list[Reliability]:
    """ETTR from 1 node to `max_nodes` in powers of two, plus this cluster's size. A fixed MTBF
    (--mtbf-hours) describes this cluster; other sizes scale it by the node count."""
    sizes = sorted({2**k for k in range(0, int(math.log2(max_nodes)) + 1)} | {nodes_now})
    rate = failures_per_1000_node_days
    if mtbf_h is not None:  # convert the given job MTBF into a per-node rate, to scale it
        rate = 1000 * 24 / (mtbf_h * nodes_now)
    return [
        plan_reliability(
            n,
            params,
            failures_per_1000_node_days=rate,
            restart_min=restart_min,
            storage_gbps=storage_gbps,
            local_gbps=local_gbps,
            local_covers=local_covers,
        )
        for n in sizes
    ]
