"""`stratus plan --explain`: what a prediction rests on. Each term with its value and kind:
physical (a vendor figure, a public benchmark, or counted from the code) or fitted (set on
the Megatron-Core rows of ../shared/reference/planner-calibration.md; docs/planning.md)."""

from __future__ import annotations

from typing import Any

from stratus.plan.efficiency import DEFAULT, Efficiency, terms


def explain_rows(cluster, sw, eff: Efficiency = DEFAULT) -> list[dict[str, Any]]:
    """The terms of a plan on `cluster` with software `sw`; a term `eff` sets apart from the
    defaults (a CPU host's, plan/host.py) is shown as measured on that host."""
    gpu = cluster.gpu
    rows = [
        {
            "term": "gpu.bf16_tflops",
            "value": gpu.bf16_tflops,
            "kind": "physical",
            "what": f"{gpu.name}: dense bf16 peak (vendor)"
            if gpu.compute_bytes == 2
            else f"{gpu.name}: fp32 matmul rate of a rank's cores (measured)",
        },
        {
            "term": "gpu.gemm_fraction",
            "value": gpu.gemm_fraction,
            "kind": "physical",
            "what": "largest share of peak a big bf16 matmul reaches (public benchmark)",
        },
        {
            "term": "gpu.hbm_gbps",
            "value": gpu.hbm_gbps,
            "kind": "physical",
            "what": "HBM bandwidth, GB/s (vendor)",
        },
        {
            "term": "gpu.hbm_gb",
            "value": gpu.hbm_gb,
            "kind": "physical",
            "what": "memory a program can use, GiB",
        },
    ]
    # megatron-core's overlap of tensor-parallel traffic is the one software term calibrated
    overlap_kind = "fitted" if sw.key == "megatron-core" else "physical"
    rows.append(
        {
            "term": f"{sw.key}.tp_overlap",
            "value": sw.tp_overlap,
            "kind": overlap_kind,
            "what": "share of tensor-parallel traffic hidden under compute",
        }
    )
    for row in terms(eff):
        if row["value"] != getattr(DEFAULT, row["term"]):
            row = {**row, "kind": "physical", "what": f"{row['what']} (this host: benchmarks/cpu_entry.py)"}
        rows.append(row)
    if sw.stratus:
        memory = (
            "counted from the code (plan/memory.py), pipelines included; within 5% of the dry "
            "run of the real code (tests/test_plan_memory.py)"
        )
    else:
        memory = "Korthikanti's activations and Megatron's weights, gradients and optimizer state"
    rows.append({"term": "memory", "value": sw.key, "kind": "physical", "what": memory})
    return rows


def render_explain(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="what the prediction rests on (stratus plan --explain)")
    for col in ("term", "value", "kind", "what it is"):
        table.add_column(col, justify="right" if col == "value" else "left", overflow="fold")
    for r in rows:
        table.add_row(r["term"], str(r["value"]), r["kind"], r["what"])
    Console().print(table)
