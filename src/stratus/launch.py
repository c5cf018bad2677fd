"""Job files for a GPU cluster: an sbatch script (Slurm) or a Kubeflow PyTorchJob (Kubernetes).

Both run `stratus torchrun -m stratus train CONFIG` (torchrun with stratus's restart policy,
reliability/agent.py) on every node with a c10d rendezvous on the first node, and set the
environment that matters on 8-GPU nodes joined by InfiniBand, each variable with the reason
it is there. Rendering is pure text; `write_launch` checks the inputs and the
config first and writes the file atomically. docs/cluster.md walks through using them.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stratus.atomic import write_atomic
from stratus.errors import StratusError

KINDS = {"slurm": ".sbatch", "k8s": ".yaml"}

# Both names of the flight recorder's dump-file prefix: torch reads TORCH_NCCL_DEBUG_INFO_TEMP_FILE
# (2.3 and later) and the newer TORCH_FR_DUMP_TEMP_FILE; each rank appends its global rank.
FR_FILE_VARS = ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE")

# Why each variable is set; the job files carry these as comments.
WHY = {
    "NCCL_IB_HCA": "NCCL sends over the InfiniBand adapters whose names start with this; "
    "name ports exactly (=mlx5_0,mlx5_1) to leave out a storage or Ethernet NIC",
    "NCCL_SOCKET_IFNAME": "interfaces for NCCL's bootstrap and socket traffic: never loopback or a "
    "container bridge; name the nodes' interface (ib0, bond0) if the default picks a wrong one",
    "NCCL_DEBUG": "NCCL warnings and errors only; INFO once shows which transport (NET/IB or "
    "NET/Socket) NCCL chose",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "a failed or timed-out collective ends the process (3 = without "
    "aborting the communicator, which can itself hang, and keeps flight-recorder dumps working) so "
    "torchrun restarts the group instead of the job hanging",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "flight recorder: each rank keeps its last this-many collectives "
    "in a ring buffer",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "on a collective timeout, every rank writes that buffer to a file, "
    "the first thing to read after a hang",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "flight-recorder dump prefix (each rank appends its rank), on "
    "shared storage",
    "TORCH_FR_DUMP_TEMP_FILE": "the same prefix under the name newer torch reads",
    "TORCH_NCCL_ENABLE_MONITORING": "a monitor thread kills the process if NCCL's watchdog itself is "
    "stuck in a CUDA or NCCL call, instead of holding the nodes idle",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "seconds without a watchdog heartbeat before that monitor "
    "kills the process (leaves time for the dump)",
    "OMP_NUM_THREADS": "CPU threads per rank: the node's CPUs shared by its ranks (torchrun would set 1)",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "each restart round gets a fresh TCPStore: torchrun's shared one "
    "keeps the dead round's keys, and a restarted rank can read a peer's old address (torch issue 135712)",
}

NOT_SET = (
    "CUDA_DEVICE_MAX_CONNECTIONS is left at CUDA's default: FSDP's all-gathers and reduce-scatters "
    "run on their own streams and overlap compute only on separate hardware queues; the =1 that "
    "Megatron-style tensor-parallel overlap wants would serialise them"
)


def nccl_env(ib_hca: str, socket_ifname: str, omp_threads: int, dump_prefix: str) -> dict[str, str]:
    """The job environment, in the order the job files list it (names as in WHY)."""
    return {
        "NCCL_IB_HCA": ib_hca,
        "NCCL_SOCKET_IFNAME": socket_ifname,
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": dump_prefix,
        "TORCH_FR_DUMP_TEMP_FILE": dump_prefix,
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "600",
        "OMP_NUM_THREADS": str(omp_threads),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def _check_shape(nodes: int, gpus_per_node: int) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise StratusError(f"--nodes must be at least 1 (got {nodes!r})")
    if not isinstance(gpus_per_node, int) or not 1 <= gpus_per_node <= 16:
        raise StratusError(f"--gpus-per-node must be between 1 and 16 (got {gpus_per_node!r})")


def _check_elastic(nodes: int, min_nodes: int | None, rejoin_timeout_s: float) -> int:
    """The fewest nodes the job goes on with (min_nodes None or 0: all of them)."""
    low = min_nodes or nodes
    if not 1 <= low <= nodes:
        raise StratusError(
            f"reliability.min_nodes ({min_nodes}) must lie between 1 and the job's {nodes} nodes "
            "(0 = all of them): the job cannot grow past the nodes it asks for"
        )
    if not rejoin_timeout_s > 0:
        raise StratusError(f"reliability.rejoin_timeout_s must be positive (got {rejoin_timeout_s})")
    return low


def _rdzv_conf(rejoin_timeout_s: float) -> str:
    # once the fewest nodes have joined a round, how long it stays open for more (a spare, or a
    # lost node back); a round closes at once when all the job's nodes are in
    return f"last_call_timeout={rejoin_timeout_s:g}"


def _check_name(what: str, value: str, pattern: str, hint: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise StratusError(f"{what} {value!r} is not allowed: {hint}")


def _train_args(config: str, overrides: Sequence[str]) -> list[str]:
    return ["-m", "stratus", "train", config, *overrides]


# --- Slurm -----------------------------------------------------------------------------------


def render_slurm(
    config: str,
    nodes: int,
    gpus_per_node: int = 8,
    job_name: str = "stratus",
    partition: str | None = None,
    time_limit: str = "48:00:00",
    overrides: Sequence[str] = (),
    max_restarts: int = 3,
    ib_hca: str = "mlx5",
    socket_ifname: str = "^lo,docker",
    rdzv_port: int = 29500,
    cpus_per_node: int | None = None,
    log_dir: str = "logs",
    min_nodes: int | None = None,
    spare_nodes: int = 0,
    rejoin_timeout_s: float = 60.0,
) -> str:
    """An sbatch script: one `srun torchrun` agent per node, G ranks each, rendezvous on the
    first node. cpus_per_node (default 8 per GPU) becomes --cpus-per-task; log_dir (relative to
    the submit directory, which Slurm does not create) holds the job log and flight-recorder dumps.

    Node loss: the allocation and the step outlive a failed node (--no-kill, no kill on one
    task's exit); torchrun goes on with as few as min_nodes, or takes one of spare_nodes extra
    nodes, which wait in the rendezvous until one is needed; a job that ends in failure anyway
    (the first node, which holds the rendezvous, lost; or the restarts spent) is requeued up
    to max_restarts times, and resumes from its newest verified checkpoint."""
    _check_shape(nodes, gpus_per_node)
    low = _check_elastic(nodes, min_nodes, rejoin_timeout_s)
    if not isinstance(spare_nodes, int) or spare_nodes < 0:
        raise StratusError(f"--spare-nodes must be 0 or more (got {spare_nodes!r})")
    _check_name("job name", job_name, r"[A-Za-z0-9][A-Za-z0-9._-]*", "use letters, digits, '.', '_', '-'")
    _check_name("log directory", log_dir, r"[A-Za-z0-9._/-]+", "use letters, digits, '.', '_', '-', '/'")
    _check_name("time limit", time_limit, r"[0-9][0-9:-]*|UNLIMITED|infinite", "e.g. 48:00:00 or 2-00:00:00")
    if partition is not None:
        _check_name("partition", partition, r"[A-Za-z0-9._,-]+", "a Slurm partition name")
    cpus = cpus_per_node if cpus_per_node is not None else 8 * gpus_per_node
    if cpus < 1 or max_restarts < 0 or not 0 < rdzv_port < 65536:
        raise StratusError("cpus per node must be >= 1, max restarts >= 0, and the port in 1..65535")

    base = "" if log_dir.startswith("/") else '"$SLURM_SUBMIT_DIR"/'
    dump_prefix = base + shlex.quote(f"{log_dir}/flight-recorder/") + '"$SLURM_JOB_ID"/rank_'
    env = nccl_env(ib_hca, socket_ifname, max(1, cpus // gpus_per_node), dump_prefix)

    shape = f"{nodes} node(s) x {gpus_per_node} GPUs"
    if spare_nodes:
        shape += f" and {spare_nodes} spare(s)"
    if low < nodes:
        shape += f", going on with as few as {low} node(s)"
    lines = [
        "#!/bin/bash",
        f"# Written by `stratus launch slurm`: {shape}, config {json.dumps(config)}.",
        "# Submit from the repository root (config, data and run paths are relative to it):",
        f"#   sbatch <this file>      log: {log_dir}/{job_name}-<jobid>.out",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes + spare_nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "#SBATCH --no-kill",
        "#SBATCH --requeue",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["", "set -eu", "", "# --- environment, and why each variable is set"]
    for name, value in env.items():
        shown = value if name in FR_FILE_VARS else shlex.quote(value)
        lines += [f"# {WHY[name]}", f"export {name}={shown}"]
    lines += [f"# {NOT_SET}", ""]
    lines += [
        "# The c10d rendezvous (and the store every rank joins) lives on the first node.",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'mkdir -p "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")"',
        "",
        "# One agent per node (torchrun, with stratus's policy) starts the node's ranks; it restarts",
        "# all of them (each run resumes from the newest verified checkpoint) up to --max-restarts",
        "# times, but not a user's mistake (exit 2) or a crash loop (exit 3). A lost node:",
        "# the allocation stays (--no-kill), the step goes on (no kill on one task's exit), and the",
        f"# agents meet again with at least {low} node(s) (--nnodes MIN:MAX), waiting",
        f"# {rejoin_timeout_s:g} s for more; nodes past {nodes} wait in the rendezvous as spares.",
        "# srun passes --cpus-per-task itself: some Slurm versions do not hand it down to the step.",
        "rc=0",
        'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --no-kill --kill-on-bad-exit=0 \\',
        f"  stratus torchrun --nnodes {low}:{nodes} --nproc-per-node {gpus_per_node} \\",
        f'  --rdzv-backend c10d --rdzv-endpoint "$HEAD:{rdzv_port}" --rdzv-id "$SLURM_JOB_ID" \\',
        f"  --rdzv-conf {_rdzv_conf(rejoin_timeout_s)} --max-restarts {max_restarts} \\",
        "  " + " ".join(shlex.quote(a) for a in _train_args(config, overrides)) + " || rc=$?",
        "",
        "# Failed anyway (the first node, which holds the rendezvous, was lost, or the restarts ran",
        "# out): back in the queue, on whatever nodes Slurm gives, resuming from the newest checkpoint.",
        "# Not a user's mistake (2) or a crash loop (3): those would fail the same way again.",
        'case "$rc" in 0|2|3) requeue=no ;; *) requeue=yes ;; esac',
        f'if [ "$requeue" = yes ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_restarts} ]; then',
        '  echo "stratus: the job failed (exit $rc); requeueing it" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


# --- Kubernetes --------------------------------------------------------------------------------


def k8s_manifest(
    config: str,
    nodes: int,
    gpus_per_node: int = 8,
    image: str = "stratus:latest",
    job_name: str = "stratus",
    namespace: str = "default",
    overrides: Sequence[str] = (),
    max_restarts: int = 3,
    ib_resource: str | None = "rdma/ib",
    ib_hca: str = "mlx5",
    socket_ifname: str = "^lo,docker",
    rdzv_port: int = 29500,
    cpus_per_node: int | None = None,
    pvc: str = "stratus-workspace",
    workdir: str = "/workspace",
    min_nodes: int | None = None,
    rejoin_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """The PyTorchJob as a plain dict: Master (1 pod, hosts the rendezvous) + nodes-1 Workers,
    one pod per node with all its GPUs; the PVC `pvc` is mounted at `workdir`, the working
    directory, so configs/, data/, runs/ and logs/ live on shared storage. A failed pod is
    restarted (OnFailure), on another node if its own is gone; with min_nodes below nodes
    the job is elastic (torchrun --nnodes MIN:MAX and the operator's elasticPolicy), so the
    others go on while it comes back."""
    _check_shape(nodes, gpus_per_node)
    low = _check_elastic(nodes, min_nodes, rejoin_timeout_s)
    k8s_name = r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?"
    _check_name("job name", job_name, k8s_name, "Kubernetes wants lowercase letters, digits, '-'")
    _check_name("namespace", namespace, r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", "a Kubernetes namespace")
    _check_name("claim", pvc, r"[a-z0-9]([-.a-z0-9]*[a-z0-9])?", "a PersistentVolumeClaim name")
    if max_restarts < 0 or not 0 < rdzv_port < 65536 or not workdir.startswith("/"):
        raise StratusError("max restarts must be >= 0, the port in 1..65535, the workdir absolute")
    cpus = cpus_per_node if cpus_per_node is not None else 8 * gpus_per_node
    dump_prefix = f"{workdir}/logs/flight-recorder/{job_name}/rank_"
    env = nccl_env(ib_hca, socket_ifname, max(1, cpus // gpus_per_node), dump_prefix)
    torchrun = [
        "stratus",
        "torchrun",
        f"--nnodes={low}:{nodes}",
        f"--nproc-per-node={gpus_per_node}",
        "--rdzv-backend=c10d",
        # the operator sets MASTER_ADDR (the Master pod's service) and MASTER_PORT (our port)
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        f"--rdzv-id={job_name}",
        f"--rdzv-conf={_rdzv_conf(rejoin_timeout_s)}",
        f"--max-restarts={max_restarts}",
        *(shlex.quote(a) for a in _train_args(config, overrides)),
    ]
    script = 'mkdir -p "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")" && exec ' + " ".join(torchrun)
    limits: dict[str, Any] = {"nvidia.com/gpu": gpus_per_node}
    if ib_resource:
        limits[ib_resource] = 1
    container = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": workdir,
        "command": ["/bin/sh", "-c", script],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"name": "pytorchjob-port", "containerPort": rdzv_port}],
        "resources": {"limits": limits},
        # RDMA registers (pins) memory, which needs IPC_LOCK
        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": workdir},
        ],
    }
    pod = {
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}},
            ],
        }
    }
    # ExitCode: the operator restarts a pod whose agent was killed (128 + signal), and not one
    # that exited 1-127 (2 a user's mistake, 3 a crash loop, 1 torchrun's restarts spent)
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": pod}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "ExitCode", "template": pod}
    manifest = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": job_name, "namespace": namespace},
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"backoffLimit": max_restarts},
            "pytorchReplicaSpecs": replicas,
        },
    }
    if low < nodes:
        manifest["spec"]["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "minReplicas": low,
            "maxReplicas": nodes,
            "maxRestarts": max_restarts,
        }
    return json.loads(json.dumps(manifest))  # plain data only, and a fresh copy of the shared pod


def render_k8s(config: str, nodes: int, **kw: Any) -> str:
    """The PyTorchJob manifest as YAML, headed by why each environment variable is set."""
    manifest = k8s_manifest(config, nodes, **kw)
    env = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    gpus = manifest["spec"]["nprocPerNode"]
    head = [
        f"# Written by `stratus launch k8s`: {nodes} node(s) x {gpus} GPUs, config {json.dumps(config)}.",
        "# Needs the Kubeflow training operator; submit with: kubectl apply -f <this file>",
        "# Environment, and why each variable is set:",
        *(f"#   {e['name']}: {WHY[e['name']]}" for e in env),
        f"# {NOT_SET}",
    ]
    return "\n".join(head) + "\n" + to_yaml(manifest)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def _scalar(v: Any) -> str:
    if isinstance(v, (dict, list)):  # only empty ones get here
        return "{}" if isinstance(v, dict) else "[]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    out = []  # a YAML double-quoted string: every string is quoted, so none reads as a number or bool
    for ch in str(v):
        c = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}")
    return '"' + "".join(out) + '"'


def _emit(node: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = k if _PLAIN_KEY.fullmatch(k) else _scalar(k)
            if isinstance(v, (dict, list)) and v:
                lines += [f"{pad}{key}:", *_emit(v, indent + 2)]
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    else:
        for item in node:
            if isinstance(item, (dict, list)) and item:
                sub = _emit(item, indent + 2)
                lines += [pad + "- " + sub[0][indent + 2 :], *sub[1:]]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def to_yaml(data: dict[str, Any]) -> str:
    """Block-style YAML for plain data (dicts, lists, strings, numbers, bools, None)."""
    return "\n".join(_emit(data, 0)) + "\n"


# --- writing -----------------------------------------------------------------------------------


def _check_layout(cfg: Any, world: int, gpus_per_node: int) -> int:
    """The data-parallel degree of cfg's [parallel] layout on `world` ranks (world without one);
    the same checks as at train time (stratus.distributed.layout, torch-free), plus tp within a node."""
    pc = getattr(cfg, "parallel", None)
    if pc is None:
        return world
    if gpus_per_node % pc.tp:
        raise StratusError(
            f"parallel.tp ({pc.tp}) must divide --gpus-per-node ({gpus_per_node}): "
            "keep tensor parallelism inside a node, on NVLink"
        )
    from stratus.distributed.layout import pipeline_rounds, resolve_layout

    layout = resolve_layout(pc, world, cfg.model)
    per_rank = cfg.train.micro_batch * layout.dp
    batch = cfg.train.global_batch or per_rank
    if batch % per_rank == 0:  # (a batch that does not divide is reported by the caller)
        pipeline_rounds(layout, pc, batch // per_rank)
    return layout.dp


def write_launch(
    kind: str,
    config: str,
    out: str | None,
    *,
    nodes: int,
    gpus_per_node: int = 8,
    job_name: str = "stratus",
    overrides: Sequence[str] = (),
    force: bool = False,
    **kw: Any,
) -> Path:
    """Check the inputs and the config, then write the job file atomically; returns its path.
    Default path: launch/<job_name>.sbatch or .yaml. An existing file is replaced only with force."""
    from stratus.config import load_config, parse_overrides

    if kind not in KINDS:
        raise StratusError(f"unknown launcher {kind!r}: choose one of {', '.join(KINDS)}")
    _check_shape(nodes, gpus_per_node)
    if not Path(config).is_file():
        raise StratusError(f"config file {config} not found: give a TOML file such as configs/demo.toml")
    overrides = list(overrides)
    cfg = load_config(config, parse_overrides(overrides))
    rc = cfg.reliability
    low = _check_elastic(nodes, rc.min_nodes, rc.rejoin_timeout_s)
    for n in range(nodes, low - 1, -1):  # every size the job may shrink to must train the same batch
        lost = "" if n == nodes else f" (after losing {nodes - n} of {nodes}; reliability.min_nodes = {low})"
        try:
            dp = _check_layout(cfg, n * gpus_per_node, gpus_per_node)
        except StratusError as e:
            raise StratusError(f"on {n} nodes{lost}: {e}") from None
        tc = cfg.train
        if tc.global_batch and tc.global_batch % (tc.micro_batch * dp):
            raise StratusError(
                f"train.global_batch ({tc.global_batch}) must be a multiple of train.micro_batch x "
                f"data-parallel ranks ({tc.micro_batch} x {dp} = {tc.micro_batch * dp}) on {n} x "
                f"{gpus_per_node} GPUs{lost}"
            )
    kw = {**kw, "min_nodes": low, "rejoin_timeout_s": rc.rejoin_timeout_s}
    render = render_slurm if kind == "slurm" else k8s_manifest
    unknown = sorted(set(kw) - set(inspect.signature(render).parameters))
    if unknown:
        raise StratusError(f"stratus launch {kind} has no option {', '.join(unknown)}")
    common = dict(gpus_per_node=gpus_per_node, job_name=job_name, overrides=overrides, **kw)
    text = render_slurm(config, nodes, **common) if kind == "slurm" else render_k8s(config, nodes, **common)

    path = Path(out) if out else Path("launch") / f"{job_name}{KINDS[kind]}"
    if path.is_dir():
        raise StratusError(f"{path} is a directory: give a file name for the {kind} job file")
    if path.exists() and not force:
        raise StratusError(f"{path} exists: pass --force to replace it, or --out to write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "slurm":  # Slurm does not create the directory of --output; the job would die silently
        Path(kw.get("log_dir", "logs")).mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, mode=0o644)
    return path
