"""Two nodes for real: two network namespaces joined by a veth pair, each running its own
agent (`torchrun --nnodes 2`, or `stratus torchrun` as `stratus launch` writes it; c10d
rendezvous, gloo over the veth), training one job whose losses must equal those of one
process reading the whole global batch: whole, after a node is lost, after one joins, and
after a node's link is cut.

Needs root, iproute2 (`ip`) and permission to create network namespaces; skipped otherwise.
All traffic stays on the private /24 between the two namespaces this test creates (they have
no route anywhere else) and on their own loopback devices. Both "nodes" share the host's
filesystem, so they are given the same run directory, as a cluster with a shared filesystem
would: rank 0 writes config.toml, metrics.jsonl and train.log there, rank 1 train.rank1.log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, metrics, run_cli

SUBNET = "10.213.47"  # private, exists only between the two namespaces below
PORT = 29431  # rendezvous port on node 0; free, as the namespace is new
TIMEOUT_S = 180  # every subprocess, each node included
NETNS_ETC = Path("/etc/netns")

CONFIG = """
[model]
n_layers = 2
d_model = 32
n_heads = 4
max_seq_len = 64

[data]
path = "{data}"
seq_len = 32

[train]
steps = 3
global_batch = 8
micro_batch = 4
lr = 3e-3
warmup_steps = 2
deterministic = true

[checkpoint]
interval = 0

[eval]
interval = 0

[log]
interval = 1
tensorboard = false
progress = "plain"
"""


@dataclass(frozen=True)
class Node:
    netns: str
    ifname: str
    addr: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _kill_everything_in(netns: str) -> None:
    """SIGKILL each process still inside a namespace this test created (by pid)."""
    r = _ip("netns", "pids", netns)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def two_nodes():
    """Two fresh network namespaces with `lo` up and a veth pair between them; removed (with
    anything left running inside) at teardown, whatever the test did."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: `ip` (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces unavailable: needs root")
    tag = f"stratus-mn{os.getpid()}"
    nodes = [Node(f"{tag}-{i}", f"smn{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    created: list[str] = []
    try:
        for node in nodes:
            r = _ip("netns", "add", node.netns)
            if r.returncode != 0:
                pytest.skip(f"network namespaces unavailable: ip netns add: {r.stderr.strip()}")
            created.append(node.netns)
            _private_name_resolution(node, nodes)
        a, b = nodes
        steps = [
            # created inside node 0's namespace, its peer inside node 1's: never in the host's
            f"-n {a.netns} link add {a.ifname} type veth peer name {b.ifname} netns {b.netns}".split(),
            *(f"-n {n.netns} addr add {n.addr}/24 dev {n.ifname}".split() for n in nodes),
            *(f"-n {n.netns} link set {dev} up".split() for n in nodes for dev in ("lo", n.ifname)),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"network namespaces unavailable: ip {' '.join(step)}: {r.stderr.strip()}")
        yield nodes
    finally:
        for netns in created:
            _kill_everything_in(netns)
            _ip("netns", "delete", netns)  # takes the veth pair with it
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty, as it was before


def _private_name_resolution(node: Node, nodes: list[Node]) -> None:
    """`ip netns exec` mounts /etc/netns/NAME/* over /etc: the nodes' own hosts file names
    both, so the (reverse) lookups torch makes are answered locally, and no nameserver is
    configured. Best effort: without it the lookups still fail inside the namespace, which
    has no route out, and torch only warns."""
    try:
        (NETNS_ETC / node.netns).mkdir(parents=True)
        # torch's sockets are dual-stack: peers appear as IPv4-mapped IPv6 addresses too
        names = [(a, f"node{i}") for i, n in enumerate(nodes) for a in (n.addr, f"::ffff:{n.addr}")]
        hosts = "".join(
            f"{a} {name}\n" for a, name in [("127.0.0.1", "localhost"), ("::1", "localhost"), *names]
        )
        (NETNS_ETC / node.netns / "hosts").write_text(hosts)
        (NETNS_ETC / node.netns / "resolv.conf").write_text("# no nameserver: only the hosts file\n")
    except OSError:
        pass


def _veth_bytes(node: Node) -> tuple[int, int]:
    """(received, sent) bytes on a node's veth end."""
    r = _ip("-n", node.netns, "-s", "-j", "link", "show", node.ifname)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def _start_agent(
    node: Node, host: Node, agent: list[str], train: list[str], out: Path, env_extra: dict | None = None
) -> subprocess.Popen:
    """A node's agent (`stratus torchrun`, as `stratus launch` writes it) with one worker,
    meeting the others through a c10d rendezvous whose store node `host` holds; its output
    goes to `out`."""
    torchrun = [
        sys.executable,
        "-m",
        "stratus",
        "torchrun",
        *agent,
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host.addr}:{PORT}",
        f"--rdzv-id=stratus-multinode-{os.getpid()}",
        # the endpoint is not the machine's hostname, so say which node hosts the store; a node
        # silent for 3 heartbeats of 1 s is gone (torch's default, 3 of 5 s, slows the test)
        f"--rdzv-conf=is_host={int(node == host)},join_timeout={TIMEOUT_S - 30},last_call_timeout=2,"
        "keep_alive_interval=1,keep_alive_max_attempt=3",
        f"--local-addr={node.addr}",  # the address the other node reaches this one at
        "-m",
        "stratus",
        "train",
        *train,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": node.ifname,
        # as `stratus launch` sets it: a fresh store each round, hosted by rank 0
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env_extra or {}),
    }
    with out.open("w") as f:
        return subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *torchrun],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    """Whatever is still running (a failure or a timeout): stop it, workers included."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=15)


def test_two_nodes_over_veth_match_one_process(two_nodes, tiny_data: Path, tmp_path: Path):
    """Each namespace is a node running its own torchrun agent with one worker; they meet
    through a c10d rendezvous on node 0's veth address, form a world of two, and gloo averages
    their halves of the global batch over the veth. The losses must equal a single process
    reading all 8 sequences at once."""
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG.format(data=tiny_data))

    one = run_cli(
        "train", str(config), f"--run.dir={tmp_path / 'one'}", "--train.micro_batch=8", timeout=TIMEOUT_S
    )
    assert one.returncode == 0, one.stderr[-3000:] + one.stdout[-3000:]

    run = tmp_path / "two-nodes"  # the same path on both nodes: the shared filesystem
    before = [_veth_bytes(n) for n in two_nodes]
    procs: list[subprocess.Popen] = []
    outs = [tmp_path / f"node{i}.out" for i in range(2)]
    try:
        for rank, (node, out) in enumerate(zip(two_nodes, outs, strict=True)):
            # static membership: node ranks follow the nodes
            agent = ["--nnodes=2", f"--node-rank={rank}", "--max-restarts=0"]
            train = [str(config), f"--run.dir={run}", "--train.micro_batch=4"]
            procs.append(_start_agent(node, two_nodes[0], agent, train, out))
        deadline = time.monotonic() + TIMEOUT_S
        codes: list[int | None] = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)  # killed below; reported with the nodes' output
    finally:
        _stop(procs)

    logs = "\n".join(f"--- node {i} ---\n{_tail(out)}" for i, out in enumerate(outs))
    assert codes == [0, 0], logs

    # ranks follow the nodes' addresses: node 0 is rank 0, the one that prints and writes metrics
    assert "[rank0] " in outs[0].read_text(), logs
    # both nodes joined one world of two: each rank logged the layout to its own file
    rank_logs = [run / "train.log", run / "train.rank1.log"]
    for log in rank_logs:
        assert log.is_file(), logs
        text = log.read_text()
        assert re.search(r"\b2 ranks\b", text) and "= 8 sequences" in text, _tail(log)

    # the collectives went over the veth, in both directions
    after = [_veth_bytes(n) for n in two_nodes]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        received, sent = a[0] - b[0], a[1] - b[1]
        assert received > 100_000 and sent > 100_000, f"node {i}: {received} B in, {sent} B out"

    ref, got = metrics(tmp_path / "one"), metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3]
    for ra, rb in zip(ref, got, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


def _last_per_step(run: Path) -> dict[int, dict]:
    """Each step's record as it finally stands (a step computed again after a restart is
    logged again)."""
    return {m["step"]: m for m in metrics(run) if "loss" in m}


ELASTIC_STEPS = 32
ALONE = r"\b1 ranks \(.*\| 1 data-parallel x 4 micro batch x 2 accumulation = 8 sequences"
BOTH = r"\b2 ranks \(.*\| 2 data-parallel x 4 micro batch x 1 accumulation = 8 sequences"


@pytest.fixture(scope="module")
def elastic(tiny_data: Path, tmp_path_factory) -> tuple[list[str], Path]:
    """The elastic jobs' `stratus train` arguments (4 sequences a rank a micro batch, 8 a
    step, a checkpoint every 4 steps), and one process's run of the same steps reading all 8
    sequences at once, which both must follow."""
    base = tmp_path_factory.mktemp("elastic")
    config = base / "tiny.toml"
    config.write_text(CONFIG.format(data=tiny_data).replace("steps = 3", f"steps = {ELASTIC_STEPS}"))
    common = [str(config), "--checkpoint.interval=4"]
    one = run_cli("train", *common, f"--run.dir={base / 'one'}", "--train.micro_batch=8", timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:] + one.stdout[-3000:]
    return [*common, "--train.micro_batch=4"], base / "one"


def _wait_for_checkpoint(
    run: Path, step: int, procs: list[subprocess.Popen], out: Path, deadline: float
) -> int:
    """Once checkpoint `step` is in, with the job under way: the newest step logged."""
    while not (run / "checkpoints" / f"step-{step:08d}").is_dir():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _tail(out)
        time.sleep(0.05)
    return max(_last_per_step(run), default=0)


def _children(pid: int) -> list[int]:
    """The pids whose parent is pid (an agent's workers)."""
    out = []
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _wait_for_text(out: Path, text: str, procs: list[subprocess.Popen], deadline: float) -> None:
    while text not in (out.read_text(errors="replace") if out.exists() else ""):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _tail(out)
        time.sleep(0.05)


def _follows(run: Path, reference: Path) -> None:
    ref, got = _last_per_step(reference), _last_per_step(run)
    assert sorted(got) == list(range(1, ELASTIC_STEPS + 1))
    for step, r in ref.items():
        assert got[step]["loss"] == pytest.approx(r["loss"], rel=1e-4), step


def test_a_lost_node_leaves_the_job_to_the_other(two_nodes, elastic, tmp_path: Path):
    """`torchrun --nnodes 1:2` on both nodes (reliability.min_nodes = 1, as `stratus launch`
    writes it): node 1 is killed whole, agent and worker, mid-run. Node 0's rank finds its
    peer gone, its agent meets the rendezvous again with the one node left, and the job
    resumes from its newest checkpoint on one rank, accumulating twice as many micro batches
    so that the global batch is the same. The losses follow one process reading the whole
    batch from the first step to the last."""
    train, reference = elastic
    run = tmp_path / "elastic"
    outs = [tmp_path / f"node{i}.out" for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for node, out in zip(two_nodes, outs, strict=True):
            agent = ["--nnodes=1:2", "--max-restarts=2"]
            procs.append(_start_agent(node, two_nodes[0], agent, [*train, f"--run.dir={run}"], out))
        deadline = time.monotonic() + TIMEOUT_S
        killed_at = _wait_for_checkpoint(run, 4, procs, outs[0], deadline)
        _kill_everything_in(two_nodes[1].netns)
        code = procs[0].wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
    logs = "\n".join(f"--- node {i} ---\n{_tail(out)}" for i, out in enumerate(outs))
    assert code == 0, logs
    assert killed_at < ELASTIC_STEPS, "the job ended before node 1 was lost: nothing was tested"
    log = (run / "train.log").read_text()
    assert re.search(BOTH, log) and re.search(ALONE, log), _tail(run / "train.log")
    assert log.index("1 ranks (") > log.index("2 ranks (")  # it shrank, in that order
    # node 0's agent saw its rank fail (its peer gone) and recorded it before restarting it
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert restarts and all(r["ranks"] == [0] and r["resume_step"] >= 4 for r in restarts), restarts
    _follows(run, reference)


def test_a_node_that_joins_late_grows_the_job(two_nodes, elastic, tmp_path: Path):
    """A spare, or a lost node back: node 0 starts alone under `--nnodes 1:2` and trains on
    one rank; node 1's agent joins after the first checkpoint, node 0's agent sees it waiting
    and restarts the group, and the job goes on with two ranks, each one micro batch a step.
    The losses follow one process reading the whole batch."""
    train, reference = elastic
    run = tmp_path / "elastic"
    outs = [tmp_path / f"node{i}.out" for i in range(2)]
    agent, train = ["--nnodes=1:2", "--max-restarts=2"], [*train, f"--run.dir={run}"]
    procs: list[subprocess.Popen] = []
    verbose = {"LOGLEVEL": "INFO"}  # the agents say when they join and when they see a node join
    try:
        procs.append(_start_agent(two_nodes[0], two_nodes[0], agent, train, outs[0], verbose))
        deadline = time.monotonic() + TIMEOUT_S
        joined_at = _wait_for_checkpoint(run, 4, procs, outs[0], deadline)
        # Node 0's rank is held (SIGSTOP) until its agent sees node 1 waiting: a node that
        # trains faster than the other starts must not finish alone before it arrives.
        held = _children(procs[0].pid)
        assert held, "node 0's worker was not found"
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        procs.append(_start_agent(two_nodes[1], two_nodes[0], agent, train, outs[1], verbose))
        _wait_for_text(outs[0], "new nodes from group_rank", procs, deadline)
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        _stop(procs)
    logs = "\n".join(f"--- node {i} ---\n{_tail(out)}" for i, out in enumerate(outs))
    assert codes == [0, 0], logs
    assert joined_at < ELASTIC_STEPS, "the job ended before node 1 joined: nothing was tested"
    log = (run / "train.log").read_text()
    assert re.search(ALONE, log) and re.search(BOTH, log), _tail(run / "train.log")
    assert log.index("2 ranks (") > log.index("1 ranks (")  # it grew, in that order
    assert not (run / "restarts.jsonl").exists()  # a node that joins is no failure
    _follows(run, reference)


def test_a_cut_link_is_detected_and_the_job_recovers(two_nodes, elastic, tmp_path: Path):
    """Node 1's link goes down mid-run (`ip link set … down`) for longer than the hang timeout:
    neither rank hears from the other, their watchdogs end them (exit 4), and the agents record
    the hang and meet again, node 1's once its link is back. The job, two nodes throughout
    (--nnodes 2:2), finishes and follows one process's losses."""
    train, reference = elastic
    run = tmp_path / "cut"
    outs = [tmp_path / f"node{i}.out" for i in range(2)]
    agent = ["--nnodes=2:2", "--max-restarts=3"]
    train = [
        *train,
        f"--run.dir={run}",
        "--reliability.hang_timeout_s=5",
        "--reliability.startup_timeout_s=60",
    ]
    node1 = two_nodes[1]
    procs: list[subprocess.Popen] = []
    try:
        for node, out in zip(two_nodes, outs, strict=True):
            procs.append(_start_agent(node, two_nodes[0], agent, train, out))
        deadline = time.monotonic() + TIMEOUT_S
        cut_at = _wait_for_checkpoint(run, 4, procs, outs[0], deadline)
        assert _ip("-n", node1.netns, "link", "set", node1.ifname, "down").returncode == 0
        cut = time.monotonic()
        # the cut is over once a watchdog has ended a rank for it (its agent records the hang)
        while "hang (watchdog)" not in (
            (run / "restarts.jsonl").read_text() if (run / "restarts.jsonl").exists() else ""
        ):
            assert time.monotonic() < deadline, _tail(outs[0]) + _tail(outs[1])
            time.sleep(0.1)
        down_s = time.monotonic() - cut
        assert _ip("-n", node1.netns, "link", "set", node1.ifname, "up").returncode == 0
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        _ip("-n", node1.netns, "link", "set", node1.ifname, "up")
        _stop(procs)
    logs = "\n".join(f"--- node {i} ---\n{_tail(out)}" for i, out in enumerate(outs))
    assert codes == [0, 0], logs
    assert cut_at < ELASTIC_STEPS and down_s > 5, (cut_at, down_s)
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert any(r["failure"] == "hang (watchdog)" for r in restarts), restarts
    _follows(run, reference)
