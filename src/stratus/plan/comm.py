"""Collective and point-to-point times by the alpha-beta model (latency + bytes / bandwidth).

A process group is described by its size and by how many of its ranks share a node (ranks are
numbered TP innermost, then DP, then PP, as Megatron and torchtitan lay them out). Inside a
node a ring runs over NVLink. Across nodes each GPU drives its own network port (rail-optimised
nodes), so a group with r ranks per node has r ports per node; NCCL's choice among ring, tree
and hierarchical (reduce inside the node, then across nodes) is modelled by taking the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stratus.plan.catalog import Cluster
from stratus.plan.efficiency import DEFAULT, Efficiency

Kind = Literal["all_reduce", "reduce_scatter", "all_gather"]


@dataclass(frozen=True)
class Group:
    size: int
    per_node: int  # ranks of this group on one node

    @property
    def nodes(self) -> int:
        return max(1, self.size // self.per_node)


def group_for(size: int, stride: int, gpus_per_node: int) -> Group:
    """The group of `size` ranks spaced `stride` apart (stride = product of the inner dimensions)."""
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return Group(size, per_node)


def _bandwidths(cluster: Cluster, group: Group, eff: Efficiency) -> tuple[float, float]:
    """Bus bandwidth (bytes/s) inside a node and across nodes for this group, per rank."""
    intra = cluster.link.bytes_per_s * eff.nvlink_busbw_fraction
    ports_per_gpu = cluster.network.ports_per_node / cluster.gpus_per_node
    inter = cluster.network.port_bytes_per_s * ports_per_gpu * eff.network_busbw_fraction
    return intra, inter


def collective_time(
    kind: Kind, nbytes: float, group: Group, cluster: Cluster, eff: Efficiency = DEFAULT
) -> float:
    """Seconds for one collective over `nbytes` (the full buffer, as nccl-tests counts size)."""
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    base = eff.base_latency_us * 1e-6
    intra_bw, inter_bw = _bandwidths(cluster, group, eff)
    nvl_hop = cluster.link.hop_latency_us * 1e-6
    net_hop = cluster.network.hop_latency_us * 1e-6
    if group.nodes == 1:
        return base + steps * nvl_hop + factor * nbytes / intra_bw
    r, k = group.per_node, group.nodes
    # flat ring: every step waits on the slowest hop; r ports per node share the crossing traffic
    ring_bw = min(intra_bw, r * inter_bw)
    times = [base + steps * net_hop + factor * nbytes / ring_bw]
    # hierarchical: inside the node on NVLink, then across nodes on 1/r of the data per port
    inner = 2 * (r - 1) / r if kind == "all_reduce" else (r - 1) / r
    outer = 2 * (k - 1) / k if kind == "all_reduce" else (k - 1) / k
    outer_steps = 2 * (k - 1) if kind == "all_reduce" else k - 1
    inner_steps = 2 * (r - 1) if kind == "all_reduce" else r - 1
    times.append(
        2 * base
        + inner_steps * nvl_hop
        + outer_steps * net_hop
        + inner * nbytes / intra_bw
        + outer * nbytes / r / inter_bw
    )
    if kind == "all_reduce":  # NCCL's double binary tree across nodes: log-depth latency
        depth = math.ceil(math.log2(k))
        times.append(
            2 * base
            + 2 * (r - 1) * nvl_hop
            + 2 * depth * net_hop
            + inner * nbytes / intra_bw
            + 2 * nbytes / r / inter_bw
        )
    return min(times)


def p2p_time(nbytes: float, crosses_nodes: bool, cluster: Cluster, eff: Efficiency = DEFAULT) -> float:
    """One pipeline send/receive between neighbouring stages."""
    if nbytes <= 0:
        return 0.0
    if crosses_nodes:
        bw = cluster.network.port_bytes_per_s * eff.network_busbw_fraction
        bw *= cluster.network.ports_per_node / cluster.gpus_per_node
        return eff.base_latency_us * 1e-6 + cluster.network.hop_latency_us * 1e-6 + nbytes / bw
    bw = cluster.link.bytes_per_s * eff.nvlink_busbw_fraction
    return eff.base_latency_us * 1e-6 + cluster.link.hop_latency_us * 1e-6 + nbytes / bw
