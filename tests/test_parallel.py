"""Data, FSDP, HSDP and tensor parallelism on real gloo ranks under torchrun: every layout
computes the same training as one process, checkpoints reshard between layouts, and a bad
layout fails fast on every rank."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.load import load_trained
from stratus.config import ParallelConfig, load_config, parse_overrides
from stratus.distributed.layout import resolve_layout
from stratus.errors import StratusError
from tests.conftest import ROOT, TINY_ARGS, metrics

TINY = TINY_ARGS


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stratus", *args]
    if n > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "stratus",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def train_run(n: int, run: Path, data: Path, *args: str) -> list[dict]:
    r = torchrun(n, "train", f"--data.path={data}", f"--run.dir={run}", *TINY, *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return metrics(run)


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    train_run(1, run, tiny_data, "--train.micro_batch=8", "--train.steps=4", "--checkpoint.interval=2")
    return run


EVAL = ["--eval.interval=4", "--eval.batches=5"]
LAYOUTS = {
    "dp_replicate2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.micro_batch=4"]),
    "dp_shard2": (2, ["--parallel.dp_shard=2", "--train.micro_batch=4"]),
    "tp2": (2, ["--parallel.tp=2", "--train.micro_batch=8"]),
    # validation inside these runs covers 5 micro batches of 4: uneven over 2 data-parallel ranks
    "hsdp_2x2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--train.micro_batch=2"]),
    "dp_shard2_tp2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.micro_batch=4", *EVAL]),
    "tp2_loss_parallel": (
        2,
        ["--parallel.tp=2", "--parallel.loss_parallel=true", "--train.micro_batch=4", *EVAL],
    ),
    "dp_shard2_selective_ac": (
        2,
        ["--parallel.dp_shard=2", "--parallel.activation_checkpoint=selective", "--train.micro_batch=4"],
    ),
    "one_rank_full_ac_accumulation": (1, ["--parallel.activation_checkpoint=full", "--train.micro_batch=2"]),
    # 4 micro batches a rank: gradients reduce-scattered after each one, summed in shards
    "dp_shard2_accumulation4": (2, ["--parallel.dp_shard=2", "--train.micro_batch=1"]),
    # 2 micro batches a rank: the replicas' all-reduce waits for the last one
    "hsdp_2x2_accumulation2": (
        4,
        ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--train.micro_batch=1"],
    ),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_like_one_process(name, reference: Path, tiny_data: Path, tmp_path: Path):
    n, args = LAYOUTS[name]
    rows = train_run(n, tmp_path / name, tiny_data, *args, "--train.steps=4", "--checkpoint.interval=4")
    ref = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(ref, rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    if "--eval.interval=4" in args:  # the sharded validation equals one process's over the same windows
        r = torchrun(1, "eval", str(tmp_path / name), "--batches=5", "--micro-batch=4", "--json")
        assert r.returncode == 0, r.stderr
        assert rows[-1]["val_loss"] == pytest.approx(json.loads(r.stdout)["val_loss"], rel=1e-4)
    # the sharded checkpoint loads whole in one process (DCP reshards) with the same weights
    ours, theirs = (
        load_trained(tmp_path / name).model.state_dict(),
        load_trained(reference).model.state_dict(),
    )
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5)


def _full_state(run: Path) -> tuple[dict, dict]:
    """Model weights and AdamW state of a run's newest checkpoint, loaded whole in one process."""
    from stratus.checkpoint.manager import CheckpointManager, newest_verified
    from stratus.checkpoint.manifest import read_manifest
    from stratus.config import ModelConfig, TrainConfig
    from stratus.distributed.env import DistEnv
    from stratus.model import Transformer
    from stratus.train.optim import build_optimizer

    _, path = newest_verified(run / "checkpoints")
    model = Transformer(ModelConfig.model_validate(read_manifest(path)["model"]))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    CheckpointManager(run / "checkpoints", DistEnv(0, 1, 0, torch.device("cpu"))).load(path, model, opt)
    names = dict(zip(model.parameters(), (n for n, _ in model.named_parameters()), strict=True))
    return model.state_dict(), {f"{names[p]}.{k}": v for p, st in opt.state.items() for k, v in st.items()}


def test_checkpoint_reshards_between_layouts(reference: Path, tiny_data: Path, tmp_path: Path):
    """Step 1 under 4 ranks (dp_shard 2 x tp 2), step 2 under 2 ranks (dp_shard 2), step 3
    under 1 rank, step 4 under 4 ranks again: each resume loads the previous layout's
    checkpoint, and the run ends with the losses, weights and optimizer state of the run that
    was never resharded."""
    run = tmp_path / "resharded"
    common = ["--train.steps=4", "--checkpoint.interval=1"]
    four = ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.micro_batch=4"]
    train_run(4, run, tiny_data, *four, "--train.stop_at=1", *common)
    train_run(
        2, run, tiny_data, "--parallel.dp_shard=2", "--train.micro_batch=4", "--train.stop_at=2", *common
    )
    train_run(1, run, tiny_data, "--train.micro_batch=8", "--train.stop_at=3", *common)
    rows = train_run(4, run, tiny_data, *four, *common)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(metrics(reference), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    (w_ours, opt_ours), (w_ref, opt_ref) = _full_state(run), _full_state(reference)
    for key, value in w_ref.items():
        torch.testing.assert_close(w_ours[key], value, rtol=1e-4, atol=1e-5)
    assert opt_ours.keys() == opt_ref.keys() and len(opt_ref) == 3 * len(w_ref)  # step, m, v
    for key, value in opt_ref.items():
        torch.testing.assert_close(opt_ours[key], value, rtol=1e-3, atol=1e-6)


BAD_LAYOUTS = [
    (["--parallel.dp_shard=3"], "parallel layout"),
    (["--parallel.tp=3"], "parallel.dp_replicate x parallel.tp"),
    (["--parallel.tp=2", "--model.n_kv_heads=1"], "model.n_kv_heads"),
]


@pytest.mark.parametrize("args, needle", BAD_LAYOUTS)
def test_bad_layout_is_refused_by_the_check_every_rank_runs(args, needle, tiny_data: Path):
    """Each case's message from the layout check every rank runs before it joins a
    collective; the test below runs it in a real 2-rank job."""
    cfg = load_config(None, parse_overrides([f"--data.path={tiny_data}", *TINY, *args]))
    with pytest.raises(StratusError, match=re.escape(needle)):
        resolve_layout(cfg.parallel, 2, cfg.model)


@pytest.mark.parametrize("args, needle", BAD_LAYOUTS[:1])
def test_bad_layout_fails_fast_on_every_rank(args, needle, tiny_data: Path, tmp_path: Path):
    start = time.monotonic()
    r = torchrun(2, "train", f"--data.path={tiny_data}", f"--run.dir={tmp_path / 'run'}", *TINY, *args)
    assert r.returncode != 0
    assert r.stderr.count("stratus: error: ") == 1, r.stderr[-3000:]  # rank 0 alone says why
    assert needle in r.stderr
    # torchrun prints its own summary of the failed ranks; no rank crashed inside stratus
    assert "stratus/" not in r.stderr.split("stratus: error:")[1]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()


def test_layout_resolution():
    model = load_config(None, {"model.n_heads": 8, "model.d_model": 256}).model
    assert resolve_layout(ParallelConfig(), 8, model).dp_shard == 8
    layout = resolve_layout(ParallelConfig(dp_replicate=2, tp=2), 8, model)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp, layout.dp) == (2, 2, 2, 4)
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(StratusError, match="8 ranks, but the job has 4"):
        resolve_layout(ParallelConfig(dp_shard=4, tp=2), 4, model)
    with pytest.raises(StratusError, match="loss_parallel"):
        resolve_layout(ParallelConfig(loss_parallel=True), 2, model)


def test_meta_init_initializes_each_shard_in_place(tiny_data: Path, tmp_path: Path):
    """With parallel.init = meta no rank ever holds the whole model: shapes are built on the
    meta device, sharded (FSDP x TP), then each shard is initialized where it lives."""
    run = tmp_path / "meta"
    rows = train_run(
        4,
        run,
        tiny_data,
        "--parallel.dp_shard=2",
        "--parallel.tp=2",
        "--parallel.init=meta",
        "--train.micro_batch=4",
        "--train.steps=2",
        "--train.lr=1e-7",
        "--train.min_lr=0",
        "--checkpoint.interval=2",
    )
    weights = assert_fresh_init(run, rows, n_layers=2)
    # shards were initialized independently, not as copies of one another
    wq = weights["layers.0.attention.wq.weight"]
    assert not torch.equal(wq[:16], wq[16:])


def assert_fresh_init(run: Path, rows: list[dict], n_layers: int) -> dict:
    """A run that barely trained (lr 1e-7) shows its init: a near-uniform first loss, norm gains
    of one, Normal(0, 0.02) matrices and the residual projections scaled by 1/sqrt(2 n_layers).
    Returns its weights."""
    assert rows[0]["loss"] == pytest.approx(math.log(320), rel=0.05)
    weights = load_trained(run).model.state_dict()
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            assert torch.allclose(w, torch.ones_like(w), atol=1e-5), name
        elif name.endswith(("wo.weight", "w2.weight")):
            assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layers), rel=0.2), name
        else:
            assert w.std().item() == pytest.approx(0.02, rel=0.2), name
    return weights


def test_tied_embeddings_stay_tied_under_tp_and_fsdp(tiny_data: Path, tmp_path: Path):
    tied = ["--model.tie_embeddings=true", "--train.steps=3", "--checkpoint.interval=3"]
    one = train_run(1, tmp_path / "one", tiny_data, "--train.micro_batch=8", *tied)
    four = train_run(
        4,
        tmp_path / "four",
        tiny_data,
        "--parallel.dp_shard=2",
        "--parallel.tp=2",
        "--train.micro_batch=4",
        *tied,
    )
    for a, b in zip(one, four, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    model = load_trained(tmp_path / "four").model
    assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(
        model.tok_embeddings.weight,
        load_trained(tmp_path / "one").model.tok_embeddings.weight,
        rtol=1e-4,
        atol=1e-5,
    )


def test_mfu_and_throughput_per_device_count_every_device(tiny_data: Path, tmp_path: Path):
    """Under tp 2 both ranks compute one data-parallel batch: MFU divides by the 2 devices,
    not by the 1 data-parallel rank (which read 2x too high, and 8x at tp 8)."""
    peak_tflops = 1e-4
    rows = train_run(
        2,
        tmp_path / "tp2",
        tiny_data,
        "--parallel.tp=2",
        "--train.micro_batch=8",
        "--train.steps=3",
        f"--log.peak_tflops={peak_tflops}",
    )
    model = load_trained(tmp_path / "tp2").model
    # by hand from the real tensors: every matrix but the embedding is a matmul (norm gains
    # are none), the output projection is one more, and attention scores cost 12·L·d·T
    d, seq = model.cfg.d_model, 32
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
    if model.cfg.tie_embeddings:
        matmul += model.tok_embeddings.weight.numel()
    flops_per_token = 6 * matmul + 12 * model.cfg.n_layers * d * seq
    assert flops_per_token == model.flops_per_token(seq)
    logged = [r for r in rows if r.get("mfu") is not None]
    assert logged
    for r in logged:
        expected = flops_per_token * r["tokens_per_s"] / (peak_tflops * 1e12 * 2)
        assert r["mfu"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2, rel=1e-3)
