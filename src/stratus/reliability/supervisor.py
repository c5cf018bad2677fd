"""`stratus train --max-restarts N` on one machine: run training as a child process and
restart it when it fails; each start resumes from the newest verified checkpoint. A crash
loop (K failures in a row with no new checkpoint) stops with a diagnosis. A child whose
heartbeat goes stale (stopped, or stuck where its own watchdog cannot run) is killed and
restarted. Every restart and the time it cost go to RUN/restarts.jsonl. Under torchrun,
`torchrun --max-restarts` plays this role for all ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stratus.reliability import EXIT_STOPPED, EXIT_USER_ERROR


def _latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip())
    except (OSError, ValueError):
        return 0


def _describe(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return {4: "hang (watchdog)", 137: "killed (SIGKILL)"}.get(rc, f"exit code {rc}")


def supervise(
    argv: list[str], run_dir: Path, max_restarts: int, crash_loop: int, hang_timeout_s: float
) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = run_dir / ".heartbeat"
    env = {**os.environ, "STRATUS_SUPERVISED": "1", "STRATUS_HEARTBEAT": str(heartbeat)}
    failures: list[int] = []  # the checkpoint step each failure left behind
    restarts = 0
    while True:
        started = time.time()
        child = subprocess.Popen([sys.executable, "-m", "stratus", *argv], env=env)
        rc = _wait(child, heartbeat, hang_timeout_s, started)
        if rc in (0, EXIT_USER_ERROR, EXIT_STOPPED):
            return rc
        step = _latest_step(run_dir)
        failures.append(step)
        record = {
            "time": time.time(),
            "failure": _describe(rc),
            "ran_s": round(time.time() - started, 3),
            "resume_step": step,
            "restart": restarts + 1,
        }
        with open(run_dir / "restarts.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if len(failures) >= crash_loop and len(set(failures[-crash_loop:])) == 1:
            print(
                f"stratus: crash loop: the run failed {crash_loop} times in a row without getting past the "
                f"checkpoint of step {step} (last failure: {_describe(rc)}); stopping instead of restarting. "
                f"See {run_dir}/train.log and {run_dir}/hangs/ for what happened.",
                file=sys.stderr,
            )
            return EXIT_STOPPED
        if restarts >= max_restarts:
            print(
                f"stratus: the run failed ({_describe(rc)}) and all {max_restarts} restarts are used; "
                f"resume it with `stratus train` again",
                file=sys.stderr,
            )
            return rc if rc > 0 else 1
        restarts += 1
        print(
            f"stratus: the run failed ({_describe(rc)}); restart {restarts} of {max_restarts} "
            f"from the checkpoint of step {step}",
            file=sys.stderr,
        )


def _wait(child: subprocess.Popen, heartbeat: Path, hang_timeout_s: float, started: float) -> int:
    """The child's exit code. Once the child has started stepping (its first heartbeat), a
    child silent for longer than its own watchdog allows is stopped or stuck: it is killed."""
    grace = 1.5 * hang_timeout_s + 5.0
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        try:
            beat = heartbeat.stat().st_mtime
        except OSError:
            continue
        if beat > started and time.time() - beat > grace:
            child.kill()
            child.wait()
            return -signal.SIGKILL
