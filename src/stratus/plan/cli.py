"""`stratus plan`: flags, and the one function that runs a plan. src/stratus/cli.py registers
the verb with add_parser(verbs); `main` runs it alone (tests, `python -c`)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys

from stratus.errors import StratusError

SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def count(text: str) -> float:
    """15e12, 15T, 2.5B, 300000 -> a number (tokens)."""
    hit = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not hit:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 15e12 or 15T")
    return float(hit.group(1)) * SUFFIX[hit.group(2)]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from stratus.plan.presets import PRESETS

    sp = subparsers.add_parser(
        "plan",
        help="memory, step time, MFU, best layout, days, checkpoint interval and ETTR for a cluster",
        description="Plan a training run from first principles: memory per GPU, step time with its "
        "breakdown, MFU, the fastest parallel layouts that fit, days to train, the checkpoint "
        "interval and the goodput failures leave. Fixed layout flags restrict the search. "
        "Model and accuracy: docs/planning.md.",
    )
    g = sp.add_argument_group("model (a preset or config, or the shape)")
    g.add_argument("--model", help=f"{'|'.join(PRESETS)} or a stratus CONFIG.toml")
    g.add_argument("--arch", choices=["llama", "gpt"], default="llama", help="family of an explicit shape")
    g.add_argument("--layers", type=int, help="transformer blocks")
    g.add_argument("--hidden", type=int, help="hidden width")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default = heads")
    g.add_argument("--ffn-hidden", type=int, help="MLP width; default 4h (gpt) or 8h/3 rounded (llama)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence")
    g.add_argument("--vocab", type=int, help="vocabulary size")
    g = sp.add_argument_group("cluster")
    g.add_argument("--cluster", metavar="PRESET", help="node preset: dgx-a100, dgx-h100, dgx-h200, ...")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpu", help="a100-40gb|a100-80gb|h100-sxm|h200 (or one from --catalog)")
    g.add_argument("--gpus", type=int, help="number of GPUs")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8)")
    g.add_argument("--network", help="ib-hdr-200x8|ib-ndr-400x8 (default ib-ndr-400x8)")
    g.add_argument("--catalog", metavar="FILE", help="TOML with more GPUs, links, networks, nodes")
    g.add_argument(
        "--software",
        default="stratus",
        help="framework profile: stratus (default), megatron-core, megatron-deepspeed",
    )
    g = sp.add_argument_group("batch and budget")
    g.add_argument(
        "--global-batch", type=int, help="sequences per step (default: about 4M tokens, a multiple of GPUs)"
    )
    g.add_argument("--tokens", type=count, help="training tokens for days to train, e.g. 15T or 2e12")
    g = sp.add_argument_group("layout (fixed values restrict the search)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, help="pipeline-parallel degree")
    g.add_argument("--dp", type=int, help="data-parallel degree")
    g.add_argument(
        "--dp-replicate",
        type=int,
        help="HSDP: replicas of the model, each FSDP-sharded over dp / dp-replicate ranks (stratus)",
    )
    g.add_argument("--micro-batch", type=int, help="sequences per micro batch")
    g.add_argument("--recompute", choices=["none", "selective", "full"], help="activation recompute")
    g.add_argument("--interleave", type=int, help="model chunks per pipeline stage (interleaved 1F1B)")
    g.add_argument("--zero", type=int, choices=[1, 2, 3], help="sharding: 1 optimizer, 2 +grads, 3 FSDP")
    g = sp.add_argument_group("failures")
    g.add_argument("--failures-per-1000-node-days", type=float, help="node failure rate (default 3.8)")
    g.add_argument("--mtbf-hours", type=float, help="this job's mean time between failures (overrides)")
    g.add_argument("--restart-min", type=float, default=15.0, help="minutes lost per restart (default 15)")
    g.add_argument(
        "--storage-gbps", type=float, default=100.0, help="checkpoint write bandwidth, GB/s (default 100)"
    )
    g.add_argument(
        "--local-gbps",
        type=float,
        help="plan a node-local checkpoint tier (checkpoint.local_dir) with this write bandwidth per "
        "node, GB/s (a local NVMe, or /dev/shm); default: global checkpoints only",
    )
    g.add_argument(
        "--local-covers",
        type=float,
        default=0.9,
        help="with --local-gbps: the share of failures the local tier recovers (default 0.9)",
    )
    g = sp.add_argument_group("a run stratus made")
    g.add_argument(
        "--from-run",
        metavar="RUN",
        help="predict a finished or running run's step time and memory on its own hardware and "
        "layout, beside what it measured",
    )
    g.add_argument(
        "--cpu", metavar="NAME", help="the [cpu] catalog entry of a CPU run's host (default ci-2core)"
    )
    g = sp.add_argument_group("output")
    g.add_argument("--top", type=int, default=5, help="layouts to show (default 5)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--plot", metavar="FILE.png", help="draw step-time breakdowns and ETTR vs size")
    g.add_argument(
        "--emit-config",
        metavar="FILE.toml",
        help="write the best layout as a stratus training config (for stratus dryrun and stratus launch)",
    )
    g.add_argument(
        "--explain",
        action="store_true",
        help="list the terms the prediction rests on: values, and which are physical and which fitted",
    )
    sp.set_defaults(func=cmd_plan)
    return sp


def build_plan(args: argparse.Namespace):
    from stratus.plan import reliability as R
    from stratus.plan.catalog import load_catalog
    from stratus.plan.presets import resolve
    from stratus.plan.report import Plan
    from stratus.plan.search import Fixed, explain_no_layout, search

    if args.top < 1:
        raise StratusError("--top must be at least 1")
    model = resolve(
        args.model,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        ffn_hidden=args.ffn_hidden,
        seq_len=args.seq_len,
        vocab=args.vocab,
        arch=args.arch,
    )
    catalog = load_catalog(args.catalog)
    cluster = catalog.cluster(
        preset=args.cluster,
        nodes=args.nodes,
        gpu=args.gpu,
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        network=args.network,
    )
    software = catalog.software(args.software)
    gpus = cluster.gpus
    batch = args.global_batch
    if batch is None:  # about 4M tokens, rounded up to a multiple of the GPU count
        want = max(1, round(4 * 2**20 / model.seq_len))
        batch = -(-want // gpus) * gpus
    if batch < 1:
        raise StratusError("--global-batch must be at least 1")
    fixed = Fixed(
        args.tp,
        args.pp,
        args.dp,
        args.micro_batch,
        args.recompute,
        args.interleave,
        args.zero,
        args.dp_replicate,
    )
    for name, flag in (
        ("tp", "--tp"),
        ("pp", "--pp"),
        ("dp", "--dp"),
        ("micro_batch", "--micro-batch"),
        ("interleave", "--interleave"),
        ("replicate", "--dp-replicate"),
    ):
        v = getattr(fixed, name)
        if v is not None and v < 1:
            raise StratusError(f"{flag} must be at least 1")
    if (fixed.replicate or 1) > 1 and not software.stratus:
        raise StratusError(
            f"--dp-replicate {fixed.replicate}: HSDP replicas are stratus's FSDP; {software.key} has "
            "none (use --software stratus, or leave --dp-replicate out)"
        )
    if fixed.tp and (model.heads % fixed.tp or model.kv_heads % fixed.tp):
        raise StratusError(
            f"--tp {fixed.tp} does not divide the {model.heads} attention heads / {model.kv_heads} KV heads"
        )
    fits, _ = search(model, cluster, software, batch, fixed)
    if not fits:
        raise StratusError(explain_no_layout(model, cluster, software, batch, fixed))
    top = fits[: args.top]
    params = model.describe()["params"]
    kw = dict(
        failures_per_1000_node_days=args.failures_per_1000_node_days,
        mtbf_h=args.mtbf_hours,
        restart_min=args.restart_min,
        storage_gbps=args.storage_gbps,
        local_gbps=args.local_gbps,
        local_covers=args.local_covers,
    )
    rel = R.plan_reliability(cluster.nodes, params, **kw)
    table = R.ettr_table(cluster.nodes, params, **kw)
    days = failures = None
    if args.tokens:
        days = R.training_days(args.tokens, top[0].tokens_per_s, rel.ettr)
        failures = R.expected_failures(days, cluster.nodes, args.failures_per_1000_node_days, args.mtbf_hours)
    return Plan(model, cluster, software, batch, args.tokens, top, rel, table, days, failures)


def cmd_plan(args: argparse.Namespace, overrides: list[str] | None = None) -> None:
    from stratus.plan.explain import explain_rows, render_explain
    from stratus.plan.report import plot, render, to_json

    if args.from_run:
        return from_run(args)
    if args.cpu:
        raise StratusError("--cpu names the host of a CPU run: use it with --from-run RUN")
    plan = build_plan(args)
    if args.emit_config:
        from stratus.plan.emit import emit_config

        argv = getattr(args, "argv", None) or ["plan"]  # what `stratus` was given, for the header
        emit_config(plan, args.emit_config, "stratus " + shlex.join(argv))
    if args.plot:
        plot(plan, args.plot)
    if args.json:
        out = to_json(plan)
        if args.explain:
            out["explain"] = explain_rows(plan.cluster, plan.software)
        print(json.dumps(out))
    else:
        render(plan)
        if args.explain:
            render_explain(explain_rows(plan.cluster, plan.software))
        if args.plot:
            print(f"plot: {args.plot}")
        if args.emit_config:
            print(f"config: {args.emit_config}")


# what --from-run reads from the run itself; setting one of these as well is a mistake
RUN_DECIDES = (
    "model", "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "seq_len", "vocab", "cluster",
    "nodes", "gpu", "gpus", "gpus_per_node", "network", "global_batch", "tokens", "tp", "pp", "dp",
    "dp_replicate", "micro_batch", "recompute", "interleave", "zero", "plot", "emit_config",
)  # fmt: skip


def from_run(args: argparse.Namespace) -> None:
    from stratus.plan import from_run as F
    from stratus.plan.catalog import load_catalog
    from stratus.plan.explain import explain_rows, render_explain

    given = [f"--{k.replace('_', '-')}" for k in RUN_DECIDES if getattr(args, k) is not None]
    if given:
        raise StratusError(
            f"--from-run takes the model, layout and hardware from the run; leave out {' '.join(given)}"
        )
    catalog = load_catalog(args.catalog)
    c = F.compare(args.from_run, catalog, args.software, args.cpu)
    rows = explain_rows(c.cluster, c.software, c.efficiency) if args.explain else None
    if args.json:
        print(json.dumps({**c.as_dict(), **({"explain": rows} if rows else {})}))
        return
    F.render(c)
    if rows:
        render_explain(rows)


def main(argv: list[str] | None = None) -> int:
    """`stratus plan` on its own: the same flags, errors as one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="stratus")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_parser(verbs)
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args, [])
    except StratusError as e:
        print(f"stratus: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
