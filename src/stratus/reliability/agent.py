"""`stratus torchrun`: torchrun with stratus's restart policy on every node.

    stratus torchrun [torchrun's arguments] -m stratus train CONFIG [--section.key=value ...]

torchrun restarts every failure alike (a typo in the config as often as a lost GPU), knows no
crash loop, and exits 1 whatever its ranks exited with. This is torchrun itself (its argument
parser, its LocalElasticAgent, its rendezvous and restarts) with supervisor.RestartPolicy
applied to the failures of this node's ranks:
- a rank that exits 2 (a user's mistake) or 3 (stopped on purpose) is not restarted, and the
  agent exits with that code (so `stratus launch`'s sbatch script does not requeue it);
- a crash loop, reliability.crash_loop failures in a row with no newer checkpoint of either tier,
  stops the node with exit 3 and a diagnosis;
- each failure is a line of RUN/restarts.jsonl with the node's name and the failed ranks;
- a rank that does not stop within 5 s of SIGTERM, once another has failed or before a
  restart, is killed (torchrun waits 30 s): a stopped or stuck rank delays the restart less.
When a node's agent stops, it closes the rendezvous, and the other nodes' agents stop too.

A node's view is its own ranks: when rank 5 on another node fails, this node's ranks usually
fail after it (a peer gone from a collective), and each node records and judges what it saw.
Run with a worker other than `stratus train`, this is torchrun unchanged.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from stratus.errors import StratusError
from stratus.reliability.supervisor import RestartPolicy, describe

STOP_GRACE_S = 5  # torchrun's is 30


def _policy(script_args: list[str], max_restarts: int) -> RestartPolicy | None:
    """The policy for a `stratus train` worker, from its own config; None for another worker.
    A config mistake raises StratusError here, before any rank starts."""
    from stratus.cli import _config, _split_overrides, build_parser

    plain, overrides = _split_overrides(script_args)
    if plain[:1] != ["train"]:
        return None
    args = build_parser().parse_args(plain)
    cfg = _config(args, overrides)
    local = cfg.checkpoint.local_dir
    return RestartPolicy(
        Path(cfg.run.dir),
        max_restarts,
        cfg.reliability.crash_loop,
        Path(local) if local else None,
        socket.gethostname(),
    )


def main(argv: list[str]) -> int:
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousClosedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    policy = None
    if args.module and args.training_script == "stratus":
        try:
            policy = _policy(list(args.training_script_args), args.max_restarts)
        except StratusError as e:
            print(f"stratus: error: {e}", file=sys.stderr)
            return 2
    verdict: list[int] = []  # the code this node stops with, once the policy says stop

    class PolicyAgent(LocalElasticAgent):
        """torchrun's agent; after each failure of this node's ranks, the policy decides."""

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if policy is not None and result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
                failures = result.failures
                first = min(failures, key=lambda r: failures[r].timestamp) if failures else None
                codes = {f.exitcode for f in failures.values()}
                # a user's mistake or a deliberate stop on any rank decides; otherwise the first
                # rank to fail is the cause (the others died of it)
                rc = next((c for c in (2, 3) if c in codes), failures[first].exitcode if failures else 1)
                stop = policy.after_failure(rc, sorted(failures), first)
                if stop is not None:
                    verdict.append(stop)
                    self._remaining_restarts = 0  # torchrun then ends instead of restarting
            return result

        def _start_workers(self, worker_group):
            # torchrun stops the ranks left when one fails, and before each restart, with SIGTERM,
            # then waits 30 s before SIGKILL. A stratus rank has nothing to flush on SIGTERM; one
            # that outlives it is stuck (stopped, or in the kernel), and the restart waits on it.
            # This node's process context gives it STOP_GRACE_S instead.
            started = super()._start_workers(worker_group)
            context = self._pcontext
            close = type(context).close

            def close_sooner(death_sig=None, timeout=STOP_GRACE_S):
                return close(context, death_sig, min(timeout, STOP_GRACE_S))

            context.close = close_sooner
            return started

    # launch_agent builds its agent from this module's name for the class: ours takes its place
    # for this process only (torch has no hook for a restart policy)
    launcher.LocalElasticAgent = PolicyAgent
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"stratus: torchrun: rank {rank} failed ({describe(failure.exitcode)})", file=sys.stderr)
        return verdict[0] if verdict else 1
    except RendezvousClosedError:
        print(
            "stratus: torchrun: the rendezvous is closed: another node's agent stopped (see its log "
            "and RUN/restarts.jsonl)",
            file=sys.stderr,
        )
        return 1
    return 0
