"""One stream through the serving engine in this process, no HTTP: milliseconds a token.

    python benchmarks/engine_stream.py runs/demo [--threads 1]

The run's model (its context widened to 256 for the RoPE table) with random weights, a
64-token prompt, 128 greedy tokens, five times after a warm-up; prints the median and all
five. What the README's "one stream in-process" row measures. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stratus.config import load_config
from stratus.data.tokenizer import load_tokenizer
from stratus.inference.engine import Engine, EngineConfig
from stratus.inference.request import RequestParams
from stratus.model import Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(f"{args.run}/config.toml")
    torch.manual_seed(0)
    model = Transformer(cfg.model.model_copy(update={"max_seq_len": 256})).eval()
    engine = Engine(model, load_tokenizer(f"{args.run}/tokenizer.json"), EngineConfig()).start()
    params = RequestParams(max_tokens=128, temperature=0, ignore_eos=True)
    prompt = list(range(5, 69))
    engine.generate(prompt, params)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        engine.generate(prompt, params)
        times.append((time.perf_counter() - start) / 128 * 1e3)
    engine.stop()
    print(f"ms a token: median {statistics.median(times):.3f}; {[round(t, 2) for t in times]}")


if __name__ == "__main__":
    main()
