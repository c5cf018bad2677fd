"""`stratus dryrun`: the real training step at cluster size under a fake process group and
fake tensors, checked against real ranks and through the CLI on the shipped configs."""

from __future__ import annotations

import json

import pytest

from stratus.config import load_config, parse_overrides
from stratus.plan.catalog import load_catalog
from stratus.train.dryrun import dry_run
from tests.conftest import ROOT, run_cli, torchrun_script

# A small model whose memory is mostly its own tensors, in fp32 (gloo's real ranks and the
# fake ones then use the same dtypes).
SMALL = [
    "--model.vocab_size=4096",
    "--model.n_layers=2",
    "--model.d_model=128",
    "--model.n_heads=4",
    "--data.seq_len=128",
    "--train.micro_batch=8",
    "--train.dtype=float32",
]
H100 = load_catalog().gpu("h100-sxm")


def _real_peaks(args: list[str], nproc: int = 2) -> dict:
    """Rank 0's peak by category, and every rank's total, in a real gloo run of the same steps."""
    r = torchrun_script(ROOT / "tests" / "dryrun_peer.py", "configs/demo.toml", *args, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("global_batch", [16, 32], ids=["no-accumulation", "accumulation-2"])
def test_dry_run_peak_matches_real_ranks(global_batch):
    args = [*SMALL, f"--train.global_batch={global_batch}"]
    cfg = load_config(ROOT / "configs/demo.toml", parse_overrides(args))
    report = dry_run(cfg, 2, H100)
    assert report.accum == global_batch // 16
    real = _real_peaks(args)["rank0"]
    assert real["activations"] > 0 and real["optimizer"] > 0
    assert report.peak_gib == pytest.approx(sum(real.values()), rel=0.10), (report.memory_gib, real)
    # with accumulation the second micro batch starts holding the first one's sharded gradients
    assert (report.memory_gib["gradients"] > 0) == (global_batch > 16)


PIPELINES = {
    # schedule, world, extra: one stage a rank (FSDP's tracker), two (views, torch's plain one)
    "1f1b-pp2": (2, ["--parallel.pp_schedule=1f1b", "--train.global_batch=32", "--train.micro_batch=4"]),
    "gpipe-pp2xdp2": (
        4,
        ["--parallel.pp_schedule=gpipe", "--train.global_batch=32", "--train.micro_batch=4"],
    ),
    "interleaved-pp2": (
        2,
        [
            "--parallel.pp_schedule=interleaved_1f1b",
            "--parallel.pp_stages_per_rank=2",
            "--train.global_batch=16",
        ],
    ),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_dry_run_matches_real_stages(name):
    """Under pipelining the stages hold different memory (the first keeps more micro batches
    in flight, the last the logits): the dry run measures the first and the last pipeline
    rank, each within 10% of the same rank on real gloo ranks, and sends activations."""
    world, extra = PIPELINES[name]
    args = [*SMALL, "--model.tie_embeddings=false", "--model.n_layers=4", "--parallel.pp=2", *extra]
    cfg = load_config(ROOT / "configs/demo.toml", parse_overrides(args))
    report = dry_run(cfg, world, H100)
    real = _real_peaks(args, world)["totals"]
    first, last = report.stages_gib.values()
    assert first == pytest.approx(real[0], rel=0.10), (report.stages_gib, real)
    assert last == pytest.approx(real[-1], rel=0.10), (report.stages_gib, real)
    assert report.peak_gib == pytest.approx(max(first, last))
    assert report.collectives["send (2 ranks)"]["calls"] > 0


def test_tensor_parallel_counts_shards_and_both_groups():
    """Under tp 2 x dp_shard 2 each rank computes half of a dp rank's share, and the
    collectives name both process groups."""
    args = ["--model.n_heads=4", "--model.vocab_size=4096", "--train.dtype=float32"]
    cfg = load_config(ROOT / "configs/demo.toml", parse_overrides(args))
    flat = dry_run(cfg, 2, H100)
    tp = dry_run(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tp": 2})}), 4, H100)
    # the same tokens per dp rank (global batch = micro batch x dp), split over two tp ranks
    assert tp.flops_per_step == pytest.approx(flat.flops_per_step / 2, rel=0.05)
    assert flat.flops_per_step == pytest.approx(flat.flops_estimate, rel=0.15)
    assert any(k.startswith("_allgather_base (2 ranks)") for k in tp.collectives)
    assert any(k == "all_gather_into_tensor (2 ranks)" for k in tp.collectives)  # TP's sequence gathers


def test_cli_demo_fits_and_json(tmp_path):
    r = run_cli("dryrun", "configs/demo.toml", "--world-size", "2", "--json", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["fits"] and report["verdict"].startswith("fits, ")
    assert set(report["memory_gib"]) == {"parameters", "gradients", "optimizer", "activations", "temporaries"}
    assert report["collectives"]["_allgather_base (2 ranks)"]["calls"] > 0


def test_cli_does_not_fit_exits_2_naming_knobs(tmp_path):
    catalog = tmp_path / "tiny.toml"
    catalog.write_text(
        '[gpu.tiny]\nname = "Tiny 3GB"\nbf16_tflops = 1.0\nhbm_gb = 3.0\nhbm_gbps = 1.0\n'
        'gemm_fraction = 0.5\nlink = "nvlink4"\n'
    )
    r = run_cli(
        "dryrun",
        "configs/demo.toml",
        "--world-size",
        "1",
        "--gpu",
        "tiny",
        "--catalog",
        str(catalog),
        "--model.vocab_size=128256",  # fixed, not the size of a corpus `make demo` left in data/
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("stratus: error:")]
    assert len(errors) == 1 and "does not fit by" in errors[0] and "try " in errors[0], r.stderr


def test_cli_bad_layout_is_one_line(tmp_path):
    r = run_cli("dryrun", "configs/llama3-8b.toml", "--world-size", "12", "--parallel.tp=8", cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("stratus: error: parallel.dp_replicate x parallel.tp")


# The shipped configs at the size they are meant for. llama3-8b runs with 8 of its 32 layers
# here and llama3-70b on 512 GPUs with 8 of its 80 (the same widths, layout and recompute;
# the blocks are identical), so the suite stays within its time: the whole 70b's dry run
# takes about 6 minutes on 2 cores and its figures are in the README (benchmarks/scale.py
# --dryrun full).
SHIPPED = [
    ("configs/demo.toml", ["--world-size", "1"], 1),
    ("configs/llama3-8b.toml", ["--world-size", "64", "--model.n_layers=8"], 64),
    ("configs/llama3-70b.toml", ["--nodes", "64", "--model.n_layers=8"], 512),
    # written by `stratus plan --emit-config` (their headers say how); 4 of 96 and of 126 layers
    ("configs/gpt3-175b.toml", ["--nodes", "128", "--gpu", "a100-80gb", "--model.n_layers=4"], 1024),
    ("configs/llama3-405b.toml", ["--nodes", "128", "--model.n_layers=4"], 1024),
]


@pytest.mark.parametrize(
    "config, size, world",
    SHIPPED,
    ids=["demo-1", "llama3-8b-64", "llama3-70b-512", "gpt3-175b-1024", "llama3-405b-1024"],
)
def test_cli_shipped_configs_at_scale(config, size, world):
    r = run_cli("dryrun", config, *size, "--json", cwd=ROOT, timeout=1200)
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["fits"] else 2), r.stderr[-2000:]
    assert report["fits"], report["verdict"]  # each shipped config fits the GPU it is meant for
    assert report["world_size"] == world
    assert report["memory_gib"]["optimizer"] > 0 and report["memory_gib"]["activations"] > 0
