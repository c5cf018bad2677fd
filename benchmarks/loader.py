"""The data loader beside the training step it feeds: time to assemble one batch (memory-mapped
shards, Feistel-permuted windows) against one training step of the same batch shape.

    python benchmarks/loader.py [--data data/stdlib] [--batch 8] [--seq 256]

Needs prepared data (`stratus prepare --out data/stdlib`, or `make demo`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stratus.config import ModelConfig, TrainConfig
from stratus.data.loader import Sampler, TokenSplit
from stratus.model import Transformer
from stratus.train.optim import build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    split = TokenSplit(args.data, "train", verify=False)
    sampler = Sampler(split, args.seq, seed=0)
    loads = []
    for k in range(200):
        t = time.perf_counter()
        sampler.batch(k * args.batch, args.batch)
        loads.append(time.perf_counter() - t)

    cfg = ModelConfig(vocab_size=split.vocab_size, n_layers=6, d_model=384, n_heads=6, max_seq_len=args.seq)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    steps = []
    for k in range(4):
        x, y = sampler.batch(k * args.batch, args.batch)
        t = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t)

    load_ms, step_ms = statistics.median(loads) * 1e3, statistics.median(steps[1:]) * 1e3
    print(f"{split.n_tokens:,} tokens in {len(split.maps)} shard(s); batch {args.batch} x {args.seq}")
    print(f"loader: {load_ms:.3f} ms per batch (median of 200)")
    print(f"training step (6 x 384 model): {step_ms:.0f} ms")
    print(f"the loader takes {load_ms / step_ms:.3%} of a step")


if __name__ == "__main__":
    main()
