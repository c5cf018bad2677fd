"""CPU training-step throughput of stratus beside a plain nanoGPT-style GPT and the matmul ceiling.

One training step = forward, cross-entropy, backward, grad clipping, AdamW, zero_grad; fp32, eager,
torch.set_num_threads(--threads). Both models have the same shape (6 layers, d_model 384, 6 heads,
seq 256, vocab 8192, batch 8, tied embeddings) and are stepped alternately (A, B, A, B, ...) so
background noise hits both alike; the median step time of each is reported. Achieved FLOP/s uses
the same count for both, 6 * (non-embedding matmul params + vocab * d) + 12 * L * d * T per token
(stratus.counts.model_flops_per_token for stratus; the peer's from its own parameter count).

    python benchmarks/train_cpu.py [--threads 2] [--warmup 3] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from stratus import counts
from stratus.config import ModelConfig, TrainConfig
from stratus.model import Transformer
from stratus.train.optim import build_optimizer, build_scheduler

LAYERS, D_MODEL, HEADS, SEQ, VOCAB, BATCH = 6, 384, 6, 256, 8192, 8
TARGET = 1.1  # stratus's achieved FLOP/s over the peer's


# --- the peer: a plain nanoGPT-style GPT (Karpathy's nanoGPT model.py, bias=True, dropout 0) ------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, layers: int, d: int, heads: int):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, d),
                wpe=nn.Embedding(block_size, d),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList([GPTBlock(d, heads) for _ in range(layers)]),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def flops_per_token(self, seq_len: int) -> int:
        """The stratus formula: 6 * (params without the wte/wpe lookups + the lm_head matmul) + 12 L d T."""
        d = self.lm_head.in_features
        lookups = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        non_embedding = sum(p.numel() for p in self.parameters()) - lookups  # tied wte counted once
        return 6 * (non_embedding + self.lm_head.weight.numel()) + 12 * len(self.transformer.h) * d * seq_len


def peer_optimizer(
    model: GPT, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers on CPU: decay on 2D params, torch's default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# --- measurement ---------------------------------------------------------------------------------


def busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is in user)
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def matmul_gflops(n: int, reps: int) -> float:
    """Median GFLOP/s of an n x n fp32 matmul: the machine's practical ceiling at this thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the square ceiling matmul")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --steps >= 1, --warmup >= 0 and --threads >= 1")
    torch.set_num_threads(args.threads)

    ceiling = matmul_gflops(args.matmul_n, reps=10)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    # stratus, as the training loop builds and steps it
    torch.manual_seed(1337)
    mcfg = ModelConfig(
        vocab_size=VOCAB,
        n_layers=LAYERS,
        d_model=D_MODEL,
        n_heads=HEADS,
        max_seq_len=SEQ,
        tie_embeddings=True,
    )
    tcfg = TrainConfig(micro_batch=BATCH, dtype="float32", device="cpu", threads=args.threads)
    model = Transformer(mcfg)
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    sched = build_scheduler(opt, tcfg)

    def stratus_step() -> None:
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    # the peer, as nanoGPT's train.py steps it
    torch.manual_seed(1337)
    peer = GPT(VOCAB, SEQ, LAYERS, D_MODEL, HEADS)
    peer_opt = peer_optimizer(peer, tcfg.lr, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2))

    def peer_step() -> None:
        loss = peer(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), tcfg.grad_clip)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    runs = {
        "stratus": (stratus_step, counts.model_flops_per_token(counts.shape_of(mcfg, SEQ))),
        "nanogpt": (peer_step, peer.flops_per_token(SEQ)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    busy0, own0, wall0 = None, 0.0, 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            busy0, own0, wall0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            t = time.perf_counter()
            runs[name][0]()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    # Other processes' CPU use while timing, in cores. Contention skews the figures, and unevenly:
    # each parallel kernel waits for its slowest thread, so a step slows far more than the load.
    busy1 = busy_cpu_s()
    background = None
    if busy0 is not None and busy1 is not None:
        elapsed = time.perf_counter() - wall0
        background = max(0.0, (busy1 - busy0 - (own_cpu_s() - own0)) / elapsed)

    tokens = BATCH * SEQ
    result: dict = {
        "shape": {
            "layers": LAYERS,
            "d_model": D_MODEL,
            "heads": HEADS,
            "seq": SEQ,
            "vocab": VOCAB,
            "batch": BATCH,
        },
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "torch": torch.__version__,
        "matmul": {"n": args.matmul_n, "gflops": round(ceiling, 1)},
        "background_cores": None if background is None else round(background, 2),
        "models": {},
    }
    for name, (_, fpt) in runs.items():
        step_s = statistics.median(times[name])
        gflops = fpt * tokens / step_s / 1e9
        result["models"][name] = {
            "flops_per_token": fpt,
            "step_ms": round(step_s * 1e3, 1),
            "step_ms_min": round(min(times[name]) * 1e3, 1),
            "tokens_per_s": round(tokens / step_s, 1),
            "gflops": round(gflops, 2),
            "fraction_of_matmul": round(gflops / ceiling, 4),
        }
    m = result["models"]
    ratio = m["stratus"]["gflops"] / m["nanogpt"]["gflops"]
    result["ratio"] = round(ratio, 3)
    result["target"] = TARGET
    result["meets_target"] = ratio >= TARGET

    if args.json:
        print(json.dumps(result))
        return
    print(
        f"fp32 eager training step (fwd + bwd + clip + AdamW), {LAYERS} layers, d_model {D_MODEL}, "
        f"{HEADS} heads, seq {SEQ}, vocab {VOCAB}, batch {BATCH}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(f"median of {args.steps} timed steps per model after {args.warmup} warmup, models interleaved")
    if background is not None:
        quiet = "quiet" if background < 0.2 else "WARNING: contended, rerun on an idle machine"
        print(f"other processes used {background:.2f} cores while timing ({quiet})")
    print(f"ceiling: {args.matmul_n}x{args.matmul_n} fp32 matmul {ceiling:8.1f} GFLOP/s")
    head = ("model", "FLOPs/token", "step ms", "min ms", "tokens/s", "GFLOP/s", "of matmul")
    print(f"{head[0]:<10} {head[1]:>12} {head[2]:>9} {head[3]:>8} {head[4]:>9} {head[5]:>8} {head[6]:>10}")
    for name, r in m.items():
        print(
            f"{name:<10} {r['flops_per_token']:>12,} {r['step_ms']:>9.1f} {r['step_ms_min']:>8.1f} "
            f"{r['tokens_per_s']:>9,.0f} {r['gflops']:>8.1f} {r['fraction_of_matmul']:>10.1%}"
        )
    print(f"stratus / nanoGPT-style achieved FLOP/s: {ratio:.2f}x (target >= {TARGET}x)")


if __name__ == "__main__":
    main()
