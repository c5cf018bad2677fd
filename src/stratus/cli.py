"""The `stratus` command: argument parsing only; each verb calls one function of a layer.

A user's mistake (StratusError, or a bad flag) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from stratus.errors import StratusError
from stratus.plan.cli import add_parser as add_plan_parser
from stratus.report.cli import add_parser as add_report_parser
from stratus.serve.cli import add_parsers as add_serve_parsers

EPILOG = "Docs: README.md. Every verb has --help."


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key[=value]` overrides (and their values) from ordinary arguments."""
    plain, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            plain.append(arg)
        i += 1
    return plain, overrides


def _config(args: argparse.Namespace, overrides: list[str]):
    from stratus.config import load_config, parse_overrides

    values = parse_overrides(overrides)
    if getattr(args, "resume", None):
        values["checkpoint.resume"] = args.resume
    return load_config(args.config, values)


def cmd_prepare(args, overrides):
    from stratus.data.prepare import prepare

    if args.format != "text":
        return _prepare_chat(args)
    m = prepare(
        args.sources,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_file=args.tokenizer,
        val_fraction=0.01 if args.val_fraction is None else args.val_fraction,
        strict=args.strict,
        force=args.force,
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(
        f"prepared {args.out}: train {train['tokens']:,} tokens, val {val['tokens']:,} tokens, "
        f"vocabulary {m['tokenizer']['vocab_size']}, unigram baseline {train['unigram_entropy']} nats/token"
    )


def _prepare_chat(args):
    from stratus.data.prepare_chat import prepare_chat

    m = prepare_chat(
        args.sources,
        args.out,
        tokenizer_file=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=0.05 if args.val_fraction is None else args.val_fraction,
        skip_bad=args.skip_bad,
        preferences=args.format == "preferences",
        force=args.force,
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    what = "pairs" if m["kind"] == "preferences" else "conversations"
    print(
        f"prepared {args.out}: {m['records']['read']} {what} "
        f"({m['records']['skipped']} bad lines skipped); train {train['tokens']:,} tokens "
        f"({train['trained_tokens']:,} trained on), val {val['tokens']:,}; vocabulary "
        f"{m['tokenizer']['vocab_size']}, end of turn id {m['tokenizer']['end_of_turn_id']}"
    )


def cmd_train(args, overrides):
    cfg = _config(args, overrides)  # a config mistake is reported before torch is imported
    max_restarts = cfg.reliability.max_restarts if args.max_restarts is None else args.max_restarts
    if max_restarts and "RANK" not in os.environ and "STRATUS_SUPERVISED" not in os.environ:
        from stratus.reliability.supervisor import supervise

        rc, local = cfg.reliability, cfg.checkpoint.local_dir
        return supervise(
            args.argv,
            Path(cfg.run.dir),
            max_restarts,
            rc.crash_loop,
            rc.hang_timeout_s,
            Path(local) if local else None,
        )
    from stratus.errors import RunStopped
    from stratus.train.loop import train

    try:
        s = train(cfg)
    except RunStopped as e:
        print(f"stratus: run stopped: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") != "0":
        return 0  # one voice: rank 0 speaks for the job
    if s.loss is not None and cfg.train.objective == "dpo":
        print(f"final DPO loss {s.loss:.3f} (ln 2 = 0.693 at the reference)")
    elif s.loss is not None and s.unigram_baseline:
        print(
            f"final loss {s.loss:.3f} nats/token vs unigram baseline {s.unigram_baseline:.3f}"
            + (f"; validation loss {s.val_loss:.3f}" if s.val_loss is not None else "")
        )
    g = s.goodput
    print(
        f"run: {s.run_dir} (step {s.step}) | ETTR {g['ettr']:.1%} over {g['wall_s']:.0f}s, "
        f"{g['restarts']} restarts"
    )
    return 0


def cmd_config_show(args, overrides):
    from stratus.config import to_toml

    print(to_toml(_config(args, overrides), comments=not args.plain), end="")


def cmd_generate(args, overrides):
    from stratus.data.tokenizer import load_tokenizer
    from stratus.inference.generate import generate
    from stratus.inference.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise StratusError("--max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.top_k < 0:
        raise StratusError(
            "sampling flags out of range: need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1"
        )
    from stratus.checkpoint.load import load_trained

    trained = load_trained(args.path)
    tok = load_tokenizer(trained.tokenizer_path)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    sys.stdout.write(args.prompt)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    g = generate(trained.model, tok, args.prompt, args.max_new_tokens, params, args.stop, emit)
    sys.stdout.write("\n")
    print(
        f"[{g.completion_tokens} tokens, finish: {g.finish_reason}, from {trained.source}]", file=sys.stderr
    )


def cmd_eval(args, overrides):
    from stratus.train.evaluate import evaluate_trained

    if args.chat:
        from stratus.train.chat_eval import evaluate_chat

        r = evaluate_chat(args.path, args.data, limit=args.limit)
        _record_chat_eval(Path(args.path), r, args.limit)
        if args.json:
            print(json.dumps(r))
            return
        print(
            f"step {r['step']} | held-out chat loss {r['val_loss']:.4f} | {r['requests']} held-out requests: "
            f"{r['parses']:.1%} of answers parse and define the function asked | "
            f"pass@1 {r['pass_at_1']:.1%} on {r['doctest_functions']} functions with doctests"
        )
        if r["example"]:
            print(f"\nrequest: {r['example']['request']}\nanswer:\n{r['example']['answer']}")
        return
    r = evaluate_trained(args.path, args.data, args.batches, args.micro_batch)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"step {r['step']} | validation loss {r['val_loss']:.4f} | perplexity {r['perplexity']:.2f} "
            f"| {r['tokens']:,} tokens of {r['data']}"
        )


def _record_chat_eval(path: Path, r: dict, limit: int) -> None:
    """A run directory keeps its chat evaluations (RUN/chat_eval.jsonl), for `stratus report`."""
    if not (path / "config.toml").is_file():
        return  # a checkpoint or an export: no run to record in
    keys = ("step", "val_loss", "requests", "parses", "doctest_functions", "pass_at_1")
    line = {"time": round(time.time(), 3), **{k: r[k] for k in keys}, "limit": limit}
    with open(path / "chat_eval.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def cmd_export(args, overrides):
    if args.format == "hf":
        from stratus.checkpoint.hf_export import export_hf

        print(f"exported to {export_hf(args.path, args.out, args.force)} (Hugging Face Llama)")
        return
    from stratus.checkpoint.export import export

    print(f"exported to {export(args.path, args.out, args.force)}")


def cmd_launch(args, overrides):
    from stratus.launch import write_launch

    extra = {
        "max_restarts": args.max_restarts,
        "cpus_per_node": args.cpus_per_node,
        "ib_hca": args.ib_hca,
        "socket_ifname": args.socket_ifname,
    }
    if args.kind == "slurm":
        extra.update(partition=args.partition, time_limit=args.time, spare_nodes=args.spare_nodes)
    else:
        extra.update(image=args.image, namespace=args.namespace)
    path = write_launch(
        args.kind,
        args.config,
        args.out,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        job_name=args.job_name,
        overrides=overrides,
        force=args.force,
        **extra,
    )
    submit = f"sbatch {path}" if args.kind == "slurm" else f"kubectl apply -f {path}"
    print(f"wrote {path}: {args.nodes} nodes x {args.gpus_per_node} GPUs; submit with `{submit}`")


def cmd_chaos(args, overrides):
    from stratus.reliability.chaos import run_chaos

    _config(argparse.Namespace(config=args.config), overrides)  # a bad config fails here, not in a child
    out = Path(args.out or f"runs/chaos-seed{args.seed}")
    if args.report and Path(args.report).suffix.lower() not in (".html", ".htm"):
        raise StratusError(f"--report {args.report}: the report is HTML; give a file name ending in .html")
    r = run_chaos(args.config, overrides, args.faults, args.seed, out, args.hang_timeout)
    if args.report:
        from stratus.report.chaos import write_chaos_report

        html, png = write_chaos_report(r, Path(args.report))
        r["report"] = {"html": str(html), "png": str(png)}
    if args.json:
        print(json.dumps(r))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"chaos: {args.faults} faults, seed {args.seed}")
        for col in ("fault", "injected", "recovered"):
            table.add_column(col)
        for kind, v in r["by_kind"].items():
            table.add_row(kind, str(v["injected"]), str(v["recovered"]))
        Console().print(table)
        print(
            f"steps at which data was lost: {r['steps_lost']} | final parameters bitwise equal to the "
            f"fault-free run: {r['bitwise_equal']} | ETTR {r['ettr']} | restarts {r['restarts']} | "
            f"time to recover: median {r['recover_s']['median']}s, max {r['recover_s']['max']}s"
        )
        print(f"runs: {r['runs']['reference']} (reference), {r['runs']['chaos']} (chaos)")
        if args.report:
            print(f"report: {r['report']['html']} | main panel: {r['report']['png']}")
    return 0 if r["bitwise_equal"] else 1


def cmd_dryrun(args, overrides):
    from stratus.plan.catalog import load_catalog
    from stratus.train.dryrun import dry_run

    cfg = _config(args, overrides)
    if args.world_size is not None and args.nodes is not None:
        raise StratusError(
            "give the job's size as --world-size W or as --nodes N [--gpus-per-node G], not both"
        )
    nodes = 1 if args.nodes is None else args.nodes
    world = args.world_size if args.world_size is not None else nodes * args.gpus_per_node
    if world < 1 or args.gpus_per_node < 1 or nodes < 1:
        raise StratusError(
            f"the world size must be at least 1 (got {world}): give --world-size W or --nodes N"
        )
    gpu = load_catalog(args.catalog).gpu(args.gpu)
    r = dry_run(cfg, world, gpu, steps=args.steps, label=args.config or "defaults")
    if args.json:
        print(json.dumps(r.as_dict(), indent=1))
    else:
        _print_dryrun(r)
    if not r.fits:
        if not args.json:
            print(f"stratus: error: {r.config} on {world} x {gpu.name}: {r.verdict()}", file=sys.stderr)
        return 2
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _print_dryrun(r) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{r.config}[/] on {r.world_size} x {r.gpu} | {r.layout} | {_count(r.params)} parameters "
        f"| {r.tokens_per_step:,} tokens a step, {r.accum} micro batch(es) a rank | dry run {r.seconds:.0f}s"
    )
    mem = Table(title="peak memory per GPU")
    mem.add_column("")
    mem.add_column("GiB", justify="right")
    for key, value in r.memory_gib.items():
        mem.add_row(key, f"{value:.2f}")
    mem.add_row("allowance (CUDA context, NCCL, fragmentation)", f"{r.allowance_gib:.2f}")
    mem.add_row("[bold]total[/]", f"[bold]{r.peak_gib + r.allowance_gib:.2f}[/]")
    mem.add_row("the GPU's memory", f"{r.hbm_gib:.1f}")
    console.print(mem)
    for where, gib in r.stages_gib.items():
        console.print(f"{where}: {gib:.2f} GiB peak before the allowance")
    comms = Table(title="collectives per step, per GPU")
    for col in ("op (group)", "calls", "GiB"):
        comms.add_column(col, justify="left" if col.startswith("op") else "right")
    for key, v in r.collectives.items():
        comms.add_row(key, f"{v['calls']:,}", f"{v['gib']:.2f}")
    console.print(comms)
    console.print(
        f"FLOPs per step per GPU: {r.flops_per_step:.3e} counted ({r.flops_estimate:.3e} by 6N + attention)"
    )
    for note in r.notes:
        console.print(f"note: {note}")
    console.print(("[green]" if r.fits else "[red]") + r.verdict())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stratus",
        epilog=EPILOG,
        description="Train, checkpoint, evaluate and sample GPT-style language models, from one CPU core up.",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    sp = verbs.add_parser(
        "prepare",
        help="corpus -> tokenizer + token shards + manifest",
        description="Read text files, train a byte-level BPE tokenizer, write token shards "
        "and manifest.json. With no SOURCES: the Python standard library of this interpreter.",
    )
    sp.add_argument(
        "sources", nargs="*", metavar="SOURCE", help="files, directories (recursive) or glob patterns"
    )
    sp.add_argument(
        "--out", required=True, help="output directory (created; must be new or hold prepared data)"
    )
    sp.add_argument(
        "--vocab-size", type=int, default=4096, help="tokens in the trained vocabulary (default 4096)"
    )
    sp.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    sp.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of documents for validation (default 0.01; 0.05 for chat)",
    )
    sp.add_argument(
        "--format",
        choices=("text", "chat", "preferences"),
        default="text",
        help="text: plain files (pretraining); chat: JSONL conversations (messages, or prompt/completion); "
        "preferences: JSONL prompt/chosen/rejected pairs. With no SOURCES, chat and preferences take "
        "the standard library's functions",
    )
    sp.add_argument(
        "--skip-bad",
        action="store_true",
        help="chat: skip malformed JSONL lines (counted in the manifest) instead of stopping at the first",
    )
    sp.add_argument(
        "--strict", action="store_true", help="an unreadable or non-UTF-8 file is an error, not a skip"
    )
    sp.add_argument("--force", action="store_true", help="replace prepared data already in --out")
    sp.set_defaults(func=cmd_prepare)

    sp = verbs.add_parser(
        "train",
        help="train (or resume) a model; under torchrun on every rank",
        description="Train from CONFIG (TOML) with --section.key=value overrides. An existing "
        "run.dir is resumed from its newest verified checkpoint.",
    )
    sp.add_argument("config", nargs="?", help="config TOML, e.g. configs/demo.toml")
    sp.add_argument(
        "--resume", choices=["auto", "never"], help="auto: continue an existing run; never: refuse"
    )
    sp.add_argument(
        "--max-restarts",
        type=int,
        help="restart a failed run up to N times, each from the newest verified "
        "checkpoint (one process; under torchrun, `stratus torchrun --max-restarts N`)",
    )
    sp.set_defaults(func=cmd_train, overrides=True)

    verbs.add_parser(
        "torchrun",
        add_help=False,
        help="torchrun with stratus's restart policy on each node: `stratus torchrun [torchrun's "
        "arguments] -m stratus train CONFIG` (no restart of a user's mistake, a crash-loop stop, "
        "RUN/restarts.jsonl)",
    )

    sp = verbs.add_parser("config", help="config tools: `config show` prints the resolved config")
    cv = sp.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    sh = cv.add_parser("show", help="print the resolved config with each key's description")
    sh.add_argument("config", nargs="?", help="config TOML")
    sh.add_argument("--plain", action="store_true", help="no description comments")
    sh.set_defaults(func=cmd_config_show, overrides=True)

    sp = verbs.add_parser(
        "generate",
        help="sample text from a run, checkpoint or export",
        description="Continue a prompt with the newest verified checkpoint of RUN (or the "
        "given checkpoint or export), streaming tokens as they come.",
    )
    sp.add_argument("path", metavar="RUN|CHECKPOINT", help="run directory, checkpoint directory or export")
    sp.add_argument("--prompt", default="", help="text to continue")
    sp.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    sp.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus: smallest set of tokens with this mass"
    )
    sp.add_argument("--seed", type=int, help="seed for reproducible samples")
    sp.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    sp.set_defaults(func=cmd_generate)

    sp = verbs.add_parser(
        "eval",
        help="validation loss and perplexity",
        description="Validation loss and perplexity of a run, checkpoint or export.",
    )
    sp.add_argument("path", metavar="RUN|CHECKPOINT", help="run directory, checkpoint directory or export")
    sp.add_argument("--data", help="prepared data directory (default: the run's data.path)")
    sp.add_argument("--batches", type=int, default=100, help="validation batches at most (default 100)")
    sp.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (default 8)")
    sp.add_argument(
        "--chat",
        action="store_true",
        help="chat model on the embedded chat default: held-out chat loss, share of answers that "
        "parse, pass@1 on doctests (data: the run's chat data, or --data)",
    )
    sp.add_argument("--limit", type=int, default=0, help="--chat: the first this many requests (0 = all)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_eval)

    sp = verbs.add_parser(
        "launch",
        help="job files for a cluster: Slurm sbatch or Kubernetes PyTorchJob",
        description="Write an sbatch script (srun + torchrun, c10d rendezvous on the first node) or a "
        "Kubeflow PyTorchJob manifest that trains CONFIG on NODES x GPUS, with the NCCL and "
        "InfiniBand environment set. --section.key=value overrides are passed to every rank. "
        "See docs/cluster.md.",
    )
    sp.add_argument("kind", choices=["slurm", "k8s"], help="slurm: sbatch script; k8s: PyTorchJob manifest")
    sp.add_argument("config", help="config TOML the job trains")
    sp.add_argument("--nodes", type=int, required=True, help="number of nodes")
    sp.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    sp.add_argument("--job-name", default="stratus", help="job name (default stratus)")
    sp.add_argument("--out", help="output file (default launch/JOB.sbatch or launch/JOB.yaml)")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="torchrun restarts of failed workers, and Slurm requeues of a failed job (default 3)",
    )
    sp.add_argument("--cpus-per-node", type=int, help="CPU cores per node (default 8 per GPU)")
    sp.add_argument("--ib-hca", default="mlx5", help="NCCL_IB_HCA: InfiniBand adapters to use (default mlx5)")
    sp.add_argument(
        "--socket-ifname",
        default="^lo,docker",
        help="NCCL_SOCKET_IFNAME: interfaces for bootstrap traffic (default ^lo,docker)",
    )
    sp.add_argument("--partition", help="slurm: partition")
    sp.add_argument(
        "--spare-nodes",
        type=int,
        default=0,
        help="slurm: extra nodes in the allocation that wait in the rendezvous and replace a lost one",
    )
    sp.add_argument("--time", default="48:00:00", help="slurm: time limit (default 48:00:00)")
    sp.add_argument("--image", default="stratus:latest", help="k8s: container image with stratus installed")
    sp.add_argument("--namespace", default="default", help="k8s: namespace")
    sp.set_defaults(func=cmd_launch, overrides=True)

    sp = verbs.add_parser(
        "chaos",
        help="rehearse faults: a real run with N random faults against a fault-free one",
        description="Train CONFIG twice: a reference, and a run under the supervisor with N random faults "
        "(kill, hang, crash_during_save, corrupt_checkpoint, nan). Deterministic mode, so the two must end "
        "bit for bit equal; prints faults by kind, recovered, data lost, ETTR and time to recover.",
    )
    sp.add_argument("config", help="config TOML (a small one: it trains twice)")
    sp.add_argument("--faults", type=int, default=10, help="how many faults (default 10)")
    sp.add_argument("--seed", type=int, default=0, help="seed for the fault plan (default 0)")
    sp.add_argument("--out", help="directory for both runs (default runs/chaos-seedS)")
    sp.add_argument(
        "--hang-timeout", type=float, default=10.0, help="watchdog timeout in the runs, s (default 10)"
    )
    sp.add_argument(
        "--report",
        metavar="FILE.html",
        help="also write the campaign's report: each fault and its recovery on the timeline, the chaos "
        "run's loss against the fault-free one (and FILE.png)",
    )
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_chaos, overrides=True)

    sp = verbs.add_parser(
        "dryrun",
        help="run the real training step at cluster size on this CPU: memory, collectives, fit",
        description="Build the model, layout, mesh, parallelism and optimizer of CONFIG for W GPUs "
        "under a fake process group and fake tensors, run two training steps, and report peak memory "
        "per GPU by category, the collectives and FLOPs of a step, and whether it fits the GPU. "
        "Exits 2 when it does not fit.",
    )
    sp.add_argument("config", nargs="?", help="config TOML, e.g. configs/llama3-8b.toml")
    size = sp.add_argument_group("the job's size: --world-size W, or --nodes N --gpus-per-node G")
    size.add_argument("--world-size", type=int, help="GPUs in the job")
    size.add_argument("--nodes", type=int, help="nodes in the job")
    size.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    sp.add_argument(
        "--gpu",
        default="h100-sxm",
        help="GPU from the planner's catalog (default h100-sxm): its memory is the limit",
    )
    sp.add_argument("--catalog", help="a catalog TOML with more GPUs (as for `stratus plan`)")
    sp.add_argument("--steps", type=int, default=2, help="training steps to run (default 2)")
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    sp.set_defaults(func=cmd_dryrun, overrides=True)

    sp = verbs.add_parser("export", help="consolidated safetensors + config + tokenizer for inference")
    sp.add_argument("path", metavar="RUN|CHECKPOINT", help="run directory or checkpoint directory")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument(
        "--format",
        choices=["stratus", "hf"],
        default="stratus",
        help="stratus: for stratus generate/serve; hf: a Hugging Face Llama directory for transformers",
    )
    sp.set_defaults(func=cmd_export)
    add_serve_parsers(verbs)
    add_plan_parser(verbs)
    add_report_parser(verbs)
    return p


def torch_too_old(found: str | None = None) -> str | None:
    """One line saying which torch is needed, when the installed one is older than the floor
    that stratus's own requirements state (pyproject.toml is the one place it is written)."""
    from importlib import metadata

    try:
        found = found or metadata.version("torch")
        floor = next(
            r for r in metadata.requires("stratus") or [] if r.replace(" ", "").startswith("torch>=")
        )
    except (metadata.PackageNotFoundError, StopIteration):
        return None  # not installed as a package: nothing to check against
    need = floor.replace(" ", "").removeprefix("torch>=").split(";")[0].split(",")[0]

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())

    if key(found) >= key(need):
        return None
    return f"stratus needs torch {need} or newer and found {found}: pip install 'torch>={need}'"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    old = torch_too_old()
    if old:
        print(f"stratus: error: {old}", file=sys.stderr)
        return 2
    if argv[:1] == ["torchrun"]:  # torchrun's own arguments follow: not for this parser
        from stratus.reliability.agent import main as torchrun

        return torchrun(argv[1:])
    plain, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(plain)
    try:
        if overrides and not getattr(args, "overrides", False):
            raise StratusError(
                f"{overrides[0]}: this verb takes no config overrides "
                "(train, dryrun, launch, chaos and config show do)"
            )
        args.argv = argv
        rc = args.func(args, overrides)
    except StratusError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; rank 0 says why
            print(f"stratus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stratus: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return rc or 0


if __name__ == "__main__":
    raise SystemExit(main())
