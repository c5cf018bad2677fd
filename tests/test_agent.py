"""`stratus torchrun`: torchrun's own agent with the supervisor's policy on each node, run for
real on two gloo ranks. A user's mistake is not restarted, a crash loop stops with exit 3, and
each failure is a line of RUN/restarts.jsonl naming the node and the rank that failed first.
(The SIGKILL tests of test_reliability.py run their two ranks under it as well.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY_ARGS, torchrun_script

ARGS = [
    *TINY_ARGS,
    "--train.micro_batch=4",
    "--train.steps=8",
    "--checkpoint.interval=2",
    "--parallel.timeout_s=30",
    "--reliability.hang_timeout_s=30",
]


def agent(data: Path, run: Path, *extra: str, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRATUS_FAULTS": faults}
    return torchrun_script(
        *("-m", "stratus", "train", f"--data.path={data}", f"--run.dir={run}", *ARGS, *extra),
        torchrun_args=("--max-restarts=10",),
        env=env,
        launcher=("stratus", "torchrun"),
    )


def test_a_crash_loop_stops_the_node_with_a_diagnosis(tiny_data: Path, tmp_path: Path):
    """Rank 1 dies at step 3 every time, so no start gets past the checkpoint of step 2:
    after reliability.crash_loop (2 here) failures the agent stops with exit 3, with 8 of its
    10 restarts unspent."""
    run = tmp_path / "run"
    r = agent(
        tiny_data,
        run,
        "--parallel.dp_shard=2",
        "--reliability.crash_loop=2",
        faults="kill@step=3:rank=1:times=10",
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert "crash loop: the run failed on " in r.stderr and "checkpoint of step 2" in r.stderr
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 2
    assert all(
        (x["resume_step"], x["first_rank"], x["failure"], x["node"])
        == (2, 1, "killed by SIGKILL", socket.gethostname())
        for x in restarts
    )


def test_a_users_mistake_is_not_restarted(tiny_data: Path, tmp_path: Path):
    """A layout that does not fit the world is found by the ranks (exit 2): torchrun alone would
    start them 10 more times; the agent stops at once with their code, and nothing is recorded
    as a failure to recover from."""
    run = tmp_path / "run"
    r = agent(tiny_data, run, "--parallel.dp_shard=3")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("make the degrees multiply to the world size") == 1  # one start only
    assert not (run / "restarts.jsonl").exists()


def test_a_config_mistake_is_one_line_before_any_rank_starts(tmp_path: Path):
    cmd = [sys.executable, "-m", "stratus", "torchrun", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "stratus", "train", f"--run.dir={tmp_path / 'run'}", "--train.steps=abc"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert (
        r.stderr.startswith("stratus: error: config error: train.steps") and len(r.stderr.splitlines()) == 1
    )
    assert not (tmp_path / "run").exists()
