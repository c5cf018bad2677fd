"""From plan to job: `stratus plan --emit-config` writes a config that `stratus dryrun` and
`stratus launch` take as they are, and under --software stratus every proposed layout is one
that stratus's own checks accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from stratus.config import load_config
from stratus.counts import model_config_of
from stratus.distributed.layout import pipeline_rounds, resolve_layout
from stratus.plan.catalog import load_catalog
from stratus.plan.emit import parallel_config
from stratus.plan.presets import resolve
from stratus.plan.search import search
from tests.conftest import ROOT, run_cli

SMALL = ["--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--seq-len", "512"]
SMALL += ["--vocab", "4096", "--cluster", "dgx-h100", "--nodes", "1", "--global-batch", "64"]


def test_emit_config_then_dryrun_then_launch(tmp_path: Path):
    cfg_file = tmp_path / "plan.toml"
    r = run_cli("plan", *SMALL, "--tokens", "1e9", "--pp", "1", "--emit-config", str(cfg_file), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    text = cfg_file.read_text()
    assert text.startswith("# ") and "stratus plan --layers 8" in text  # how it was made
    tree = tomllib.loads(text)
    best = json.loads(run_cli("plan", *SMALL, "--tokens", "1e9", "--pp", "1", "--json", cwd=ROOT).stdout)[
        "best"
    ]
    layout = resolve_layout(load_config(cfg_file).parallel, 8, load_config(cfg_file).model)
    assert (layout.tp, layout.dp, layout.pp) == (best["tp"], best["dp"], best["pp"])
    assert tree["parallel"]["activation_checkpoint"] == best["recompute"]
    assert tree["train"]["micro_batch"] == best["micro_batch"] and tree["train"]["global_batch"] == 64
    assert tree["train"]["steps"] == -(-int(1e9) // (64 * 512))  # the tokens asked for
    # Young/Daly in steps of the predicted step time
    interval_min = json.loads(run_cli("plan", *SMALL, "--pp", "1", "--json", cwd=ROOT).stdout)[
        "checkpoint_interval_min"
    ]
    # (the JSON rounds the minutes to 2 decimals)
    assert tree["checkpoint"]["interval"] == pytest.approx(interval_min * 60 / best["step_time_s"], rel=2e-3)

    dry = run_cli("dryrun", str(cfg_file), "--world-size", "8", "--json", cwd=ROOT, timeout=600)
    assert dry.returncode == 0, dry.stderr[-2000:]
    report = json.loads(dry.stdout)
    assert report["fits"] and report["world_size"] == 8

    out = tmp_path / "job.sbatch"
    r = run_cli("launch", "slurm", str(cfg_file), "--nodes", "1", "--gpus-per-node", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=1" in out.read_text() and str(cfg_file) in out.read_text()


def test_emit_config_with_a_local_tier_sets_both_intervals(tmp_path: Path):
    cfg_file = tmp_path / "two.toml"
    args = (*SMALL, "--pp", "1", "--local-gbps", "400")  # /dev/shm: faster than the shared store
    r = run_cli("plan", *args, "--emit-config", str(cfg_file), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    obj = json.loads(run_cli("plan", *args, "--json", cwd=ROOT).stdout)
    step_s = obj["best"]["step_time_s"]
    tree = tomllib.loads(cfg_file.read_text())["checkpoint"]
    assert tree["local_interval"] == pytest.approx(
        obj["local_checkpoint_interval_min"] * 60 / step_s, rel=2e-3
    )
    assert tree["local_interval"] < tree["interval"]
    assert "set checkpoint.local_dir" in cfg_file.read_text()
    assert load_config(cfg_file).checkpoint.local_interval == tree["local_interval"]


def test_emit_config_of_a_pipeline_layout_is_one_stratus_trains(tmp_path: Path):
    cfg_file = tmp_path / "pp.toml"
    r = run_cli("plan", *SMALL, "--pp", "2", "--interleave", "2", "--emit-config", str(cfg_file), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cfg = load_config(cfg_file)
    pc = cfg.parallel
    assert (pc.pp, pc.pp_schedule, pc.pp_stages_per_rank) == (2, "interleaved_1f1b", 2)
    layout = resolve_layout(pc, 8, cfg.model)
    pipeline_rounds(layout, pc, cfg.train.global_batch // (cfg.train.micro_batch * layout.dp))


def test_emit_config_refuses_what_stratus_cannot_train(tmp_path: Path):
    out = tmp_path / "gpt.toml"
    r = run_cli(
        "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100", "--nodes", "128", "--emit-config", str(out)
    )
    assert r.returncode == 2 and "stratus trains the llama family" in r.stderr
    assert not out.exists()
    r = run_cli("plan", *SMALL, "--emit-config", str(tmp_path / "x.yaml"))
    assert r.returncode == 2 and "give a .toml file name" in r.stderr


@pytest.mark.parametrize("model, nodes", [("llama3-8b", 1), ("llama3-70b", 8)])
def test_stratus_profile_proposes_only_layouts_stratus_accepts(model, nodes):
    """Every layout the search keeps under --software stratus passes the trainer's own layout
    checks, and shards at ZeRO-3 (FSDP2); other profiles keep ZeRO-1 and 2."""
    catalog = load_catalog(None)
    m = resolve(model)
    cluster = catalog.cluster(preset="dgx-h100", nodes=nodes)
    batch = 8 * cluster.gpus
    fits, over = search(m, cluster, catalog.software("stratus"), batch)
    assert fits or over
    for e in fits + over:
        c = e.candidate
        assert c.zero == 3
        pc = parallel_config(c)
        layout = resolve_layout(pc, cluster.gpus, model_config_of(m))
        pipeline_rounds(layout, pc, batch // (layout.dp * c.micro_batch))
    megatron, _ = search(m, cluster, catalog.software("megatron-core"), batch)
    assert {e.candidate.zero for e in megatron} > {3}
