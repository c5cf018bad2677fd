"""HSDP in the planner: stratus's replicas of FSDP groups are searched, costed as they run
(FSDP's collectives inside a replica, one all-reduce of the gradient shards across replicas a
step, the state sharded over a replica only), and emitted as a config stratus resolves."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stratus.config import load_config
from stratus.distributed.layout import resolve_layout
from stratus.plan.catalog import load_catalog
from stratus.plan.cost import Candidate, estimate
from stratus.plan.presets import resolve
from tests.conftest import ROOT, run_cli

CATALOG = load_catalog(None)
STRATUS = CATALOG.software("stratus")
SMALL = ["--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--seq-len", "512"]
SMALL += ["--vocab", "4096", "--cluster", "dgx-h100", "--nodes", "2", "--global-batch", "64"]


def test_hsdp_shards_state_over_a_replica_and_all_reduces_across_replicas():
    m = resolve("llama3-8b")
    cluster = CATALOG.cluster(gpu="h100-sxm", gpus=64, gpus_per_node=8, network="ib-ndr-400x8")
    fsdp = estimate(m, cluster, STRATUS, Candidate.of(1, 1, 64, 1, "full", 1, 3), 512)
    hsdp = estimate(m, cluster, STRATUS, Candidate.of(1, 1, 64, 1, "full", 1, 3, replicate=8), 512)
    # every rank of a replica of 8 holds an eighth of the state, not a 64th
    assert hsdp.memory["optimizer"] == fsdp.memory["optimizer"] * 8
    assert hsdp.memory["activations"] == fsdp.memory["activations"]
    # FSDP's gathers stay inside a node (NVLink) under HSDP 8 x 8; across 8 nodes without it.
    # Without overlap every byte shows, so the one all-reduce across replicas is seen too.
    blocking = replace(STRATUS, dp_overlap=False)
    f = estimate(m, cluster, blocking, Candidate.of(1, 1, 64, 1, "full", 1, 3), 512)
    h = estimate(m, cluster, blocking, Candidate.of(1, 1, 64, 1, "full", 1, 3, replicate=8), 512)
    one = estimate(m, cluster, blocking, Candidate.of(1, 1, 64, 1, "full", 1, 3, replicate=64), 512)
    assert h.breakdown["dp_comm"] < f.breakdown["dp_comm"]
    # 64 replicas of one rank: no FSDP collective, only the all-reduce of whole gradients
    assert one.breakdown["dp_comm"] > 0 and one.memory["optimizer"] == fsdp.memory["optimizer"] * 64


def test_hsdp_is_searched_and_emitted_as_a_config_stratus_resolves(tmp_path: Path):
    cfg_file = tmp_path / "hsdp.toml"
    r = run_cli("plan", *SMALL, "--dp-replicate", "2", "--json", "--emit-config", str(cfg_file), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    layouts = json.loads(r.stdout)["layouts"]
    assert layouts and all(lay["dp_replicate"] == 2 for lay in layouts)
    cfg = load_config(cfg_file)
    layout = resolve_layout(cfg.parallel, 16, cfg.model)
    best = layouts[0]
    assert (layout.dp_replicate, layout.dp, layout.tp, layout.pp) == (2, best["dp"], best["tp"], best["pp"])


def test_replicas_outside_stratus_fsdp_are_refused():
    r = run_cli("plan", *SMALL, "--dp-replicate", "2", "--software", "megatron-core", cwd=ROOT)
    assert r.returncode == 2 and "HSDP" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("plan", *SMALL, "--dp-replicate", "0", cwd=ROOT)
    assert r.returncode == 2 and "--dp-replicate must be at least 1" in r.stderr
