"""Pipeline parallelism on real gloo ranks under torchrun: every schedule, and pipelining
composed with FSDP and TP up to the 4-D layout on 8 ranks, computes the same training as one
process; checkpoints reshard between pipeline layouts; a bad pipeline layout fails fast on
every rank."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.load import load_trained
from stratus.config import ParallelConfig, load_config, parse_overrides
from stratus.distributed.layout import Layout, pipeline_rounds, resolve_layout
from stratus.distributed.pipeline import rank_stages, split_layers
from stratus.errors import StratusError
from stratus.train.setup import check_job, torch_version
from tests.conftest import TINY_ARGS, metrics
from tests.test_parallel import _full_state, assert_fresh_init, torchrun, train_run

STEPS = ["--train.steps=4", "--checkpoint.interval=4"]
EVAL = ["--eval.interval=4", "--eval.batches=5"]


def _reference(tiny_data: Path, tmp_path_factory, layers: int) -> Path:
    run = tmp_path_factory.mktemp(f"ref{layers}") / "run"
    train_run(1, run, tiny_data, f"--model.n_layers={layers}", "--train.micro_batch=8", *STEPS)
    return run


@pytest.fixture(scope="module")
def references(tiny_data: Path, tmp_path_factory):
    """One-process runs by layer count, made when first asked for."""
    made: dict[int, Path] = {}

    def get(layers: int) -> Path:
        if layers not in made:
            made[layers] = _reference(tiny_data, tmp_path_factory, layers)
        return made[layers]

    return get


# name: (ranks, layers, arguments)
CASES = {
    "gpipe": (2, 2, ["--parallel.pp_schedule=gpipe", "--train.micro_batch=2", *EVAL]),
    "1f1b": (2, 2, ["--parallel.pp_schedule=1f1b", "--train.micro_batch=4"]),
    # two stages a rank: 4 stages of one layer each, in a loop (0, 2 | 1, 3) or a V (0, 3 | 1, 2)
    "interleaved_1f1b": (2, 4, ["--parallel.pp_schedule=interleaved_1f1b", "--train.micro_batch=2", *EVAL]),
    "interleaved_zb": (2, 4, ["--parallel.pp_schedule=interleaved_zb", "--train.micro_batch=2"]),
    "zbv": (2, 4, ["--parallel.pp_schedule=zbv", "--train.micro_batch=2", "--eval.interval=0"]),
    "dualpipev": (2, 4, ["--parallel.pp_schedule=dualpipev", "--train.micro_batch=2", "--eval.interval=0"]),
    # 3 layers on 2 stages: [2, 1]
    "uneven": (2, 3, ["--train.micro_batch=4"]),
    "pp2_dp_shard2": (4, 2, ["--parallel.dp_shard=2", "--train.micro_batch=2", *EVAL]),
    "pp2_tp2_loss_parallel": (
        4,
        2,
        ["--parallel.tp=2", "--parallel.loss_parallel=true", "--train.micro_batch=4", *EVAL],
    ),
    # FSDP over the V's two stage views of one rank's model, each block checkpointed
    "zbv_dp_shard2_full_ac": (
        4,
        4,
        [
            "--parallel.pp_schedule=zbv",
            "--parallel.dp_shard=2",
            "--parallel.activation_checkpoint=full",
            "--train.micro_batch=1",
            "--eval.interval=0",
        ],
    ),
    "pp2_dp_shard2_tp2": (8, 2, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.micro_batch=2", *EVAL]),
}


OLD_TORCH_ZBV = pytest.mark.skipif(
    torch_version() < (2, 13),
    reason="zbv needs torch 2.13+ (torch 2.9's ZBV sends to its own rank; stratus refuses it there)",
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=OLD_TORCH_ZBV) if n.startswith("zbv") else n for n in CASES]
)
def test_pipeline_trains_like_one_process(name, references, tiny_data: Path, tmp_path: Path):
    n, layers, args = CASES[name]
    ref = references(layers)
    run = tmp_path / name
    rows = train_run(n, run, tiny_data, "--parallel.pp=2", f"--model.n_layers={layers}", *STEPS, *args)
    steps = [r for r in rows if "grad_norm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for a, b in zip([r for r in metrics(ref) if "grad_norm" in r], steps, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)  # clipped by the global norm
    if "--eval.interval=4" in args:  # validation through the pipeline: one process's, over the same windows
        micro = next(a for a in args if a.startswith("--train.micro_batch=")).split("=")[1]
        r = torchrun(1, "eval", str(run), "--batches=5", f"--micro-batch={micro}", "--json")
        assert r.returncode == 0, r.stderr
        assert steps[-1]["val_loss"] == pytest.approx(json.loads(r.stdout)["val_loss"], rel=1e-4)
    log = (run / "train.log").read_text()
    assert "pipeline: " in log and ("(uneven)" in log) == (name == "uneven")
    # the stages' checkpoint loads whole in one process, by the whole model's parameter names
    ours, theirs = load_trained(run).model.state_dict(), load_trained(ref).model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5)


def test_checkpoint_reshards_between_pipeline_layouts(references, tiny_data: Path, tmp_path: Path):
    """Step 1 under pp 2, step 2 under one process, step 3 under pp 2 x dp_shard 2, step 4
    under pp 2 again: the losses, weights and optimizer state of the run never resharded."""
    ref = references(2)
    run = tmp_path / "resharded"
    common = ["--train.steps=4", "--checkpoint.interval=1", *EVAL]
    train_run(2, run, tiny_data, "--parallel.pp=2", "--train.micro_batch=2", "--train.stop_at=1", *common)
    train_run(1, run, tiny_data, "--train.micro_batch=8", "--train.stop_at=2", *common)
    pp_dp = ["--parallel.pp=2", "--parallel.dp_shard=2", "--train.micro_batch=1"]
    train_run(4, run, tiny_data, *pp_dp, "--train.stop_at=3", *common)
    rows = train_run(
        2, run, tiny_data, "--parallel.pp=2", "--parallel.pp_schedule=gpipe", "--train.micro_batch=4", *common
    )
    curve = {r["step"]: r["loss"] for r in rows if "grad_norm" in r}
    assert sorted(curve) == [1, 2, 3, 4]
    for r in metrics(ref):
        if "grad_norm" in r:
            assert curve[r["step"]] == pytest.approx(r["loss"], rel=1e-4)
    (w_ours, opt_ours), (w_ref, opt_ref) = _full_state(run), _full_state(ref)
    for key, value in w_ref.items():
        torch.testing.assert_close(w_ours[key], value, rtol=1e-4, atol=1e-5)
    # every stage's AdamW state and step count came back (not only rank 0's parameter groups)
    assert opt_ours.keys() == opt_ref.keys() and len(opt_ref) == 3 * len(w_ref)
    for key, value in opt_ref.items():
        torch.testing.assert_close(opt_ours[key], value, rtol=1e-3, atol=1e-6)


BAD_LAYOUTS = [
    (["--parallel.pp=3"], "does not divide the job's 2 ranks"),
    (["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"], "need at least as many layers"),
    (["--parallel.pp=2", "--model.tie_embeddings=true"], "model.tie_embeddings"),
    (["--parallel.pp=2", "--train.micro_batch=8"], "needs at least as many micro batches"),
    (["--parallel.pp=2", "--train.micro_batch=1", "--parallel.pp_microbatches=3"], "must divide the 8"),
    (
        [
            "--parallel.pp=2",
            "--parallel.pp_schedule=dualpipev",
            "--model.n_layers=4",
            "--train.micro_batch=1",
            "--eval.interval=2",
        ],
        "cannot run validation",
    ),
]


@pytest.mark.parametrize("args, needle", BAD_LAYOUTS)
def test_bad_pipeline_layout_is_refused_by_the_checks_every_rank_runs(args, needle, tiny_data: Path):
    """The checks each rank runs before it joins a collective or writes a file (the layout's,
    then the job's), each case's message; the test below runs them in a real 2-rank job."""
    cfg = load_config(None, parse_overrides([f"--data.path={tiny_data}", *TINY_ARGS, *args]))
    with pytest.raises(StratusError, match=re.escape(needle)):
        check_job(cfg, resolve_layout(cfg.parallel, 2, cfg.model))


@pytest.mark.parametrize("args, needle", [BAD_LAYOUTS[0], BAD_LAYOUTS[-1]])  # one refusal of each check
def test_bad_pipeline_layout_fails_fast_on_every_rank(args, needle, tiny_data: Path, tmp_path: Path):
    start = time.monotonic()
    r = torchrun(2, "train", f"--data.path={tiny_data}", f"--run.dir={tmp_path / 'run'}", *TINY_ARGS, *args)
    assert r.returncode != 0
    assert r.stderr.count("stratus: error: ") == 1, r.stderr[-3000:]  # rank 0 alone says why
    assert needle in r.stderr
    assert "stratus/" not in r.stderr.split("stratus: error:")[1]  # no rank crashed inside stratus
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()


def test_stage_split_and_placement():
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(3, 2) == [[0, 1], [2]]  # the extra layer is not the last stage's
    assert split_layers(10, 4) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]  # middle stages first
    assert split_layers(5, 4) == [[0], [1, 2], [3], [4]]
    loop, v = Layout(1, 1, 1, pp=2, stages_per_rank=2), "zbv"
    assert [rank_stages(loop, r, "interleaved_1f1b") for r in range(2)] == [[0, 2], [1, 3]]
    assert [rank_stages(loop, r, v) for r in range(2)] == [[0, 3], [1, 2]]


def test_pipeline_layout_resolution():
    model = load_config(None, {"model.n_heads": 8, "model.d_model": 256, "model.n_layers": 8}).model
    layout = resolve_layout(ParallelConfig(pp=2, tp=2), 16, model)
    assert (layout.pp, layout.dp_shard, layout.tp, layout.world_size) == (2, 4, 2, 16)
    # pp outermost, tp innermost: ranks 0-7 are the first stage, and the stages read alike
    assert [layout.pp_rank(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert [layout.dp_rank(r) for r in range(16)] == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    assert "pp 2 x" in layout.describe()
    pc = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b")
    layout = resolve_layout(pc, 2, model)
    assert layout.stages == 4
    assert pipeline_rounds(layout, pc, 8) == (8, 1)
    assert pipeline_rounds(layout, pc.model_copy(update={"pp_microbatches": 4}), 8) == (4, 2)
    with pytest.raises(StratusError, match="multiple"):
        pipeline_rounds(layout, pc, 3)
    with pytest.raises(ValueError, match="one stage a rank"):
        ParallelConfig(pp=2, pp_schedule="1f1b", pp_stages_per_rank=2)
    with pytest.raises(ValueError, match="exactly two stages"):
        ParallelConfig(pp=2, pp_schedule="zbv", pp_stages_per_rank=3)


def test_meta_init_under_stage_views(tiny_data: Path, tmp_path: Path):
    """parallel.init = meta with two stages a rank (interleaved) under FSDP: each stage view's shards
    are allocated through its own FSDP root and initialized in place, every stage draws its
    own numbers, and the views see the RoPE tables."""
    run = tmp_path / "meta"
    rows = train_run(
        4,
        run,
        tiny_data,
        "--model.n_layers=4",
        "--parallel.pp=2",
        "--parallel.dp_shard=2",
        "--parallel.pp_schedule=interleaved_1f1b",
        "--parallel.init=meta",
        "--train.micro_batch=2",
        "--train.steps=2",
        "--train.lr=1e-7",
        "--train.min_lr=0",
        "--checkpoint.interval=2",
    )
    w = assert_fresh_init(run, rows, n_layers=4)
    wq = [w[f"layers.{i}.attention.wq.weight"] for i in range(4)]
    assert all(not torch.equal(wq[i], wq[j]) for i in range(4) for j in range(i))
