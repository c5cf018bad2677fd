"""Time to train, failures, checkpoint interval and effective training time ratio (ETTR).

Failures arrive as a Poisson process whose rate grows with the node count. Each one costs a
restart (detect, reschedule, reload: MegaScale reports under 10 + 15 minutes) and the work since
the last checkpoint (half an interval on average). Checkpoints cost their write time. With
interval T, checkpoint cost d, restart R and job MTBF M, the share of wall-clock time that
advances training is, to first order,

    ETTR = 1 / (1 + d/T + (R + (T + d)/2) / M)

and T is set by Daly's higher-order optimum (Young's sqrt(2 d M) to first order).
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


def ettr(interval: float, d: float, restart: float, mtbf: float) -> float:
    return 1.0 / (1.0 + d / interval + (restart + (interval + d) / 2) / mtbf)


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
) -> Reliability:
    mtbf = job_mtbf_s(nodes, failures_per_1000_node_days, mtbf_h)
    d = checkpoint_seconds(params, storage_gbps)
    interval = daly_interval(d, mtbf)
    restart = restart_min * 60
    return Reliability(nodes, mtbf / 3600, d, interval, restart, ettr(interval, d, restart, mtbf))


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
            n, params, failures_per_1000_node_days=rate, restart_min=restart_min, storage_gbps=storage_gbps
        )
        for n in sizes
    ]
