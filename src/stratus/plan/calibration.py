"""The published measurements of ../shared/reference/planner-calibration.md as data, and the
planner's prediction beside each.

Published step times: BLOOM and MT-NLG state seconds per iteration. Megatron-Core and Llama 3
state model TFLOP/s per GPU; their step time is model FLOPs per step / (TFLOP/s x GPUs), with
model FLOPs counted by Korthikanti's formula (Megatron's own; for Llama 3 an assumption, since
the paper does not give its count). Layout knobs a source does not state (micro batch,
interleave, recompute, sharding) are searched, as `stratus plan` does with unpinned flags.

Role: "calibration" rows (Megatron-Core) set the calibrated efficiency parameters; "held-out"
rows were never used to set anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stratus.plan.catalog import Catalog, load_catalog
from stratus.plan.cost import Estimate
from stratus.plan.efficiency import DEFAULT, Efficiency
from stratus.plan.model import ModelShape, model_flops_per_token
from stratus.plan.search import Fixed, search


@dataclass(frozen=True)
class Row:
    source: str
    label: str
    role: str  # "calibration" or "held-out"
    model: ModelShape
    node: str
    nodes: int
    software: str
    global_batch: int
    fixed: Fixed
    step_s: float | None = None  # as published
    tflops: float | None = None  # as published, model TFLOP/s per GPU

    def published_step_s(self, gpus: int) -> float:
        if self.step_s is not None:
            return self.step_s
        assert self.tflops is not None
        flops = self.global_batch * self.model.seq_len * model_flops_per_token(self.model)
        return flops / (self.tflops * 1e12 * gpus)


def _megatron(size: str, heads: int, hidden: int, layers: int, tp: int, pp: int, batch: int, tf: float):
    model = ModelShape(f"gpt-{size}", "gpt", layers, hidden, heads, heads, 4 * hidden, 131072, 4096)
    gpus = tp * pp * 48
    return Row(
        "Megatron-Core r0.8.0 README",
        f"{size} tp{tp} pp{pp} {gpus} H100",
        "calibration",
        model,
        "dgx-h100",
        gpus // 8,
        "megatron-core",
        batch,
        Fixed(tp=tp, pp=pp, dp=48, zero=1),  # the distributed optimizer
        tflops=tf,
    )


LLAMA3_405B = ModelShape("llama3-405b", "llama", 126, 16384, 128, 8, 53248, 128256, 8192)
BLOOM = ModelShape("bloom-176b", "gpt", 70, 14336, 112, 112, 4 * 14336, 250680, 2048, True)
MT_NLG = ModelShape("mt-nlg-530b", "gpt", 105, 20480, 128, 128, 4 * 20480, 51200, 2048, True)

ROWS: list[Row] = [
    _megatron("1.7B", 16, 2048, 24, 1, 1, 192, 408.8),
    _megatron("7.1B", 32, 4096, 30, 2, 1, 192, 465.9),
    _megatron("16B", 48, 6144, 32, 4, 1, 192, 489.1),
    _megatron("32B", 56, 7168, 48, 8, 1, 192, 459.6),
    _megatron("70B", 64, 8192, 84, 8, 2, 384, 419.7),
    _megatron("119B", 80, 10240, 92, 8, 4, 768, 420.5),
    _megatron("177B", 96, 12288, 96, 8, 6, 1152, 432.8),
    _megatron("314B", 128, 16384, 96, 8, 8, 1536, 474.4),
    _megatron("462B", 144, 18432, 112, 8, 16, 3072, 459.9),
    Row(
        "Llama 3 paper, Table 4",
        "405B tp8 pp16 dp64 8,192 H100",
        "held-out",
        LLAMA3_405B,
        "dgx-h100",
        1024,
        "megatron-core",
        2048,
        Fixed(tp=8, pp=16, dp=64),
        tflops=430.0,
    ),
    Row(
        "Llama 3 paper, Table 4",
        "405B tp8 pp16 dp128 16,384 H100",
        "held-out",
        LLAMA3_405B,
        "dgx-h100",
        2048,
        "megatron-core",
        2048,
        Fixed(tp=8, pp=16, dp=128),
        tflops=400.0,
    ),
    Row(
        "BLOOM tr11-176B-ml README",
        "176B tp4 pp12 dp8 384 A100",
        "held-out",
        BLOOM,
        "dgx-a100",
        48,
        "megatron-deepspeed",
        2048,
        Fixed(tp=4, pp=12, dp=8, micro_batch=2, recompute="full", interleave=1, zero=1),
        step_s=105.0,
    ),
    *(
        Row(
            "MT-NLG (Smith et al. 2022)",
            f"530B tp8 pp35 dp{dp} {nodes * 8} A100",
            "held-out",
            MT_NLG,
            "dgx-a100",
            nodes,
            "megatron-deepspeed",
            1920,
            Fixed(tp=8, pp=35, dp=dp, micro_batch=1, recompute="full", interleave=1, zero=1),
            step_s=step,
        )
        for nodes, dp, step in ((280, 8, 60.1), (350, 10, 50.2), (420, 12, 44.4))
    ),
]


@dataclass(frozen=True)
class Comparison:
    row: Row
    published_s: float
    predicted: Estimate

    @property
    def error(self) -> float:
        """Signed relative error of the predicted step time."""
        return self.predicted.step_time_s / self.published_s - 1


def compare(row: Row, catalog: Catalog | None = None, eff: Efficiency = DEFAULT, **software) -> Comparison:
    """The planner's best layout for this row's pinned knobs; `software` overrides profile fields."""
    catalog = catalog or load_catalog(None)
    cluster = catalog.cluster(preset=row.node, nodes=row.nodes)
    sw = catalog.software(row.software)
    if software:
        sw = replace(sw, **{k: v for k, v in software.items() if hasattr(sw, k)})
    fits, over = search(row.model, cluster, sw, row.global_batch, row.fixed, eff)
    best = fits[0] if fits else over[0]
    return Comparison(row, row.published_step_s(cluster.gpus), best)


def table(comparisons: list[Comparison]) -> str:
    """Markdown: every row, published vs predicted, error; then the summary per role."""
    lines = [
        "| role | source | run | layout (searched knobs) | published s | predicted s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lay = c.predicted.candidate
        knobs = f"mb{lay.micro_batch} {lay.recompute} v{lay.interleave} zero{lay.zero}"
        lines.append(
            f"| {c.row.role} | {c.row.source} | {c.row.label} | {knobs} | {c.published_s:.3f} | "
            f"{c.predicted.step_time_s:.3f} | {c.error:+.1%} |"
        )
    lines.append("")
    for role in ("calibration", "held-out"):
        errs = sorted(abs(c.error) for c in comparisons if c.row.role == role)
        if errs:
            med = _median(errs)
            lines.append(f"{role}: {len(errs)} rows, median |error| {med:.1%}, worst {errs[-1]:.1%}")
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


if __name__ == "__main__":
    print(table([compare(r) for r in ROWS]))
