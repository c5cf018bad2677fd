"""The dry run's measurement on real ranks: run under torchrun (gloo, real tensors), it takes
the same steps as `stratus dryrun` and prints rank 0's peak memory by category as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from stratus.config import load_config, parse_overrides
from stratus.distributed.layout import resolve_layout
from stratus.distributed.parallelize import build_mesh
from stratus.train.dryrun import MICRO_BATCHES_RUN, by_category, measure
from stratus.train.setup import batch_shape

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], parse_overrides(sys.argv[2:]))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    layout = resolve_layout(cfg.parallel, world, cfg.model)
    _, accum = batch_shape(cfg.train, layout)
    _, peak, _ = measure(
        cfg, layout, build_mesh(layout, "cpu"), 2, min(accum, MICRO_BATCHES_RUN), False, rank
    )
    if rank == 0:
        print(json.dumps(by_category(peak)[1]))
    dist.destroy_process_group()
