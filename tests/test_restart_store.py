"""A torchrun restart must not meet the dead round's keys.

torchrun keeps one TCPStore across restarts, so the peer addresses gloo published in the
killed round are still there in the next one. This test forces the losing order: in each
restarted round rank 1 reaches gloo's connect while rank 0 is still starting. Whenever gloo
makes rank 1 the pair's active side (about half the time: it orders the two addresses) that
used to end in "Connection refused" against the dead rank 0's port (torch issue 135712), so
four restarts in a row catch it with probability 15/16."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import torchrun_script

RESTARTS = 4

WORKER = """
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from stratus.distributed import env as denv

marks, last = Path(sys.argv[1]), int(sys.argv[2])
rank = int(os.environ["RANK"])
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if restart > 0 and rank == 0:
    # let rank 1 get to the store first, so it reads whatever rank 0's key holds now
    deadline = time.monotonic() + 120
    while not (marks / f"round{restart}-rank1-joining").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2)
if restart > 0 and rank == 1:
    (marks / f"round{restart}-rank1-joining").touch()
env = denv.setup("cpu", timeout_s=60)
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2
(marks / f"round{restart}-rank{rank}-ok").touch()
if restart < last:
    if rank == 1:
        os._exit(9)  # a crash after the group is up: torchrun restarts both ranks
    time.sleep(600)  # rank 0 is stopped by torchrun
denv.teardown()
"""


def test_restarted_round_connects_despite_the_dead_rounds_keys(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torchrun's default: one shared store
    restarts = (f"--max-restarts={RESTARTS}",)
    r = torchrun_script(script, str(marks), str(RESTARTS), torchrun_args=restarts, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ok = {p.name for p in marks.iterdir() if p.name.endswith("-ok")}
    assert ok == {f"round{k}-rank{r}-ok" for k in range(RESTARTS + 1) for r in (0, 1)}
