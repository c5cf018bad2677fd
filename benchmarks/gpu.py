"""Training throughput on the GPUs at hand, beside the dry run's prediction.

A ~1B-parameter Llama-style model in bf16, on 1 GPU and under FSDP on every local GPU, with
torch.compile off and on; each row prints tokens/s, MFU and peak memory, and the peak memory
that `stratus dryrun` predicts for the same config and world size. The step is stratus's own
(train/step.py, the optimizer of train/optim.py) on random tokens: no data loading.

    python benchmarks/gpu.py [--steps 20] [--compile off,on] [--json FILE]
    python benchmarks/gpu.py --smoke     # a tiny shape on the CPU (1 and 2 ranks): the suite runs this
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_B = [
    "--model.n_layers=16",
    "--model.d_model=2048",
    "--model.n_heads=16",
    "--model.n_kv_heads=8",
    "--model.ffn_hidden=8192",
    "--model.vocab_size=32768",
    "--model.max_seq_len=2048",
    "--data.seq_len=2048",
    "--train.micro_batch=4",
    "--train.dtype=bfloat16",
    "--train.device=cuda",
]
SMOKE = [  # big enough that its predicted peak (tens of MiB) shows in GiB to two decimals
    "--model.n_layers=2",
    "--model.d_model=128",
    "--model.n_heads=4",
    "--model.vocab_size=4096",
    "--model.max_seq_len=128",
    "--data.seq_len=128",
    "--train.micro_batch=8",
    "--train.dtype=float32",
    "--train.device=cpu",
]


def worker(args: list[str], steps: int, compile_blocks: bool) -> None:
    """On every rank under torchrun: timed optimizer steps of the config; rank 0 prints one JSON line."""
    import torch

    from stratus import counts
    from stratus.config import load_config, parse_overrides
    from stratus.distributed import env as denv
    from stratus.distributed.layout import resolve_layout
    from stratus.distributed.parallelize import build_mesh
    from stratus.train.metrics import device_peak_flops
    from stratus.train.optim import build_optimizer
    from stratus.train.setup import batch_shape, materialize, precision, sharded_model
    from stratus.train.step import clip, forward_backward

    cfg = load_config(None, {**parse_overrides(args), "train.compile": compile_blocks})
    env = denv.setup(cfg.train.device, 600)
    layout = resolve_layout(cfg.parallel, env.world_size, cfg.model)
    mesh = build_mesh(layout, env.device.type) if env.world_size > 1 else None
    dtype, autocast, param_dtype = precision(cfg.train.dtype, env.device, layout)
    model = sharded_model(cfg, layout, mesh, env.device, "meta", param_dtype, env.rank).model
    materialize(model, env.device, 0, env.rank, layout)
    optimizer = build_optimizer(model, cfg.train, env.device)
    global_batch, accum = batch_shape(cfg.train, layout)
    shape = (cfg.train.micro_batch, cfg.data.seq_len)
    cuda = env.device.type == "cuda"

    def step() -> None:
        batches = (
            (torch.randint(0, cfg.model.vocab_size, shape, device=env.device),) * 2 for _ in range(accum)
        )
        forward_backward(model, batches, accum, autocast, contextlib.nullcontext)
        clip(model, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: compile, allocator, optimizer state
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = global_batch * cfg.data.seq_len * steps / seconds
    peak = device_peak_flops(env.device, dtype, None)
    flops = counts.model_flops_per_token(counts.shape_of(cfg.model, cfg.data.seq_len))
    if env.is_main:
        print(
            json.dumps(
                {
                    "gpus": env.world_size,
                    "compile": compile_blocks,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "tokens_per_s": round(tokens_per_s, 1),
                    "mfu": round(flops * tokens_per_s / (peak * env.world_size), 4) if peak else None,
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                }
            ),
            flush=True,
        )
    denv.teardown()


def run(world: int, args: list[str], steps: int, compile_blocks: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd += [__file__, "--worker", str(steps), str(int(compile_blocks)), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"benchmark worker failed ({world} rank(s), compile {compile_blocks}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def predicted_gib(args: list[str], world: int, gpu: str) -> float:
    """The dry run's peak for the same config: tracked memory plus the planner's allowance."""
    from stratus.config import load_config, parse_overrides
    from stratus.plan.catalog import load_catalog
    from stratus.train.dryrun import dry_run

    report = dry_run(load_config(None, parse_overrides(args)), world, load_catalog().gpu(gpu))
    return round(report.peak_gib, 2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[4:], int(sys.argv[2]), bool(int(sys.argv[3])))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, 1 and 2 ranks, compile off")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--gpu", default="h100-sxm", help="the catalog GPU the prediction is made for")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args()
    if a.smoke:
        args, worlds, compiles, steps = SMOKE, [1, 2], [False], 2
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA device (or --smoke for the CPU check)")
        args, steps = ONE_B, a.steps
        worlds = sorted({1, torch.cuda.device_count()})
        compiles = [c == "on" for c in a.compile.split(",")]
    rows = []
    for world in worlds:
        predicted = predicted_gib(args, world, a.gpu)
        for compile_blocks in compiles:
            row = {**run(world, args, steps, compile_blocks), "predicted_gib": predicted}
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a"
            print(
                f"{world} x {row['device']} compile {'on' if compile_blocks else 'off'}: "
                f"{row['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak {peak} GiB "
                f"(dry run: {predicted:.2f} GiB tracked)"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
