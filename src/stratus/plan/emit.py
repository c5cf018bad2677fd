"""From plan to job: the chosen layout as a stratus training config (`stratus plan
--emit-config FILE.toml`), which `stratus dryrun` and `stratus launch` take as they are.

The [parallel] section is the plan's layout in the trainer's own type; the checkpoint interval
is the Young/Daly interval of the plan's failure model, in steps of the predicted step time.
Whatever the plan does not decide (data path, learning rate, steps without --tokens) keeps
stratus's defaults, to be edited before launch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stratus.atomic import write_atomic
from stratus.config import ParallelConfig, config_from_text, toml_value
from stratus.errors import StratusError
from stratus.plan.cost import Candidate


def parallel_section(c: Candidate) -> dict[str, Any]:
    """The candidate's layout as [parallel]: ZeRO-3 data parallelism is FSDP over the ranks
    the other degrees leave (dp_shard = -1, which is the plan's dp on the plan's cluster and
    still resolves on another size), and a pipeline with model chunks runs interleaved 1F1B."""
    lay = c.layout
    section: dict[str, Any] = {"dp_replicate": lay.dp_replicate, "dp_shard": -1, "tp": lay.tp}
    if lay.pp > 1:
        section["pp"] = lay.pp
        section["pp_schedule"] = "interleaved_1f1b" if lay.stages_per_rank > 1 else "1f1b"
        if lay.stages_per_rank > 1:
            section["pp_stages_per_rank"] = lay.stages_per_rank
    section["activation_checkpoint"] = c.recompute
    return section


def parallel_config(c: Candidate) -> ParallelConfig:
    return ParallelConfig(**parallel_section(c))


def config_text(plan, command: str) -> str:
    """The TOML of the plan's best layout, with a header saying where it came from."""
    best, m, cl = plan.layouts[0], plan.model, plan.cluster
    c = best.candidate
    if m.arch != "llama":
        raise StratusError(
            f"--emit-config writes a stratus config, and stratus trains the llama family; {m.name} is "
            f"a {m.arch}: plan a llama shape (--arch llama, or a stratus CONFIG.toml such as "
            "configs/gpt3-175b.toml)"
        )
    if c.zero != 3:
        raise StratusError(
            f"the best layout shards with ZeRO-{c.zero}, which stratus does not run (FSDP2 is ZeRO-3): "
            "plan with --software stratus, or pin --zero 3"
        )
    steps = None
    if plan.tokens:
        steps = math.ceil(plan.tokens / (plan.global_batch * m.seq_len))
    interval = max(1, round(plan.reliability.interval_s / best.step_time_s))
    local, local_note = {}, []
    if plan.reliability.local_interval_s is not None:
        local = {"local_interval": max(1, round(plan.reliability.local_interval_s / best.step_time_s))}
        local_note = [
            f"# node-local tier every {local['local_interval']} steps: set checkpoint.local_dir to a "
            "directory on each node's own disk to use it.",
        ]
    sections: dict[str, dict[str, Any]] = {
        "model": {
            "n_layers": m.layers,
            "d_model": m.hidden,
            "n_heads": m.heads,
            "n_kv_heads": m.kv_heads,
            "ffn_hidden": m.ffn_hidden,
            "vocab_size": m.vocab,
            "max_seq_len": m.seq_len,
            "tie_embeddings": m.tie_embeddings,
        },
        "data": {"seq_len": m.seq_len},
        "train": {
            **({"steps": steps} if steps else {}),
            "micro_batch": c.micro_batch,
            "global_batch": plan.global_batch,
            "device": "cuda",
            "dtype": "bfloat16",
        },
        "parallel": parallel_section(c),
        "checkpoint": {"interval": interval, **local},
        "reliability": {"mtbf_hours": round(plan.reliability.mtbf_h, 2)},
    }
    header = [
        f"# {m.name} on {cl.nodes} x {cl.gpus_per_node} {cl.gpu.name} ({cl.gpus} GPUs), written by",
        f"#   {command}",
        f"# Predicted: {best.step_time_s:.3f} s a step, {best.memory_gb:.1f} GiB a GPU of "
        f"{cl.gpu.hbm_gb:.1f}, MFU {best.mfu:.1%};",
        f"# checkpoint every {interval} steps ({plan.reliability.interval_s / 60:.1f} min: Young/Daly "
        f"at a job MTBF of {plan.reliability.mtbf_h:.1f} h).",
        *local_note,
        f"#   stratus dryrun FILE --nodes {cl.nodes} --gpus-per-node {cl.gpus_per_node} --gpu {cl.gpu.key}",
        f"#   stratus launch slurm FILE --nodes {cl.nodes} --gpus-per-node {cl.gpus_per_node}",
        "# Set data.path, the learning rate and run.dir before launch.",
        "",
    ]
    body = []
    for name, values in sections.items():
        body.append(f"[{name}]")
        body += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        body.append("")
    return "\n".join(header + body)


def emit_config(plan, path: str | Path, command: str) -> Path:
    """Write the config atomically, after checking that stratus loads it as it is."""
    target = Path(path)
    if target.suffix != ".toml":
        raise StratusError(f"--emit-config {path}: give a .toml file name")
    text = config_text(plan, command)
    config_from_text(text, str(target))
    write_atomic(target, text)
    return target
