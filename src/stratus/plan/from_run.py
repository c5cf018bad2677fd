"""`stratus plan --from-run RUN`: the planner's prediction for a run stratus made, beside
what the run measured, on the run's own hardware and layout.

The run's config.toml gives the model and the layout; timeline.jsonl's last start event the
world size, the device, the threads and the global batch; metrics.jsonl the step time (each
logged window's tokens/s, the first window after the start left out as warm-up, then the
median) and the memory (the largest rank's: CUDA's peak allocated, or a CPU rank's peak RSS).
A GPU run is planned on the catalog's entry for its GPU; a CPU run on a [cpu] entry
(plan/host.py), by default the CI's class of machine.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratus.errors import StratusError
from stratus.plan.catalog import Catalog, Cluster, Software
from stratus.plan.cost import Candidate, Estimate, estimate
from stratus.plan.efficiency import DEFAULT, Efficiency
from stratus.plan.host import host_cluster, host_software

DEFAULT_CPU = "ci-2core"


@dataclass
class Measured:
    step_time_s: float
    memory_gib: float
    windows: int  # logged windows the step time is the median of


@dataclass
class Comparison:
    run: Path
    facts: dict[str, Any]  # the start event
    cluster: Cluster
    software: Software
    efficiency: Efficiency
    predicted: Estimate
    measured: Measured

    def as_dict(self) -> dict[str, Any]:
        p, m = self.predicted, self.measured
        return {
            "run": str(self.run),
            "device": self.facts["device"],
            "planned_on": self.cluster.gpu.name,
            "world_size": self.facts["world_size"],
            "layout": self.facts["layout"],
            # six decimals: a CPU test run's step is tens of milliseconds, and four decimals
            # would round away a part in a thousand of it
            "predicted": {"step_time_s": round(p.step_time_s, 6), "memory_gib": round(p.memory_gb, 6)},
            "measured": {"step_time_s": round(m.step_time_s, 6), "memory_gib": round(m.memory_gib, 6)},
            "error": {
                "step_time": round(p.step_time_s / m.step_time_s - 1, 4),
                "memory": round(p.memory_gb / m.memory_gib - 1, 4),
            },
            "windows": m.windows,
            "breakdown": {k: round(v, 5) for k, v in p.breakdown.items()},
            "memory": {k: round(v, 3) for k, v in p.memory.items()},
        }


def _jsonl(path: Path) -> list[dict[str, Any]]:
    from stratus.report.run import parse_jsonl

    if not path.is_file():
        raise StratusError(f"{path} not found: give a run directory that `stratus train` wrote")
    rows, bad, lines = parse_jsonl(path)
    damaged = [n for n in bad if n < lines]  # a process killed mid-line cuts only the last one
    if damaged:
        raise StratusError(f"{path}:{damaged[0]} is not JSON; is this a stratus run directory?")
    return rows


def measure(run: Path) -> tuple[dict[str, Any], Measured]:
    """The last process start's facts, and the step time and memory it logged."""
    starts = [e for e in _jsonl(run / "timeline.jsonl") if e.get("event") == "start"]
    if not starts:
        raise StratusError(f"{run}/timeline.jsonl has no start event; did the run begin training?")
    facts = starts[-1]
    logged = [r for r in _jsonl(run / "metrics.jsonl") if r.get("tokens_per_s") and r["step"] > facts["step"]]
    steady = logged[1:]  # the first window holds the start: allocation, first touches, warm-up
    if not steady:
        raise StratusError(
            f"{run} logged {len(logged)} window(s) since its last start; the comparison needs at least "
            "two (train longer, or lower log.interval)"
        )
    tokens = facts["global_batch"] * facts["seq_len"]
    step_s = statistics.median(tokens / r["tokens_per_s"] for r in steady)
    memory = max(r["memory_gb"] for r in logged) * 1e9 / 2**30  # GB as logged, GiB as planned
    return facts, Measured(step_s, memory, len(steady))


def compare(
    run: str | Path, catalog: Catalog, software: str = "stratus", cpu: str | None = None
) -> Comparison:
    from stratus import counts
    from stratus.config import load_config
    from stratus.distributed.layout import resolve_layout

    run = Path(run)
    if not run.is_dir():
        raise StratusError(f"--from-run {run}: no such run directory")
    facts, measured = measure(run)
    cfg = load_config(run / "config.toml")
    world = int(facts["world_size"])
    layout = resolve_layout(cfg.parallel, world, cfg.model)
    m = counts.shape_of(cfg.model, cfg.data.seq_len)
    device = str(facts["device"])
    on_cpu = device.startswith("CPU")
    want = "float32" if on_cpu else "bfloat16"
    if facts["dtype"] != want:
        raise StratusError(
            f"{run} computed in {facts['dtype']}; the planner models stratus's own choice on "
            f'{"a CPU" if on_cpu else "a GPU"} ({want}, train.dtype = "auto")'
        )
    if on_cpu:
        threads = int(facts.get("threads") or 1)  # runs before 0.2 did not record it
        cluster, eff = host_cluster(catalog.cpu(cpu or DEFAULT_CPU), world, threads)
    else:
        gpu = catalog.gpu_for_device(device)
        if gpu is None:
            raise StratusError(f"{run} ran on {device}, which the catalog does not know: add it (--catalog)")
        cluster, eff = catalog.cluster(gpu=gpu.key, gpus=world), DEFAULT
    sw = catalog.software(software)
    sw = host_software(sw) if on_cpu else sw
    global_batch = int(facts["global_batch"])
    cand = Candidate(layout, cfg.train.micro_batch, cfg.parallel.activation_checkpoint, zero=3)
    predicted = estimate(m, cluster, sw, cand, global_batch, eff)
    return Comparison(run, facts, cluster, sw, eff, predicted, measured)


def render(c: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from stratus.plan.report import BREAKDOWN_KEYS

    d = c.as_dict()
    console = Console(width=110)
    console.print(
        f"[bold]{c.run}[/]: {d['world_size']} rank(s), {d['layout']}, on {d['device']}; "
        f"planned on {d['planned_on']}"
    )
    t = Table()
    for col in ("", "predicted", "measured", "error"):
        t.add_column(col, justify="right")
    p, m, e = d["predicted"], d["measured"], d["error"]
    t.add_row("step time (s)", f"{p['step_time_s']:.3f}", f"{m['step_time_s']:.3f}", f"{e['step_time']:+.1%}")
    t.add_row(
        "memory (GiB, fullest rank)",
        f"{p['memory_gib']:.2f}",
        f"{m['memory_gib']:.2f}",
        f"{e['memory']:+.1%}",
    )
    console.print(t)
    b = c.predicted.breakdown
    console.print(
        "predicted step: "
        + ", ".join(f"{k} {b[k]:.3f} s" for k in BREAKDOWN_KEYS if b[k])
        + f"; measured: the median of {d['windows']} logged window(s) after the first"
    )
    console.print(
        "predicted memory (GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in c.predicted.memory.items() if v and k != "total")
    )
