"""What `stratus plan` prints: a human table (rich), one JSON object, or a PNG (matplotlib Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratus.atomic import atomic_file
from stratus.errors import StratusError
from stratus.plan.catalog import Cluster, Software
from stratus.plan.cost import Estimate
from stratus.plan.model import ModelShape
from stratus.plan.reliability import Reliability

# The documented --json shape (docs/planning.md). Layout entries carry the keys plus
# zero, tokens_per_s and memory (the memory breakdown); tests validate against this.
LAYOUT_KEYS = {
    "tp": int,
    "pp": int,
    "dp": int,
    "dp_replicate": int,
    "micro_batch": int,
    "recompute": str,
    "interleave": int,
    "zero": int,
    "step_time_s": float,
    "tokens_per_s": float,
    "tflops_per_gpu": float,
    "mfu": float,
    "memory_gb_per_gpu": float,
    "fits": bool,
    "breakdown": dict,
    "memory": dict,
}
BREAKDOWN_KEYS = ("compute", "tp_comm", "pipeline_bubble", "pp_comm", "dp_comm", "optimizer")
MEMORY_KEYS = ("weights", "grads", "optimizer", "activations", "temporaries", "allowance", "total")
TOP_KEYS = (
    "model",
    "cluster",
    "layouts",
    "best",
    "training_days",
    "checkpoint_interval_min",
    "local_checkpoint_interval_min",
    "ettr",
)


@dataclass
class Plan:
    model: ModelShape
    cluster: Cluster
    software: Software
    global_batch: int
    tokens: float | None
    layouts: list[Estimate]
    reliability: Reliability
    table: list[Reliability]
    training_days: float | None
    failures: float | None


def label(c) -> str:
    """A layout in one line; HSDP's data parallelism as replicas x shards."""
    dp = f"dp{c.replicate}x{c.dp // c.replicate}" if c.replicate > 1 else f"dp{c.dp}"
    return f"tp{c.tp} pp{c.pp} {dp} mb{c.micro_batch} {c.recompute} v{c.interleave} z{c.zero}"


def to_json(plan: Plan) -> dict[str, Any]:
    layouts = [e.as_dict() for e in plan.layouts]
    cluster = plan.cluster.describe() | {"software": plan.software.key, "global_batch": plan.global_batch}
    return {
        "model": plan.model.describe(),
        "cluster": cluster,
        "layouts": layouts,
        "best": layouts[0],
        "training_days": None if plan.training_days is None else round(plan.training_days, 3),
        "checkpoint_interval_min": round(plan.reliability.interval_s / 60, 2),
        "local_checkpoint_interval_min": None
        if plan.reliability.local_interval_s is None
        else round(plan.reliability.local_interval_s / 60, 2),
        "ettr": round(plan.reliability.ettr, 4),
    }


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(plan: Plan, console=None) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))
    m, c = plan.model, plan.cluster
    params = m.describe()["params"]
    console.print(
        f"[bold]{m.name}[/]: {params / 1e9:.1f}B parameters, {m.layers} layers, hidden {m.hidden}, "
        f"{m.heads} heads ({m.kv_heads} KV), sequence {m.seq_len}, vocabulary {m.vocab:,}"
    )
    console.print(
        f"cluster: {c.nodes} nodes x {c.gpus_per_node} {c.gpu.name} = {c.gpus:,} GPUs, {c.network.name}; "
        f"software: {plan.software.name}; global batch {plan.global_batch:,} sequences "
        f"({plan.global_batch * m.seq_len / 1e6:.2f}M tokens)"
    )
    t = Table(title=f"best {len(plan.layouts)} layouts that fit, fastest first")
    for col in ("layout", "step", "tokens/s", "TFLOP/s", "MFU", "GiB/GPU"):
        t.add_column(col, justify="right")
    t.add_column("compute / tp / bubble / pp / dp / optim", justify="right", style="dim")
    for e in plan.layouts:
        lay, b = e.candidate, e.breakdown
        t.add_row(
            label(lay),
            _fmt_s(e.step_time_s),
            f"{e.tokens_per_s:,.0f}",
            f"{e.tflops_per_gpu:.0f}",
            f"{e.mfu:.1%}",
            f"{e.memory_gb:.1f}",
            " / ".join(f"{b[k] / e.step_time_s:.0%}" for k in BREAKDOWN_KEYS),
        )
    console.print(t)
    best, r = plan.layouts[0], plan.reliability
    mem = best.memory
    console.print(
        "memory of the best layout (GiB per GPU): "
        + ", ".join(f"{k} {mem[k]:.1f}" for k in MEMORY_KEYS)
        + f" of {c.gpu.hbm_gb:.0f}"
    )
    console.print(
        f"failures: job MTBF {r.mtbf_h:.1f} h; checkpoint {r.checkpoint_s:.0f} s to write, every "
        f"{r.interval_s / 60:.0f} min (Daly); restart {r.restart_s / 60:.0f} min; ETTR {r.ettr:.1%}"
    )
    if r.local_interval_s is not None:
        console.print(
            f"node-local tier: {r.local_checkpoint_s:.1f} s to write a node's share, every "
            f"{r.local_interval_s / 60:.1f} min, recovering {r.local_covers:.0%} of failures; the global "
            f"tier above answers the rest"
        )
    if plan.training_days is not None and plan.tokens:
        console.print(
            f"[bold]{plan.tokens / 1e9:,.0f}B tokens: {plan.training_days:.1f} days[/] at "
            f"{best.tokens_per_s:,.0f} tokens/s and ETTR {r.ettr:.1%}, about {plan.failures:.0f} failures"
        )
    et = Table(title="ETTR against cluster size (same nodes, same failure rate per node)")
    for col in ("nodes", "GPUs", "job MTBF", "checkpoint every", "ETTR", ""):
        et.add_column(col, justify="right")
    for row in plan.table:
        mark = "this cluster" if row.nodes == c.nodes else ("" if row.viable else "not viable")
        et.add_row(
            f"{row.nodes:,}",
            f"{row.nodes * c.gpus_per_node:,}",
            f"{row.mtbf_h:.1f} h",
            f"{row.interval_s / 60:.0f} min",
            f"{row.ettr:.1%}",
            mark,
        )
    console.print(et)


def plot(plan: Plan, path: str | Path) -> Path:
    """Step-time breakdown of the top layouts, and ETTR against cluster size, in one PNG.
    Written under a temporary name and renamed, so a failure leaves no partial file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise StratusError(f"--plot {path}: give a .png file name")
    if not path.parent.exists():
        raise StratusError(f"--plot {path}: directory {path.parent} does not exist")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [label(e.candidate).replace(" mb", "\nmb") for e in plan.layouts]
    left = [0.0] * len(plan.layouts)
    for key in BREAKDOWN_KEYS:
        vals = [e.breakdown[key] for e in plan.layouts]
        ax1.barh(labels, vals, left=left, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds per step")
    ax1.set_title(f"{plan.model.name} on {plan.cluster.gpus:,} x {plan.cluster.gpu.key}: step time")
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    gpus = [r.nodes * plan.cluster.gpus_per_node for r in plan.table]
    ax2.semilogx(gpus, [r.ettr for r in plan.table], marker="o", base=2)
    ax2.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax2.axvline(plan.cluster.gpus, color="red", linestyle=":", linewidth=1, label="this cluster")
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("ETTR (share of time that trains)")
    ax2.set_ylim(0, 1)
    ax2.set_title("ETTR against cluster size")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
