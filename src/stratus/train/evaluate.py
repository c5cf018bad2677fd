"""Validation loss: the same fixed windows every time, split over the data-parallel ranks."""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from stratus.data.loader import Sampler
from stratus.data.packing import IGNORE
from stratus.distributed.env import DistEnv
from stratus.distributed.pipeline import Pipeline
from stratus.train.step import token_loss_sum

log = logging.getLogger("stratus.train")


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    sampler: Sampler,
    batches: int,
    micro_batch: int,
    env: DistEnv,
    dp_rank: int = 0,
    dp_size: int = 1,
    autocast: contextlib.AbstractContextManager | None = None,
    loss_context=contextlib.nullcontext,
    pipeline: Pipeline | None = None,
) -> tuple[float, int]:
    """Mean next-token loss (nats) over the first `batches` x micro_batch windows of the split
    (fewer if the split is smaller), and the number of tokens it covered. Under pipeline
    parallelism a forward is a round of the pipeline's micro batches, and only the last
    stage counts."""
    was_training = model.training
    model.eval()
    n = min(batches * micro_batch, sampler.n_windows)
    rows = micro_batch * (pipeline.microbatches if pipeline else 1)  # windows a forward
    n_batches = -(-n // rows)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # (loss sum, tokens)
    # Every rank runs the same number of forward passes (FSDP and TP all-gather inside
    # them); a rank with no batch left in the last round repeats batch 0 and ignores it.
    for round_ in range(-(-n_batches // dp_size)):
        b = round_ * dp_size + dp_rank
        first = (b if b < n_batches else 0) * rows
        x, y, *doc = (t.to(env.device) for t in sampler.batch(first, min(rows, n - first)))
        with loss_context(), autocast or contextlib.nullcontext():
            if pipeline is None:
                loss_sum = token_loss_sum(model(x, doc=doc[0]) if doc else model(x), y)
            else:
                loss_sum = _pipelined_loss_sum(pipeline, rows, x, y, doc[0] if doc else None)
        if b < n_batches and loss_sum is not None:
            total[0] += (loss_sum.full_tensor() if isinstance(loss_sum, DTensor) else loss_sum).double()
            total[1] += (y != IGNORE).sum()
    if env.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item(), int(total[1].item())


def _pipelined_loss_sum(
    pipeline: Pipeline, rows: int, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor | None
) -> torch.Tensor | None:
    """The loss sum of one pipeline round on the last stage (None on the others). A short
    last batch is filled up to the round's size with rows whose targets are ignored."""
    if (pad := rows - x.shape[0]) > 0:
        x = torch.cat([x, x[:1].expand(pad, -1)])
        y = torch.cat([y, torch.full_like(y[:1], IGNORE).expand(pad, -1)])
        doc = torch.cat([doc, doc[:1].expand(pad, -1)]) if doc is not None else None
    pipeline.loss = token_loss_sum
    losses = pipeline.run(x, y, doc, train=False)
    return sum(losses[1:], losses[0]) if losses else None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def evaluate_trained(
    path: str, data: str | None = None, batches: int = 100, micro_batch: int = 8, seq_len: int | None = None
) -> dict:
    """`stratus eval`: validation loss and perplexity of a run, checkpoint or export, on the
    validation split of its prepared data (or --data)."""
    from pathlib import Path

    from stratus.checkpoint.load import load_trained
    from stratus.config import load_config
    from stratus.data.loader import TokenSplit
    from stratus.data.packing import ChatSampler
    from stratus.distributed.env import DistEnv, pick_device
    from stratus.errors import StratusError
    from stratus.train.finetune import resized

    device = pick_device("auto")
    trained = load_trained(path, device)
    run_cfg = None
    if trained.run_dir is not None and (trained.run_dir / "config.toml").is_file():
        run_cfg = load_config(trained.run_dir / "config.toml")
    data_dir = data or (run_cfg.data.path if run_cfg else None)
    if data_dir is None:
        raise StratusError(f"{path} does not say which data it was trained on: give --data DIR")
    seq_len = seq_len or (run_cfg.data.seq_len if run_cfg else trained.model.cfg.max_seq_len)
    split = TokenSplit(Path(data_dir), "val", verify=True)
    chat = split.manifest.get("kind") == "chat"
    if split.n_tokens <= (0 if chat else seq_len):
        raise StratusError(
            f"the validation split of {data_dir} has {split.n_tokens} tokens: too few to evaluate"
        )
    model = trained.model
    if chat:
        # A base model meets the chat tokens here for the first time: it is scored as
        # fine-tuning would start from it, with their rows at the mean of its own (and a
        # RoPE table as long as the context it is scored at).
        model = resized(model, split.vocab_size, seq_len)
        sampler = ChatSampler(Path(data_dir), "val", seq_len, seed=0, shuffle=False)
    else:
        sampler = Sampler(split, seq_len, seed=0, shuffle=False)
    env = DistEnv(0, 1, 0, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    loss, tokens = validation_loss(model, sampler, batches, micro_batch, env, autocast=autocast)
    return {
        "step": trained.step,
        "checkpoint": str(trained.source),
        "data": str(data_dir),
        "val_loss": loss,
        "perplexity": perplexity(loss),
        "tokens": tokens,
    }


class Validator:
    """The trainer's validation: due every eval.interval steps and at the last one."""

    def __init__(self, job, watchdog):
        self.job, self.watchdog = job, watchdog
        self.val_loss: float | None = None

    def due(self, step: int, end: int) -> bool:
        interval = self.job.cfg.eval.interval
        return self.job.val_sampler is not None and (step % interval == 0 or step == end)

    def run(self, step: int) -> dict:
        job = self.job
        self.val_loss, n = validation_loss(
            job.model,
            job.val_sampler,
            job.cfg.eval.batches,
            job.cfg.train.micro_batch,
            job.env,
            job.dp_rank,
            job.layout.dp,
            job.autocast,
            job.loss_context,
            job.pipeline,
        )
        ppl = perplexity(self.val_loss)
        log.info(f"step {step} | validation loss {self.val_loss:.4f} | perplexity {ppl:.2f} | {n} tokens")
        self.watchdog.beat()
        return {"val_loss": round(self.val_loss, 5), "val_ppl": round(ppl, 3)}
