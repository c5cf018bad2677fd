"""Measure this host as a `[cpu.NAME]` entry of the planner's catalog (plan/catalog.toml).

    python benchmarks/cpu_entry.py [NAME] > host.toml
    stratus plan --from-run RUN --catalog host.toml --cpu NAME

Each figure is a micro-benchmark of one physical quantity, none fitted to a training run:
fp32 matmul rate per core at a large and at a small shape (the size curve's half point follows
from the two), memory bandwidth with one core and with all, the fixed cost of one transformer
block's forward and backward at a tiny width (Python, dispatcher and autograd, per kernel), gloo's
all-reduce over loopback (bandwidth and latency, 2 ranks), and the resident memory of a process
that has imported the trainer and run a step of the tiny block (what RSS holds before the model).
The built-in entry `ci-2core` was measured with this script on the CI's class of machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stratus.train.metrics import device_name

REF, SMALL = 2048, 256  # plan/efficiency.py's GEMM_REF_DIM, and a width like the demo's


def _best(fn, repeat: int = 5) -> float:
    fn()  # warm-up: first-touch pages, kernel selection
    return min(_timed(fn) for _ in range(repeat))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_gflops(m: int, n: int, k: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * n * k / _best(lambda: a @ b) / 1e9


def attention_gflops(batch: int = 32, heads: int = 4, seq: int = 128, head_dim: int = 64) -> float:
    """SDPA's causal forward + backward as the planner counts it (cost.py: half the scores'
    4 T s h FLOPs forward, 2.5 times that backward), at a CPU run's short sequences."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    flops = 3.5 * 0.5 * 4 * batch * seq * seq * heads * head_dim
    return (
        flops / _best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()) / 1e9
    )


def copy_gbps() -> float:
    """Bytes read + written per second by a copy far larger than the caches (STREAM's copy)."""
    src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)  # 256 MiB each
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src)) / 1e9


def block_kernel_us() -> float:
    """The fixed cost of a kernel as stratus's block runs it: one tiny block's forward and
    backward, where arithmetic is negligible, divided by the planner's kernel count a block."""
    from stratus.config import ModelConfig
    from stratus.model.llama import Transformer
    from stratus.plan.efficiency import KERNELS_PER_LAYER

    layers = 8
    model = Transformer(ModelConfig(n_layers=layers, d_model=16, n_heads=2, vocab_size=16, max_seq_len=8))
    tokens = torch.zeros(1, 8, dtype=torch.long)
    base = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=16, max_seq_len=8))

    def step(net):
        return lambda: net(tokens).float().sum().backward()

    per_block = (_best(step(model), 20) - _best(step(base), 20)) / (layers - 1)
    return per_block / KERNELS_PER_LAYER * 1e6


def _gloo_rank(rank: int, store: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    small, big = torch.ones(1), torch.ones(16 * 2**20)  # 4 bytes, 64 MiB
    lat = [_timed(lambda: dist.all_reduce(small)) for _ in range(200)][20:]
    bw = [_timed(lambda: dist.all_reduce(big)) for _ in range(6)][1:]
    if rank == 0:
        t_small, t_big = statistics.median(lat), min(bw)
        # ring all-reduce over 2 ranks: bus bytes = 2 (n - 1) / n x size = size
        out.put((t_small * 1e6, big.numel() * 4 / (t_big - t_small) / 1e9))
    dist.destroy_process_group()


def gloo() -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_gloo_rank, args=(r, f"{d}/store", out)) for r in range(2)]
        for p in procs:
            p.start()
        result = out.get(timeout=300)
        for p in procs:
            p.join()
    return result


def rss_baseline_gb() -> float:
    """Peak RSS of a fresh process that imports the trainer and runs the tiny block's step."""
    code = (
        "import resource, torch, stratus.train.loop, stratus.train.setup;"
        "from stratus.config import ModelConfig; from stratus.model.llama import Transformer;"
        "m = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=16, max_seq_len=8));"
        "m(torch.zeros(1, 8, dtype=torch.long)).sum().backward();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout
    return int(out) / 2**20  # Linux reports KiB


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "host"
    rss_gb = rss_baseline_gb()
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    ref = matmul_gflops(REF, REF, REF)
    small = matmul_gflops(16 * SMALL, SMALL, SMALL)
    attention = attention_gflops()
    core_bw = copy_gbps()
    kernel_us = block_kernel_us()
    torch.set_num_threads(cores)
    host_ref = matmul_gflops(REF, REF, REF)
    host_bw = copy_gbps()
    lat_us, gloo_gbps = gloo()
    # gemm_efficiency's curve s / (s + H), normalised at REF: solve H from the two rates
    r = small / ref
    half = REF * SMALL * (1 - r) / (REF * r - SMALL) if REF * r > SMALL else 0.0
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    ram = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal"))  # KiB
    model = device_name(torch.device("cpu")).removeprefix("CPU (").split(",")[0]
    print(f"""# measured by benchmarks/cpu_entry.py on {time.strftime("%Y-%m-%d")}, torch {torch.__version__}
# all {cores} cores: {host_ref:.1f} GFLOP/s fp32 matmul at {REF}, {host_bw:.1f} GB/s copy
[cpu.{name}]
name = "{model}, {cores} cores, {ram / 2**20:.1f} GiB"
cores = {cores}
ram_gb = {ram / 2**20:.1f}
fp32_gflops_per_core = {ref:.1f}  # matmul {REF}^3, one thread
gemm_half_dim = {half:.0f}  # from {small:.1f} GFLOP/s at ({16 * SMALL} x {SMALL}) @ ({SMALL} x {SMALL})
attention_fraction = {attention / ref:.2f}  # SDPA causal fwd + bwd, 32 x 4 heads x 128 x 64
core_gbps = {core_bw:.1f}  # copy, read + write, one thread
dram_gbps = {host_bw:.1f}  # copy, read + write, all threads
kernel_us = {kernel_us:.1f}  # a block's forward + backward at width 16, per kernel
gloo_gbps = {gloo_gbps:.2f}  # all-reduce bus bandwidth over loopback, 2 ranks, 64 MiB
gloo_latency_us = {lat_us:.0f}  # all-reduce of 4 bytes, 2 ranks
rss_baseline_gb = {rss_gb:.2f}  # peak RSS, GiB: torch, the trainer's modules, a tiny step""")


if __name__ == "__main__":
    main()
