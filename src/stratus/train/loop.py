"""`stratus train`: the training loop. Runs as one process or as every rank under torchrun.

One optimizer step = global_batch sequences: each data-parallel rank runs
global_batch / (micro_batch x ranks) micro batches, accumulating gradients, then clip,
AdamW, schedule. The batch a rank reads is a pure function of the data position (global
samples seen), so resuming from a checkpoint continues the exact sample sequence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from stratus.checkpoint.manager import CheckpointManager, check_same_model
from stratus.checkpoint.manifest import read_manifest as read_ckpt_manifest
from stratus.config import Config, to_toml
from stratus.data.loader import Sampler, TokenSplit, rank_micro_batches
from stratus.data.manifest import check_shard, read_manifest, sha256_file
from stratus.distributed import env as denv
from stratus.distributed.layout import Layout, resolve_layout
from stratus.distributed.parallelize import build_mesh, parallelize
from stratus.errors import StratusError
from stratus.model import Transformer
from stratus.train.console import StepProgress, setup_logging, use_rich
from stratus.train.evaluate import perplexity, validation_loss
from stratus.train.metrics import MetricsWriter, device_peak_flops, peak_memory_gb
from stratus.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("stratus.train")


@dataclass
class Summary:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    unigram_baseline: float | None
    resumed_from: int | None


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> Config:
    """model.vocab_size 0 -> the tokenizer's size rounded up to a multiple of 64 (aligned
    matmuls); an explicit size must hold every token id."""
    if cfg.model.vocab_size == 0:
        return cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"vocab_size": -(-tokenizer_vocab // 64) * 64})}
        )
    if cfg.model.vocab_size < tokenizer_vocab:
        raise StratusError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}): set it to 0 (automatic) or at least {tokenizer_vocab}"
        )
    return cfg


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def train(cfg: Config) -> Summary:
    # Checked on every rank before any collective: a bad layout fails fast everywhere.
    layout = resolve_layout(cfg.parallel, int(os.environ.get("WORLD_SIZE", 1)), cfg.model)
    env = denv.setup(cfg.train.device, cfg.parallel.timeout_s)
    try:
        return _train(cfg, env, layout)
    finally:
        denv.teardown()


def _prepare_run_dir(cfg: Config, env: denv.DistEnv, data_dir: Path) -> Path:
    run = Path(cfg.run.dir)
    # Every rank needs the directory for its own log; on several nodes it must be shared
    # storage (checkpoints are written by all ranks into one DCP directory).
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if env.is_main:
        tmp = run / ".config.toml.tmp"
        tmp.write_text(to_toml(cfg))
        os.replace(tmp, run / "config.toml")
        shutil.copyfile(data_dir / "tokenizer.json", run / ".tokenizer.json.tmp")
        os.replace(run / ".tokenizer.json.tmp", run / "tokenizer.json")
    denv.barrier(env)
    return run


def _verify_shards(data_dir: Path, verify: bool, env: denv.DistEnv) -> None:
    """Rank 0 hashes every shard once (not every rank: that would be ranks x corpus of reads)
    and every rank raises the same error if one is damaged."""
    problem = None
    if verify and env.is_main:
        try:
            for shard in read_manifest(data_dir)["shards"]:
                check_shard(data_dir, shard, verify_checksum=True)
        except StratusError as e:
            problem = str(e)
    problem = denv.broadcast_object(env, problem)
    if problem:
        raise StratusError(problem)


def _check_same_tokenizer(run: Path, data_manifest: dict) -> None:
    """A run continues only on data tokenized with the tokenizer it was trained with."""
    ours = run / "tokenizer.json"
    if ours.is_file() and sha256_file(ours) != data_manifest["tokenizer"]["sha256"]:
        raise StratusError(
            f"data.path's tokenizer differs from the one {run} was trained with: "
            "resume with the run's data, or start a new run.dir"
        )


def _train(cfg: Config, env: denv.DistEnv, layout: Layout) -> Summary:
    tc = cfg.train
    data_dir = Path(cfg.data.path)
    data_manifest = read_manifest(data_dir)
    cfg = resolve_vocab(cfg, int(data_manifest["tokenizer"]["vocab_size"]))
    dp, dp_rank = layout.dp, layout.dp_rank(env.rank)
    global_batch = tc.global_batch or tc.micro_batch * dp
    if global_batch % (tc.micro_batch * dp):
        raise StratusError(
            f"train.global_batch ({global_batch}) must be a multiple of train.micro_batch x data-parallel "
            f"ranks ({tc.micro_batch} x {dp} = {tc.micro_batch * dp})"
        )
    accum = global_batch // (tc.micro_batch * dp)
    _verify_shards(data_dir, cfg.data.verify, env)
    train_split = TokenSplit(data_dir, "train", verify=False)  # sizes are always checked
    sampler = Sampler(train_split, cfg.data.seq_len, tc.seed)
    val_sampler = None
    if cfg.eval.interval and data_manifest["splits"]["val"]["tokens"] > cfg.data.seq_len:
        val_sampler = Sampler(
            TokenSplit(data_dir, "val", verify=False), cfg.data.seq_len, tc.seed, shuffle=False
        )

    rich = use_rich(cfg.log.progress)
    setup_logging(None, env.rank, rich)  # the console, until the run directory is ready
    ckpt = CheckpointManager(
        Path(cfg.run.dir) / "checkpoints", env, cfg.checkpoint.keep, cfg.checkpoint.keep_every
    )
    found = ckpt.find()
    if found and cfg.checkpoint.resume == "never":
        raise StratusError(
            f"{cfg.run.dir} already has a checkpoint ({found[1].name}) and checkpoint.resume is never: "
            "give a new run.dir, or --resume=auto to continue it"
        )
    if found:
        check_same_model(read_ckpt_manifest(found[1])["model"], cfg.model.model_dump(), found[1])
        _check_same_tokenizer(Path(cfg.run.dir), data_manifest)

    run = _prepare_run_dir(cfg, env, data_dir)
    console = setup_logging(run, env.rank, rich)
    set_determinism(tc.seed, tc.deterministic)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    device = env.device
    dtype = (
        torch.bfloat16
        if (tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda"))
        else torch.float32
    )
    # FSDP casts parameters to bf16 itself (and reduces in fp32); elsewhere autocast does.
    fsdp_casts = dtype != torch.float32 and layout.dp > 1
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32 and not fsdp_casts
        else contextlib.nullcontext()
    )

    init = cfg.parallel.init
    if init == "auto":
        init = "meta" if device.type == "cuda" and env.world_size > 1 else "full"
    with torch.device("meta" if init == "meta" else device):
        model = Transformer(cfg.model)  # full: the same seed on every rank gives the same weights
    mesh = build_mesh(layout, device.type) if env.world_size > 1 else None
    parallelize(model, mesh, layout, cfg.parallel, tc.compile, torch.bfloat16 if fsdp_casts else None)
    if init == "meta":  # allocate only this rank's shards, then initialize them in place
        model.to_empty(device=device)
        # Each shard draws its own numbers, and replicas (HSDP) draw the same ones: seed by
        # the position inside the replica group. (DTensor's own offset-based RNG covers CUDA
        # only; on other devices every shard would otherwise repeat the same values.)
        torch.manual_seed(tc.seed + 1 + env.rank % (layout.dp_shard * layout.tp))
        model.init_weights()
    optimizer = build_optimizer(model, tc, device)
    scheduler = build_scheduler(optimizer, tc)
    loss_context = loss_parallel if cfg.parallel.loss_parallel else contextlib.nullcontext

    step, samples_seen, resumed_from = 0, 0, None
    if found:
        loaded = ckpt.load(found[1], model, optimizer)
        step, samples_seen = loaded.step, int(loaded.trainer["samples_seen"])
        scheduler.load_state_dict(loaded.trainer["scheduler"])
        resumed_from = step
        log.info("resumed from %s (step %d, %d samples seen)", found[1], step, samples_seen)

    tokens_per_step = global_batch * cfg.data.seq_len
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak = device_peak_flops(device, dtype, cfg.log.peak_tflops)
    unigram = data_manifest["splits"]["train"].get("unigram_entropy")
    log.info(
        "model %.2fM parameters (%.2fM without embeddings) | %d ranks (%s) | %d data-parallel x %d "
        "micro batch x %d accumulation = %d sequences of %d tokens per step | device %s %s "
        "| unigram baseline %s nats",
        model.num_params() / 1e6,
        model.num_params(False) / 1e6,
        env.world_size,
        layout.describe(),
        dp,
        tc.micro_batch,
        accum,
        global_batch,
        cfg.data.seq_len,
        device,
        str(dtype).removeprefix("torch."),
        unigram,
    )

    metrics = MetricsWriter(run, env.is_main, cfg.log.tensorboard)
    progress = StepProgress(console, rich and env.is_main, step, tc.steps)
    meta = {"config_hash": cfg.hash(), "model": cfg.model.model_dump()}
    last_loss, val_loss = None, None
    window_start, window_steps = time.perf_counter(), 0
    end = tc.stop_at or tc.steps
    try:
        while step < end:
            loss_sum = torch.zeros((), device=device)
            micro = rank_micro_batches(samples_seen, global_batch, tc.micro_batch, dp_rank, dp)
            for i, (first, count) in enumerate(micro):
                x, y = (t.to(device, non_blocking=True) for t in sampler.batch(first, count))
                if isinstance(model, FSDPModule):  # reduce gradients once, after the last micro batch
                    model.set_requires_gradient_sync(i == len(micro) - 1)
                with loss_context():
                    with autocast:
                        logits = model(x)  # (micro_batch, seq, vocab)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / accum).backward()
                loss_sum += _local(loss.detach())
            grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            samples_seen += global_batch
            window_steps += 1

            is_log = step % cfg.log.interval == 0 or step == end
            is_eval = val_sampler is not None and (step % cfg.eval.interval == 0 or step == end)
            if is_log or is_eval:  # one metrics line per step, always with step and loss
                last_loss = denv.all_reduce_mean(env, loss_sum / accum).item()
                record: dict = {"loss": round(last_loss, 5)}
            if is_log:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * window_steps / elapsed
                record.update(
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=round(grad_norm.item(), 5),
                    tokens_per_s=round(tokens_per_s, 1),
                    tokens_per_s_per_device=round(tokens_per_s / dp, 1),
                    mfu=round(flops_per_token * tokens_per_s / (peak * dp), 4) if peak else None,
                    memory_gb=round(denv.all_reduce_max(env, peak_memory_gb(device)), 3),
                    tokens_seen=samples_seen * cfg.data.seq_len,
                )
                eta = (tc.steps - step) * elapsed / window_steps
                log.info(
                    f"step {step}/{tc.steps} | loss {last_loss:.4f} | lr {record['lr']:.2e} "
                    f"| grad {record['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s"
                    + (f" | mfu {record['mfu']:.1%}" if peak else "")
                    + f" | {record['memory_gb']:.2f} GB | eta {eta:.0f}s"
                )
                progress.update(step, f"loss {last_loss:.3f}")
                window_start, window_steps = time.perf_counter(), 0
            if is_eval:
                val_loss, n = validation_loss(
                    model,
                    val_sampler,
                    cfg.eval.batches,
                    tc.micro_batch,
                    env,
                    dp_rank,
                    dp,
                    autocast,
                    loss_context,
                )
                record.update(val_loss=round(val_loss, 5), val_ppl=round(perplexity(val_loss), 3))
                log.info(
                    f"step {step} | validation loss {val_loss:.4f} | perplexity {perplexity(val_loss):.2f} "
                    f"| {n} tokens"
                )
            if is_log or is_eval:
                metrics.write(step, record)

            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == end:
                t = time.perf_counter()
                trainer = {
                    "step": step,
                    "samples_seen": samples_seen,
                    "tokens_seen": samples_seen * cfg.data.seq_len,
                    "scheduler": scheduler.state_dict(),
                }
                path = ckpt.save(step, model, optimizer, trainer, meta)
                log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t)
                window_start += time.perf_counter() - t  # keep saves out of the throughput
    finally:
        progress.close()
        metrics.close()
    if resumed_from is not None and resumed_from >= end:
        log.info(
            "the run in %s is already at step %d (asked to train to %d): nothing to do; "
            "raise train.steps to continue",
            run,
            resumed_from,
            end,
        )
    return Summary(run, step, last_loss, val_loss, unigram, resumed_from)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (a replicated loss or norm), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t
