"""The `serve` and `chat` verbs: argument parsing only (wired into stratus.cli by
`add_parsers`)."""

from __future__ import annotations

import argparse
import os

from stratus.errors import StratusError


def _engine_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "path",
        metavar="RUN|CHECKPOINT",
        help="run directory, checkpoint directory, or `stratus export` output (either format)",
    )
    sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda when present (default)")
    sp.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV cache; auto = bfloat16 on a GPU, float32 on a CPU (default)",
    )
    sp.add_argument(
        "--max-batch", type=int, default=16, help="sequences running together, rows of a step (default 16)"
    )
    sp.add_argument("--kv-cache-mb", type=float, help="KV block pool, MiB (default: --max-batch contexts)")
    sp.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens processed per step (default 512)"
    )
    sp.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt whole, sharing no cached block (to measure what caching buys)",
    )
    sp.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="seconds a request may wait to start before it is answered 503 (default 60; 0 = no limit)",
    )
    sp.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per operation (torch); 0 = torch's default. A small model decodes faster on 1",
    )


def _engine_config(args):
    import torch

    from stratus.inference.engine import EngineConfig

    if args.threads < 0:
        raise StratusError("--threads must be 0 (torch's default) or more")
    if args.queue_timeout < 0:
        raise StratusError("--queue-timeout must be 0 (no limit) or more seconds")
    if args.threads:
        torch.set_num_threads(args.threads)

    return EngineConfig(
        max_batch=args.max_batch,
        kv_cache_mb=args.kv_cache_mb,
        max_queue=getattr(args, "max_queue", 4),
        prefill_chunk=args.prefill_chunk,
        queue_timeout_s=args.queue_timeout or None,
        prefix_caching=args.prefix_caching,
    )


def cmd_serve(args, overrides):
    from stratus.inference.open import open_engine
    from stratus.serve.app import ServerState
    from stratus.serve.server import Limits, prepare_server

    if not 0 <= args.port <= 65535:
        raise StratusError(f"--port {args.port} is not a TCP port (0-65535)")
    if not (args.max_body_mb > 0 and args.header_timeout > 0 and args.keep_alive_timeout > 0):
        raise StratusError("--max-body-mb, --header-timeout and --keep-alive-timeout must be positive")
    if args.max_connections < 1:
        raise StratusError("--max-connections must be at least 1")
    if args.tp < 1:
        raise StratusError("--tp must be at least 1")
    if args.engine == "process" and args.tp > 1:
        raise StratusError(
            "--engine process runs one engine beside the server; with --tp the engine runs in every "
            "torchrun rank: leave --engine at auto or thread"
        )
    # auto: its own process (1.2x the output tokens/s at concurrency 16 and 64, README), except
    # under --tp, where each torchrun rank is an engine
    process = args.engine == "process" or (args.engine == "auto" and args.tp == 1)
    limits = Limits(args.header_timeout, args.keep_alive_timeout, args.max_connections)
    if process:
        from stratus.inference.core import EngineProcess

        engine = EngineProcess(args.path, _engine_config(args), args.device, args.dtype, args.threads)
        tokenizer, template, name = engine.tokenizer, engine.source.template(), engine.source.name
    else:
        engine, tokenizer, template, name = open_engine(
            args.path, _engine_config(args), args.device, args.dtype, args.tp
        )
    if args.tp > 1:
        import torch.distributed as dist

        from stratus.inference import tensor_parallel

        if dist.get_rank() != 0:  # the other ranks run rank 0's steps until it stops
            tensor_parallel.follow(engine)
            dist.destroy_process_group()
            return
        engine.broadcast = tensor_parallel.broadcaster()
    api_key = args.api_key or os.environ.get("STRATUS_API_KEY") or None
    state = ServerState(
        engine,
        tokenizer,
        args.model_name or name,
        api_key,
        template,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    try:
        running = prepare_server(state, args.host, args.port, args.log_level, limits)
    except BaseException:  # the port is taken: the engine's process goes too
        engine.stop()
        raise
    cap = engine.capacity
    print(
        f"serving `{state.model_name}` on http://{args.host}:{running.port}/v1 "
        f"({cap.blocks} KV blocks of {cap.block_size} positions, "
        f"{cap.kv_bytes / 2**20:.1f} MiB, up to {cap.slots} sequences of {cap.context} tokens; "
        f"chat template: {template.origin}; API key {'required' if api_key else 'off'}; "
        + (
            f"tensor parallel over {args.tp} ranks, {engine.pool.k.shape[2]} KV heads a rank"
            if args.tp > 1
            else f"engine in {'its own process' if process else 'a thread'}"
        )
        + ")",
        flush=True,
    )
    code = running.serve()
    if code == 130:
        raise KeyboardInterrupt  # stopped with Ctrl-C: the CLI's one way of saying so
    if code:
        raise SystemExit(code)  # the engine died: a supervisor should restart the server


def cmd_chat(args, overrides):
    from stratus.inference.open import open_engine
    from stratus.inference.request import RequestParams
    from stratus.serve.repl import ChatSession, run_repl

    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise StratusError(
            "sampling flags out of range: need --max-tokens >= 1, --temperature >= 0, --top-k >= 0, "
            "0 < --top-p <= 1"
        )
    engine, _, template, _ = open_engine(args.path, _engine_config(args), args.device, args.dtype)
    params = RequestParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    engine.start()
    try:
        run_repl(ChatSession(engine, template, params, args.system or ""))
    finally:
        engine.stop()


def add_parsers(verbs) -> None:
    """Register `serve` and `chat` on the subparsers of the `stratus` command."""
    sp = verbs.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (chat, completions, streaming) with continuous batching",
        description="Serve RUN (its newest verified checkpoint), a checkpoint or an export behind the "
        "OpenAI API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, "
        "GET /metrics (Prometheus). Exits non-zero if the engine fails.",
    )
    _engine_flags(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    sp.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $STRATUS_API_KEY, else none)"
    )
    sp.add_argument("--model-name", help="the model's name in the API (default: the run's directory name)")
    sp.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429 (default 64)"
    )
    sp.add_argument(
        "--max-body-mb", type=float, default=4, help="request bodies above this get 413, unread (default 4)"
    )
    sp.add_argument(
        "--header-timeout",
        type=float,
        default=10,
        help="seconds a connection has to send a whole request head; slower ones are closed (default 10)",
    )
    sp.add_argument(
        "--keep-alive-timeout", type=float, default=5, help="seconds an idle keep-alive connection stays open"
    )
    sp.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections; past it, 503 and close (default 512)",
    )
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks (under `torchrun --nproc-per-node N`); rank 0 serves HTTP (default 1)",
    )
    sp.add_argument(
        "--engine",
        choices=("auto", "thread", "process"),
        default="auto",
        help="the engine in a process of its own (vLLM's EngineCore) or in a thread of the server; "
        "auto = process, thread under --tp (default)",
    )
    sp.set_defaults(func=cmd_serve)

    sp = verbs.add_parser(
        "chat",
        help="talk to a model in the terminal (streaming; /reset, /system, /set)",
        description="A chat REPL on RUN, a checkpoint or an export, rendered with the server's chat "
        "template. Commands: /reset, /system TEXT, /set NAME VALUE, /settings, /help, /quit.",
    )
    _engine_flags(sp)
    sp.add_argument("--system", help="system message")
    sp.add_argument("--max-tokens", type=int, default=256, help="reply length at most (default 256)")
    sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sp.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0 = all (default)")
    sp.add_argument("--seed", type=int, help="seed for reproducible replies")
    sp.set_defaults(func=cmd_chat)
