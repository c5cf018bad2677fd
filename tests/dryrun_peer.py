"""The dry run's measurement on real ranks: run under torchrun (gloo, real tensors), it takes
the same steps as `stratus dryrun` and prints, as JSON, rank 0's peak memory by category and
every rank's total peak (a pipeline's stages differ)."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from stratus.config import load_config, parse_overrides
from stratus.distributed.env import teardown
from stratus.distributed.layout import pipeline_rounds, resolve_layout
from stratus.distributed.parallelize import build_mesh
from stratus.train.dryrun import MICRO_BATCHES_RUN, by_category, measure
from stratus.train.setup import batch_shape

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], parse_overrides(sys.argv[2:]))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    layout = resolve_layout(cfg.parallel, world, cfg.model)
    _, accum = batch_shape(cfg.train, layout)
    micro = (
        pipeline_rounds(layout, cfg.parallel, accum)[0] if layout.pp > 1 else min(accum, MICRO_BATCHES_RUN)
    )
    _, peak, _ = measure(cfg, layout, build_mesh(layout, "cpu"), 2, micro, False, rank)
    categories = by_category(peak)[1]
    totals: list = [None] * world
    dist.all_gather_object(totals, sum(categories.values()))
    if rank == 0:
        print(json.dumps({"rank0": categories, "totals": totals}))
    teardown()
