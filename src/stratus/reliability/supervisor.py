"""Restarting a failed run without a person, and knowing when not to.

`stratus train --max-restarts N` on one machine runs training as a child process and restarts
it when it fails; each start resumes from the newest verified checkpoint. A child whose
heartbeat goes stale (stopped, or stuck where its own watchdog cannot run) is killed and
restarted. Under torchrun, `stratus torchrun` (reliability/agent.py) applies the same policy
on every node. The policy, shared by both (RestartPolicy):
- exit 2 (a user's mistake) and 3 (a run stopped on purpose) are never restarted;
- a crash loop (reliability.crash_loop failures in a row with no newer checkpoint of either
  tier) stops with a diagnosis, exit 3;
- every failure and the time it cost is a line of RUN/restarts.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stratus.checkpoint.steps import list_checkpoints
from stratus.reliability import EXIT_STOPPED, EXIT_USER_ERROR

NOT_RESTARTED = (0, EXIT_USER_ERROR, EXIT_STOPPED)


def progress_step(run_dir: Path, local_dir: Path | None = None) -> int:
    """The newest checkpoint step, of the global tier (`latest`) or of this node's local tier."""
    try:
        step = int((run_dir / "checkpoints" / "latest").read_text().strip())
    except (OSError, ValueError):
        step = 0
    local = list_checkpoints(local_dir) if local_dir is not None else []
    return max(step, local[0][0] if local else 0)


def describe(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return {4: "hang (watchdog)", 137: "killed (SIGKILL)"}.get(rc, f"exit code {rc}")


class RestartPolicy:
    """What follows a failure: a restart, or the exit code to stop with (and why, on stderr)."""

    def __init__(
        self,
        run_dir: Path,
        max_restarts: int,
        crash_loop: int,
        local_dir: Path | None = None,
        node: str | None = None,
    ):
        self.run_dir, self.max_restarts, self.crash_loop = run_dir, max_restarts, crash_loop
        run_dir.mkdir(parents=True, exist_ok=True)  # a failure can come before the run makes it
        self.local_dir, self.node = local_dir, node
        self.failures: list[int] = []  # the checkpoint step each failure left behind
        self.started = time.time()

    def after_failure(self, rc: int, ranks: list[int] | None = None, first: int | None = None) -> int | None:
        """Record a failure (rc: the exit code of the first process to fail, rank `first` of
        the failed `ranks` under torchrun); None means restart."""
        if rc in NOT_RESTARTED:
            return rc
        step = progress_step(self.run_dir, self.local_dir)
        self.failures.append(step)
        record = {
            "time": time.time(),
            "failure": describe(rc),
            "ran_s": round(time.time() - self.started, 3),
            "resume_step": step,
            "restart": len(self.failures),
        }
        if self.node is not None:
            record |= {"node": self.node, "ranks": ranks or [], "first_rank": first}
        _append_line(self.run_dir / "restarts.jsonl", json.dumps(record))
        where = f" on {self.node}" if self.node else ""
        loop = self.failures[-self.crash_loop :]
        if len(loop) == self.crash_loop and len(set(loop)) == 1:
            print(
                f"stratus: crash loop: the run failed{where} {self.crash_loop} times in a row without "
                f"getting past the checkpoint of step {step} (last failure: {describe(rc)}); stopping "
                f"instead of restarting. See {self.run_dir}/train.log and {self.run_dir}/hangs/ for "
                "what happened.",
                file=sys.stderr,
            )
            return EXIT_STOPPED
        if len(self.failures) > self.max_restarts:
            print(
                f"stratus: the run failed{where} ({describe(rc)}) and all {self.max_restarts} restarts "
                "are used; resume it with `stratus train` again",
                file=sys.stderr,
            )
            return rc if rc > 0 else 1
        print(
            f"stratus: the run failed{where} ({describe(rc)}); restart {len(self.failures)} of "
            f"{self.max_restarts} from the checkpoint of step {step}",
            file=sys.stderr,
        )
        self.started = time.time()
        return None


def _append_line(path: Path, line: str) -> None:
    """One write of one line with O_APPEND: lines from several nodes' agents do not interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def supervise(
    argv: list[str],
    run_dir: Path,
    max_restarts: int,
    crash_loop: int,
    hang_timeout_s: float,
    local_dir: Path | None = None,
) -> int:
    policy = RestartPolicy(run_dir, max_restarts, crash_loop, local_dir)
    heartbeat = run_dir / ".heartbeat"
    env = {**os.environ, "STRATUS_SUPERVISED": "1", "STRATUS_HEARTBEAT": str(heartbeat)}
    while True:
        started = time.time()
        child = subprocess.Popen([sys.executable, "-m", "stratus", *argv], env=env)
        stop = policy.after_failure(_wait(child, heartbeat, hang_timeout_s, started))
        if stop is not None:
            return stop


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
