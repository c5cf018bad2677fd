"""Everything a training run is built from, assembled once: data, model (sharded by the
layout), optimizer and schedule, checkpoint manager, run directory, logging."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from stratus.atomic import copy_atomic, write_atomic
from stratus.checkpoint.local import LocalTier, newest_of_tiers
from stratus.checkpoint.manager import CheckpointManager, check_same_model
from stratus.checkpoint.manifest import read_manifest as read_ckpt_manifest
from stratus.config import Config, TrainConfig, to_toml
from stratus.data.chat_template import CONFIG_FILE
from stratus.data.loader import Sampler, TokenSplit
from stratus.data.manifest import read_manifest, sha256_file
from stratus.data.packing import ChatSampler, PairSampler
from stratus.data.tokenizer import load_tokenizer
from stratus.data.verify import ShardVerifier
from stratus.distributed import env as denv
from stratus.distributed.layout import Layout, pipeline_rounds
from stratus.distributed.parallelize import build_mesh, parallelize
from stratus.distributed.pipeline import V_SHAPED, Activations, Parts, Pipeline, build_pipeline, split_model
from stratus.distributed.pipeline import describe as describe_pipeline
from stratus.errors import StratusError
from stratus.model import Transformer
from stratus.train.console import setup_logging, use_rich
from stratus.train.dpo import build_objective
from stratus.train.finetune import load_initial, resolve_init
from stratus.train.optim import build_optimizer, build_scheduler
from stratus.train.step import TOKEN_LOSS

log = logging.getLogger("stratus.train")


@dataclass
class Job:
    cfg: Config  # with model.vocab_size resolved
    env: denv.DistEnv
    layout: Layout
    run: Path
    data_manifest: dict[str, Any]
    sampler: Sampler
    val_sampler: Sampler | None
    shard_check: ShardVerifier | None  # the data shards' checksums, running in the background
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ckpt: CheckpointManager
    local: LocalTier | None  # the node-local tier, if checkpoint.local_dir is set
    resume_from: Path | None  # the newest verified checkpoint of either tier, if any
    global_batch: int
    accum: int
    dtype: torch.dtype
    autocast: contextlib.AbstractContextManager
    loss_context: Any
    console: Any
    rich: bool
    objective: Any = TOKEN_LOSS  # what a micro batch's loss is (step.TokenLoss, dpo.DPOLoss)
    pipeline: Pipeline | None = None  # the schedule over this rank's stages, when parallel.pp > 1

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.env.rank)


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


def _prepare_run_dir(cfg: Config, env: denv.DistEnv, data_dir: Path) -> Path:
    run = Path(cfg.run.dir)
    # Every rank needs the directory for its own log; on several nodes it must be shared
    # storage (checkpoints are written by all ranks into one DCP directory).
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if env.is_main:
        write_atomic(run / "config.toml", to_toml(cfg))
        copy_atomic(data_dir / "tokenizer.json", run / "tokenizer.json")
        if (data_dir / CONFIG_FILE).is_file():  # the chat template travels with the tokenizer
            copy_atomic(data_dir / CONFIG_FILE, run / CONFIG_FILE)
    denv.barrier(env)
    return run


def _check_format(cfg: Config, manifest: dict, data_dir: Path) -> str:
    """The data's kind (text, chat or preferences), which data.format and train.objective
    must agree with."""
    kind = manifest.get("kind", "text")
    dpo = cfg.train.objective == "dpo"
    if dpo != (kind == "preferences"):
        raise StratusError(
            f"train.objective = dpo trains on preference pairs, and {data_dir} holds "
            f"{'them' if kind == 'preferences' else kind + ' data'}: "
            + (
                "set train.objective = dpo"
                if kind == "preferences"
                else "prepare pairs with --format preferences"
            )
        )
    if (kind != "text") != (cfg.data.format == "chat"):
        hint = "text" if kind == "text" else "chat"
        raise StratusError(
            f"{data_dir} holds {'plain text' if kind == 'text' else kind} data but data.format is "
            f"{cfg.data.format}: set data.format = {hint}"
        )
    return kind


def _samplers(cfg: Config, data_dir: Path, manifest: dict, kind: str):
    """The training sampler and, when validation is on and the split is big enough, the
    validation one (fixed order). DPO reports its reward margin and accuracy instead."""
    seq, seed = cfg.data.seq_len, cfg.train.seed
    if kind == "preferences":
        sampler = PairSampler(data_dir, "train", seq, seed)
        return sampler, None
    if kind == "chat":
        sampler = ChatSampler(data_dir, "train", seq, seed)
        want_val = cfg.eval.interval and manifest["splits"]["val"]["documents"] > 0
        return sampler, (ChatSampler(data_dir, "val", seq, seed, shuffle=False) if want_val else None)
    sampler = Sampler(TokenSplit(data_dir, "train", verify=False), seq, seed)
    if not (cfg.eval.interval and manifest["splits"]["val"]["tokens"] > seq):
        return sampler, None
    return sampler, Sampler(TokenSplit(data_dir, "val", verify=False), seq, seed, shuffle=False)


def _check_same_tokenizer(run: Path, data_manifest: dict) -> None:
    """A run continues only on data tokenized with the tokenizer it was trained with."""
    ours = run / "tokenizer.json"
    if ours.is_file() and sha256_file(ours) != data_manifest["tokenizer"]["sha256"]:
        raise StratusError(
            f"data.path's tokenizer differs from the one {run} was trained with: "
            "resume with the run's data, or start a new run.dir"
        )


def batch_shape(tc: TrainConfig, layout: Layout) -> tuple[int, int]:
    """The global batch in sequences, and the micro batches each data-parallel rank runs."""
    dp = layout.dp
    global_batch = tc.global_batch or tc.micro_batch * dp
    if global_batch % (tc.micro_batch * dp):
        raise StratusError(
            f"train.global_batch ({global_batch}) must be a multiple of train.micro_batch x data-parallel "
            f"ranks ({tc.micro_batch} x {dp} = {tc.micro_batch * dp})"
        )
    return global_batch, global_batch // (tc.micro_batch * dp)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_job(cfg: Config, layout: Layout) -> None:
    """What the layout asks of the rest of the config, checked on every rank before anything
    is written or joined."""
    _, accum = batch_shape(cfg.train, layout)
    if layout.pp == 1:
        return
    pipeline_rounds(layout, cfg.parallel, accum)
    if cfg.parallel.pp_schedule == "zbv" and torch_version() < (2, 13):
        raise StratusError(
            f"parallel.pp_schedule = zbv needs torch 2.13 or later (this is {torch.__version__}): "
            "torch 2.9's ZBV schedule sends to its own rank, which gloo cannot (2.10-2.12 untested); "
            "choose dualpipev, the other V schedule"
        )
    if cfg.parallel.pp_schedule in V_SHAPED and cfg.eval.interval:
        # torch 2.13's V schedules run their backward actions in eval() too, and fail
        raise StratusError(
            f"parallel.pp_schedule = {cfg.parallel.pp_schedule} cannot run validation (torch's V "
            "schedules have no forward-only mode): set eval.interval = 0, or choose interleaved_zb"
        )
    if cfg.train.objective == "dpo":
        raise StratusError(
            "train.objective = dpo does not run under pipeline parallelism yet (its loss needs both "
            "sequences of a pair at once): set parallel.pp = 1"
        )


def precision(
    dtype_name: str, device: torch.device, layout: Layout
) -> tuple[torch.dtype, contextlib.AbstractContextManager, torch.dtype | None]:
    """The compute dtype, the autocast context, and the parameter dtype FSDP casts to."""
    dtype = (
        torch.bfloat16
        if (dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda"))
        else torch.float32
    )
    # FSDP casts parameters to bf16 itself (and reduces in fp32); elsewhere autocast does.
    fsdp_casts = dtype != torch.float32 and layout.dp > 1
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32 and not fsdp_casts
        else contextlib.nullcontext()
    )
    return dtype, autocast, torch.bfloat16 if fsdp_casts else None


def make_pipeline(
    cfg: Config,
    layout: Layout,
    mesh: DeviceMesh,
    parts: Parts,
    device: torch.device,
    per_round: int,
    dtype: torch.dtype,
    param_dtype: torch.dtype | None,
) -> Pipeline:
    """The job's pipeline schedule over its stages, with what flows between them declared
    up front: a micro batch's hidden states (the residual stream is FSDP's parameter dtype,
    else fp32 under autocast too) and the last stage's logits."""
    flows = Activations(
        cfg.train.micro_batch, cfg.data.seq_len, cfg.model, layout.tp, param_dtype or torch.float32, dtype
    )
    group = mesh["pp"].get_group()
    return build_pipeline(parts, layout, group, device, cfg.parallel.pp_schedule, per_round, flows)


def sharded_model(
    cfg: Config,
    layout: Layout,
    mesh: DeviceMesh | None,
    device: torch.device,
    init: str,
    param_dtype: torch.dtype | None,
    rank: int = 0,
) -> Parts:
    """This rank's part of the model (all of it without pipelining), parallelized over the
    mesh: on the meta device (shapes only) with init "meta", else initialized in full on the
    device (the same seed on every rank gives the same weights in every layout)."""
    with torch.device("meta" if init == "meta" else device):
        model = Transformer(cfg.model)
    pc = cfg.parallel
    parts = split_model(model, layout, layout.pp_rank(rank), pc.pp_schedule)
    for module in parts.stage_modules:
        parallelize(module, mesh, layout, pc, cfg.train.compile, param_dtype)
        if module is not model:  # a stage's view: blocks it wrapped (checkpointing) are the model's too
            for name, block in module.layers.items():
                model.layers[name] = block
    return parts


def materialize(
    model: nn.Module, device: torch.device, seed: int, rank: int, layout: Layout, views: list | None = None
) -> None:
    """Allocate only this rank's shards of a meta model, then initialize them in place.

    With pipeline stage views (several stages a rank) FSDP's roots are the views: each is
    allocated through its own root, so that FSDP re-points its shards, and the views then
    share the model's RoPE tables again."""
    views = [v for v in views or [] if v is not model]
    if views:
        for view in views:
            view.to_empty(device=device)
        for name in ("rope_cos", "rope_sin"):
            setattr(model, name, torch.empty_like(getattr(model, name), device=device))
    else:
        model.to_empty(device=device)
    # Each shard draws its own numbers, and replicas (HSDP) draw the same ones: seed by
    # the position inside the replica group, and pipeline stages apart. (DTensor's own
    # offset-based RNG covers CUDA only; on other devices every shard would otherwise
    # repeat the same values.)
    group = layout.dp_shard * layout.tp
    torch.manual_seed(seed + 1 + layout.pp_rank(rank) * group + rank % group)
    model.init_weights()
    for view in views:
        view.rope_cos, view.rope_sin = model.rope_cos, model.rope_sin


def build_job(cfg: Config, env: denv.DistEnv, layout: Layout) -> Job:
    tc = cfg.train
    data_dir = Path(cfg.data.path)
    data_manifest = read_manifest(data_dir)
    kind = _check_format(cfg, data_manifest, data_dir)
    tokenizer_vocab = int(data_manifest["tokenizer"]["vocab_size"])
    if tc.init_from:
        cfg = resolve_init(cfg, tokenizer_vocab, load_tokenizer(data_dir / "tokenizer.json"))
    cfg = resolve_vocab(cfg, tokenizer_vocab)
    global_batch, accum = batch_shape(tc, layout)
    # Start-up checks every shard's size (a stat each); checksums run in the background.
    verifier = (
        ShardVerifier(data_dir, data_manifest["shards"], env.rank, env.world_size)
        if cfg.data.verify
        else None
    )
    sampler, val_sampler = _samplers(cfg, data_dir, data_manifest, kind)

    rich = use_rich(cfg.log.progress)
    setup_logging(None, env.rank, rich)  # the console, until the run directory is ready
    async_group = None
    if cfg.checkpoint.async_save and env.distributed:
        # background writes run collectives of their own: keep them off training's group
        async_group = torch.distributed.new_group(backend="gloo")
    ckpt = CheckpointManager(
        Path(cfg.run.dir) / "checkpoints", env, cfg.checkpoint.keep, cfg.checkpoint.keep_every, async_group
    )
    local = None
    if cfg.checkpoint.local_dir:
        cc = cfg.checkpoint
        local = LocalTier(Path(cc.local_dir), env, layout.describe(), cfg.model.model_dump(), cc.local_keep)
    found = newest_of_tiers(ckpt, local)
    if local is not None and found is None:
        local.forget_after(0)  # nothing to resume: whatever is there is from a future left behind
    if found and cfg.checkpoint.resume == "never":
        raise StratusError(
            f"{cfg.run.dir} already has a checkpoint ({found[1].name}) and checkpoint.resume is never: "
            "give a new run.dir, or --resume=auto to continue it"
        )
    if found:
        if local is None or not local.holds(found[1]):  # the local tier matches the model itself
            check_same_model(read_ckpt_manifest(found[1])["model"], cfg.model.model_dump(), found[1])
        _check_same_tokenizer(Path(cfg.run.dir), data_manifest)

    run = _prepare_run_dir(cfg, env, data_dir)
    console = setup_logging(run, env.rank, rich)
    if kind != "text":
        log.info("%s data: %s", kind, sampler.describe())
    set_determinism(tc.seed, tc.deterministic)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    device = env.device
    dtype, autocast, param_dtype = precision(tc.dtype, device, layout)
    init = cfg.parallel.init
    if init == "auto":
        init = "meta" if device.type == "cuda" and env.world_size > 1 else "full"
    mesh = build_mesh(layout, device.type) if env.world_size > 1 else None
    parts = sharded_model(cfg, layout, mesh, device, init, param_dtype, env.rank)
    model = parts.model
    if init == "meta":
        materialize(model, device, tc.seed, env.rank, layout, parts.stage_modules)
    if tc.init_from and not found:
        load_initial(model, cfg, env)  # a resumed run has weights of its own
    optimizer = build_optimizer(model, tc, device)
    pipe = None
    if layout.pp > 1:
        per_round, _ = pipeline_rounds(layout, cfg.parallel, accum)
        pipe = make_pipeline(cfg, layout, mesh, parts, device, per_round, dtype, param_dtype)
        log.info("pipeline: %s, schedule %s", describe_pipeline(parts), cfg.parallel.pp_schedule)
    job = Job(
        cfg=cfg,
        env=env,
        layout=layout,
        run=run,
        data_manifest=data_manifest,
        sampler=sampler,
        val_sampler=val_sampler,
        shard_check=verifier,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, tc),
        ckpt=ckpt,
        local=local,
        resume_from=found[1] if found else None,
        global_batch=global_batch,
        accum=accum,
        dtype=dtype,
        autocast=autocast,
        loss_context=loss_parallel if cfg.parallel.loss_parallel else contextlib.nullcontext,
        console=console,
        rich=rich,
        pipeline=pipe,
    )
    if tc.objective == "dpo":
        # the reference is the model as it starts, before any update: computed once, then
        # read back from the run directory when the run resumes
        job.objective = build_objective(job, autocast, resuming=found is not None)
    return job
