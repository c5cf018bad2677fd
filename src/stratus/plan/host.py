"""A CPU host as the planner's device: the per-rank figures of a CPU run of stratus.

The cost model speaks of GPUs; a CPU run is R ranks of `threads` threads each on one host,
sharing its cores and its memory bandwidth, computing in fp32 and talking over gloo. Each rank
gets min(threads, cores / R) cores' worth of the measured matmul rate, its share of the copy
bandwidth, and a kernel cost that stretches when ranks outnumber cores. The efficiency terms
that describe a GPU (a benchmark ceiling, NCCL's latency, the caching allocator) give way to
the host's measured figures (benchmarks/cpu_entry.py); the rest stay as `--explain` lists them.
"""

from __future__ import annotations

from dataclasses import replace

from stratus.plan.catalog import Cluster, Cpu, Gpu, Link, Network, Software
from stratus.plan.efficiency import DEFAULT, Efficiency

FP32 = 4


def host_cluster(cpu: Cpu, ranks: int, threads: int, eff: Efficiency = DEFAULT) -> tuple[Cluster, Efficiency]:
    """The host as a one-node cluster of `ranks` devices, and the efficiency it runs at."""
    cores = min(float(threads), cpu.cores / ranks)
    device = Gpu(
        key=cpu.key,
        name=f"{cpu.name}: {cores:g} core{'' if cores == 1 else 's'} a rank",
        bf16_tflops=cpu.fp32_gflops_per_core * cores / 1e3,  # the peak at the compute dtype, fp32
        hbm_gb=cpu.ram_gb / ranks,
        hbm_gbps=min(cpu.core_gbps * cores, cpu.dram_gbps / ranks),
        gemm_fraction=1.0,  # the measured rate is what a large matmul reaches
        link="gloo",
        compute_bytes=FP32,
    )
    # gloo's ring over loopback: bytes_per_s is half of gbps_per_gpu (a link's two directions),
    # and a 2-rank all-reduce takes two hops
    link = Link("gloo", "gloo over loopback", 2 * cpu.gloo_gbps, cpu.gloo_latency_us / 2)
    network = Network("loopback", "one host", 8 * cpu.gloo_gbps, ranks, cpu.gloo_latency_us / 2)
    host_eff = replace(
        eff,
        gemm_half_dim=cpu.gemm_half_dim,
        sustained_fraction=1.0,
        attention_fraction=cpu.attention_fraction,
        kernel_gap_us=cpu.kernel_us / min(1.0, cores),  # Python and dispatch run on one thread
        hbm_fraction=1.0,  # measured as a copy, the way a streaming kernel runs
        nvlink_busbw_fraction=1.0,
        network_busbw_fraction=1.0,
        base_latency_us=0.0,  # in the measured latency
        reserved_gb=cpu.rss_baseline_gb,
        # glibc keeps freed blocks as the caching allocator does: measured 14% over a demo
        # step's peak on one process, up to 25% on FSDP ranks (docs/planning.md); the
        # allocator's default share is kept
    )
    return Cluster(device, link, network, ranks, 1), host_eff


def host_software(sw: Software) -> Software:
    """The framework on a CPU host: gloo copies bytes through sockets with the same cores that
    compute, so no collective hides behind compute, however the framework schedules it."""
    return replace(sw, tp_overlap=0.0, dp_overlap=False, p2p_overlap=False)
