"""The planner's one set of efficiency parameters, shared by every model, GPU and layout.

Each is a physical quantity someone could measure with a micro-benchmark; none is fitted per
published row. `calibrated` marks the five set against the Megatron-Core rows of
../shared/reference/planner-calibration.md (see docs/planning.md); the rest come from vendor
or public benchmark figures. The held-out rows (Llama 3, BLOOM, MT-NLG) were never used to set
any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _term(value: float, kind: str, what: str) -> Any:
    """A parameter with what `stratus plan --explain` says of it: physical (measured or
    published, never fitted to the rows) or fitted (calibrated on the Megatron-Core rows)."""
    return field(default=value, metadata={"kind": kind, "what": what})


@dataclass(frozen=True)
class Efficiency:
    # GEMMs. A matmul whose smallest dimension is n runs at gpu.gemm_fraction x n/(n + gemm_half_dim),
    # normalised to reach the ceiling at GEMM_REF_DIM (where the public ceiling was measured):
    # small or thin matmuls fill fewer SMs and re-read operands more per FLOP. (calibrated)
    gemm_half_dim: float = _term(1024.0, "fitted", "matmul size at which a GEMM reaches half its ceiling")
    # Share of that single-GPU benchmark ceiling sustained through a whole training step: all
    # GPUs of a node under load at once (power and clocks), communication kernels holding SMs
    # and HBM while they overlap compute, and the gaps between dependent kernels. (calibrated)
    sustained_fraction: float = _term(
        0.74, "fitted", "share of the single-GPU GEMM ceiling sustained through a whole step"
    )
    # Flash attention's useful FLOP rate (causal half of the scores) as a share of the sustained
    # GEMM ceiling: softmax, masking and the backward's recompute keep it below a plain matmul.
    # Set from public cuDNN/FlashAttention-2 benchmarks on H100 (~400-450 TFLOP/s forward +
    # backward at head dim 128), not fitted: the Megatron rows cannot tell it from kernel_gap_us.
    attention_fraction: float = _term(
        0.60, "physical", "flash attention's FLOP rate as a share of the GEMM ceiling"
    )
    # HBM bytes that norms, activation functions, residual adds, rotary and dropout move per
    # token per layer, forward + backward, per unit of (hidden + ffn_hidden), with fused kernels;
    # unfused (eager) kernels move UNFUSED_FACTOR times as much. (calibrated)
    elementwise_bytes: float = _term(
        42.0, "fitted", "HBM bytes per token per layer per (h + ffn) moved by elementwise kernels"
    )
    # Share of a framework's tensor-parallel traffic that userbuffer overlap hides is a software
    # property (catalog.toml, software.*.tp_overlap); megatron-core's is calibrated.
    # Idle time per kernel between dependent kernels (launch latency, stream synchronisation),
    # counted KERNELS_PER_LAYER times per block per micro batch; weighs on small models. (calibrated)
    kernel_gap_us: float = _term(40.0, "fitted", "idle time between dependent kernels")
    # Share of HBM bandwidth a streaming kernel reaches (STREAM-like copies on A100/H100).
    hbm_fraction: float = _term(0.85, "physical", "share of HBM bandwidth a streaming kernel reaches")
    # NCCL bus bandwidth as a share of the link's one-way bandwidth, large messages
    # (nccl-tests on DGX H100/A100: ~360 of 450 GB/s NVLink; ~45 of 50 GB/s per NDR port).
    nvlink_busbw_fraction: float = _term(
        0.80, "physical", "NCCL bus bandwidth / NVLink bandwidth, large messages"
    )
    network_busbw_fraction: float = _term(
        0.85, "physical", "NCCL bus bandwidth / network port bandwidth, large messages"
    )
    # NCCL's tuning model (src/graph/tuning.cc): base latency of a Ring/Simple collective.
    base_latency_us: float = _term(8.4, "physical", "NCCL ring base latency per collective")
    # fp32 logits: written, read by softmax, read and written by its backward (bytes per logit).
    cross_entropy_bytes: float = _term(
        16.0, "physical", "HBM bytes per logit in the loss, forward + backward"
    )
    # Adam step per locally owned parameter: read grad, master, m, v (16); write master, m, v (12);
    # write the bf16 copy (2).
    optimizer_bytes: float = _term(30.0, "physical", "HBM bytes per local parameter in the Adam step")
    # Memory allowance: CUDA context, NCCL and cuBLAS workspaces (fixed), plus the caching
    # allocator's fragmentation as a share of everything else.
    reserved_gb: float = _term(2.0, "physical", "memory allowance: CUDA context, NCCL and cuBLAS workspaces")
    fragmentation: float = _term(
        0.10, "physical", "memory allowance: the caching allocator's share of everything else"
    )


GEMM_REF_DIM = 2048.0
KERNELS_PER_LAYER = 60  # forward ~20 (norms, 4 GEMMs, attention, activation, residuals), backward ~40
UNFUSED_FACTOR = 2.0
DEFAULT = Efficiency()


def gemm_efficiency(gemm_fraction: float, m: float, n: float, k: float, eff: Efficiency = DEFAULT) -> float:
    """Fraction of peak a (m x k) @ (k x n) matmul reaches: the chip's ceiling times a size curve."""
    small = min(m, n, k)
    curve = small / (small + eff.gemm_half_dim)
    ref = GEMM_REF_DIM / (GEMM_REF_DIM + eff.gemm_half_dim)
    return gemm_fraction * eff.sustained_fraction * min(1.0, curve / ref)


def terms(eff: Efficiency = DEFAULT) -> list[dict[str, Any]]:
    """Every parameter with its value, kind and meaning, in declaration order."""
    return [{"term": f.name, "value": getattr(eff, f.name), **f.metadata} for f in fields(eff)]
