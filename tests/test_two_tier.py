"""Two-tier checkpoints with real processes and files: frequent node-local saves, each copied
to a peer node, beside rare global DCP checkpoints. Recovery takes the newest tier that
survives: the local one after ranks are killed, the local one again when a node comes back
with an empty disk (its files come from the peer), and the global one when the copy on the
peer is damaged too. Every recovery ends where a run without faults ends, bit for bit (the
world size never changes)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.local import LocalTier
from stratus.checkpoint.policy import CheckpointPolicy
from stratus.config import CheckpointConfig
from stratus.distributed.env import DistEnv
from tests.conftest import ROOT, TINY_ARGS, curve, free_port, torchrun_script

STEPS = 12
ARGS = [
    *TINY_ARGS,
    "--train.micro_batch=4",
    f"--train.steps={STEPS}",
    "--checkpoint.interval=6",  # global: steps 6 and 12
    "--checkpoint.local_interval=2",  # local: 2, 4, 8, 10 (6 and 12 are global)
    "--parallel.timeout_s=30",
    "--reliability.hang_timeout_s=30",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def two_nodes(data: Path, run: Path, locals_: list[Path], faults: str = "") -> list[int]:
    """One rank on each of two nodes: two torchrun agents meeting in a c10d rendezvous on
    this host, each with a local_dir of its own (its node's disk). No torchrun restarts: a
    killed rank ends the job, and the next call is the job's next start."""
    port = free_port()
    agents = []
    for local in locals_:
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"),
            *("--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-tier"),
            *("--max-restarts=0", "-m", "stratus", "train", f"--data.path={data}", f"--run.dir={run}"),
            *ARGS,
            f"--checkpoint.local_dir={local}",
        ]
        env = {**ENV, "STRATUS_FAULTS": faults}
        log = run.parent / f"{local.name}-{len(list(run.parent.glob(local.name + '-*')))}.log"
        with open(log, "w") as out:  # the agent keeps its own descriptor
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        return [a.wait(timeout=300) for a in agents]
    finally:
        for a in agents:
            a.kill()


def consoles(tmp_path: Path) -> str:
    """What the agents of the faulted run printed (recovery speaks before train.log opens)."""
    return "".join(p.read_text() for p in sorted(tmp_path.glob("node-*.log")))


def resumed_from(run: Path) -> list[str]:
    return [
        line.split("resumed from ")[1]
        for line in (run / "train.log").read_text().splitlines()
        if "resumed from " in line
    ]


def test_one_node_restart_resumes_from_the_local_tier(tiny_data: Path, tmp_path: Path, two_rank_curve):
    """Two ranks on one node, killed in turn: each restart takes the newest local step,
    newer than the newest global one, and the run equals an uninterrupted one bit for bit."""
    env = {**ENV, "STRATUS_FAULTS": "kill@step=5:rank=1,kill@step=9:rank=0"}
    run, local = tmp_path / "run", tmp_path / "local"
    common = ("-m", "stratus", "train", f"--data.path={tiny_data}", *ARGS, "--parallel.dp_shard=2")
    r = torchrun_script(
        *common,
        f"--run.dir={run}",
        f"--checkpoint.local_dir={local}",
        torchrun_args=("--max-restarts=3",),
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [Path(p.split(" (")[0]) for p in resumed_from(run)] == [
        local / "step-00000004",
        local / "step-00000008",
    ]
    assert sorted(p.name for p in local.iterdir()) == ["step-00000008", "step-00000010"]  # local_keep 2
    saves = [json.loads(x) for x in (run / "timeline.jsonl").read_text().splitlines()]
    saves = [(e["step"], e["tier"]) for e in saves if e["event"] == "checkpoint"]
    assert saves == [(2, "local"), (4, "local"), (6, "global"), (8, "local"), (10, "local"), (12, "global")]
    assert curve(run) == two_rank_curve


def test_two_nodes_recover_from_the_newest_tier_that_survives(
    tiny_data: Path, tmp_path: Path, two_rank_curve
):
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"

    run = tmp_path / "run"
    # 1. Both ranks die at step 9: the global tier has step 6, the local tier step 8.
    rcs = two_nodes(tiny_data, run, [node_a, node_b], "kill@step=9:rank=0,kill@step=9:rank=1")
    assert all(rc != 0 for rc in rcs)
    # 2. Node b comes back with an empty disk (a replacement node): its rank's file of step 8
    #    is the copy node a keeps, and the job resumes there. It dies again at step 11.
    for f in node_b.rglob("*"):
        if f.is_file():
            f.unlink()
    rcs = two_nodes(tiny_data, run, [node_a, node_b], "kill@step=11:rank=0,kill@step=11:rank=1")
    assert all(rc != 0 for rc in rcs)
    assert Path(resumed_from(run)[-1].split(" (")[0]) in (node_a / "step-00000008", node_b / "step-00000008")
    assert "the files of 1 rank(s) fetched from a peer node" in consoles(tmp_path)
    # 3. Node b is lost again, and the copies node a keeps for it are damaged: no local step
    #    is complete anywhere, and the job resumes from the global tier's step 6.
    for f in node_b.rglob("*"):
        if f.is_file():
            f.unlink()
    damaged = 0
    for meta in node_a.rglob("rank-*.json"):
        m = json.loads(meta.read_text())
        if m["rank"] != m["held_by"]:
            blob = meta.with_suffix(".pt")
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
            damaged += 1
    assert damaged == 2  # steps 8 and 10
    assert two_nodes(tiny_data, run, [node_a, node_b]) == [0, 0]
    assert Path(resumed_from(run)[-1].split(" (")[0]) == run / "checkpoints" / "step-00000006"
    assert "does not match its sha256" in consoles(tmp_path)
    assert curve(run) == two_rank_curve  # bit for bit: two ranks throughout, as there


def test_auto_intervals_give_the_global_tier_the_failures_the_local_one_cannot_take():
    cfg = CheckpointConfig(every="auto", local_dir="/tmp/x", local_covers=0.9)
    global_, local = CheckpointPolicy.tiers(cfg, mtbf_hours=10.0)
    global_.saved(60.0)  # a global save costs a minute
    local.saved(6.0)  # a local one a tenth of that
    # Young/Daly: sqrt(2 d M); the global tier sees a tenth of the failures
    assert local.interval_s() == pytest.approx((2 * 6.0 * 36000) ** 0.5)
    assert global_.interval_s() == pytest.approx((2 * 60.0 * 360000) ** 0.5)
    assert global_.interval_s() > 3 * local.interval_s()
    solo, none = CheckpointPolicy.tiers(CheckpointConfig(every="auto"), mtbf_hours=10.0)
    solo.saved(60.0)
    assert none is None and solo.interval_s() == pytest.approx((2 * 60.0 * 36000) ** 0.5)


def _tier(root: Path, layout: str = "1 rank") -> LocalTier:
    return LocalTier(root, DistEnv(0, 1, 0, torch.device("cpu")), layout, {"d_model": 4}, keep=2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(1, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_local_tier_takes_only_whole_verified_files_of_this_job(tmp_path: Path):
    model, opt = _model()
    tier = _tier(tmp_path)
    at: dict[int, tuple] = {}
    for step in (2, 4, 6):
        _train(model, opt)
        at[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"]))
        tier.save(step, model, opt, {"step": step, "samples_seen": 8 * step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]  # keep 2
    assert tier.find() == (6, tmp_path / "step-00000006")
    # a save cut short before its sidecar: the .pt alone is not a step
    (tmp_path / "step-00000008").mkdir()
    (tmp_path / "step-00000008" / "rank-00000.pt").write_bytes(b"half")
    assert tier.find()[0] == 6
    # a damaged file is skipped; the step before it is used
    blob = tmp_path / "step-00000006" / "rank-00000.pt"
    blob.write_bytes(blob.read_bytes()[:-1] + bytes([blob.read_bytes()[-1] ^ 1]))
    assert tier.find()[0] == 4
    # another layout (a shrunk or regrown world) cannot use these shards
    assert _tier(tmp_path, "2 ranks").find() is None
    # the state of step 4 comes back exactly, into a model and optimizer that moved on
    _train(model, opt)
    loaded = tier.load(tmp_path / "step-00000004", model, opt)
    assert loaded.step == 4 and loaded.trainer["samples_seen"] == 32
    weights, moments = at[4]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    for i, state in moments.items():
        assert all(torch.equal(opt.state_dict()["state"][i][k], v) for k, v in state.items())
    # going back to step 4 drops what came after it
    tier.forget_after(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
