"""`stratus launch`: the sbatch script and the PyTorchJob for 4 nodes x 8 GPUs, run for real where
a CPU can (bash with stand-ins for scontrol, srun and `stratus torchrun`), and write_launch's checks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stratus import atomic
from stratus.config import Config
from stratus.errors import StratusError
from stratus.launch import WHY, k8s_manifest, render_k8s, render_slurm, to_yaml, write_launch

try:
    import yaml
except ImportError:  # not a dependency: the manifest's structure is checked on the dict then
    yaml = None

NODES, GPUS = 4, 8
OVERRIDES = ["--train.steps=200", "--run.dir=runs/with space", "--log.progress", "plain"]
ENV_NAMES = list(WHY)
NASTY = 'configs/it\'s $HOME `id`\n"x".toml'  # must reach stratus as one unchanged word
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    f = tmp_path / "cluster.toml"
    f.write_text('[model]\nn_layers = 2\nd_model = 64\nn_heads = 4\n\n[run]\ndir = "runs/cluster"\n')
    return f


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """scontrol names two nodes; srun records its options and runs the command; `stratus
    torchrun` records the argv and environment torchrun was given, as JSON in $FAKE_OUT."""
    d = tmp_path / "bin"
    d.mkdir()
    _exe(
        d / "scontrol",
        '#!/bin/sh\nif [ "$1" = requeue ]; then echo "$2" > requeued; exit 0; fi\n'
        "printf 'node-a\\nnode-b\\n'\n",
    )
    _exe(
        d / "srun",
        '#!/bin/sh\nprintf \'%s\\n\' "$@" > "$FAKE_SRUN"\n'
        'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    )
    _exe(
        d / "stratus",
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"names = {ENV_NAMES!r}\n"
        "assert sys.argv[1] == 'torchrun', sys.argv\n"
        "json.dump({'argv': sys.argv[2:], 'cwd': os.getcwd(), 'env': {n: os.environ.get(n) for n in names}},"
        " open(os.environ['FAKE_OUT'], 'w'))\n"
        "sys.exit(int(os.environ.get('FAKE_RC', '0')))\n",
    )
    return d


def _train_argv(config: str) -> list[str]:
    return ["-m", "stratus", "train", config, *OVERRIDES]


# --- Slurm -----------------------------------------------------------------------------------


def test_sbatch_script_has_the_job_shape_torchrun_line_and_environment():
    text = render_slurm("configs/big model.toml", NODES, GPUS, partition="gpu", overrides=OVERRIDES)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--exclusive",
        "--time=48:00:00",
        "--partition=gpu",
        "--output=logs/%x-%j.out",
        "--no-kill",  # a failed node does not end the allocation
        "--requeue",
    ):
        assert f"#SBATCH {directive}" in lines
    # every #SBATCH line comes before the first command, or Slurm ignores it
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_command

    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "--nnodes 4:4 --nproc-per-node 8" in text  # min_nodes 0: no node may be lost
    assert '--rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID"' in text
    assert "--rdzv-conf last_call_timeout=60 --max-restarts 3" in text
    assert "srun " in text and "torchrun " in text
    # the config path and the overrides arrive as single words
    assert "-m stratus train 'configs/big model.toml' --train.steps=200 '--run.dir=runs/with space'" in text
    assert "--kill-on-bad-exit=0" in text and "--kill-on-bad-exit=1" not in text

    for name in ENV_NAMES:  # each variable exported once, under a comment saying why
        (i,) = [i for i, ln in enumerate(lines) if ln.startswith(f"export {name}=")]
        assert lines[i - 1] == f"# {WHY[name]}"
    assert "export NCCL_IB_HCA=mlx5" in lines
    assert "export NCCL_SOCKET_IFNAME='^lo,docker'" in lines
    assert "export NCCL_DEBUG=WARN" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in lines
    assert "export TORCH_NCCL_DUMP_ON_TIMEOUT=1" in lines
    assert "export TORCH_NCCL_ENABLE_MONITORING=1" in lines
    assert "export OMP_NUM_THREADS=8" in lines  # 64 CPUs over 8 ranks


@needs_bash
def test_sbatch_script_is_valid_bash(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm("configs/x.toml", NODES, GPUS, overrides=OVERRIDES))
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_bash
def test_sbatch_script_runs_torchrun_with_the_right_argv_and_environment(tmp_path, fake_bin):
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(NASTY, NODES, GPUS, overrides=OVERRIDES, max_restarts=5))
    env = {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "4",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "64",
        "FAKE_OUT": str(tmp_path / "torchrun.json"),
        "FAKE_SRUN": str(tmp_path / "srun.txt"),
    }
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "srun.txt").read_text().splitlines()[:4] == [
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--no-kill",
        "--kill-on-bad-exit=0",  # one node's agent ending does not end the others
    ]
    got = json.loads((tmp_path / "torchrun.json").read_text())
    assert got["argv"] == [
        "--nnodes",
        "4:4",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node-a:29500",  # the first node of the allocation
        "--rdzv-id",
        "4242",
        "--rdzv-conf",
        "last_call_timeout=60",
        "--max-restarts",
        "5",
        *_train_argv(NASTY),
    ]
    assert not (tmp_path / "requeued").exists()  # it succeeded
    dump = f"{tmp_path}/logs/flight-recorder/4242/rank_"
    assert got["env"]["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == dump
    assert got["env"]["TORCH_FR_DUMP_TEMP_FILE"] == dump
    assert (tmp_path / "logs" / "flight-recorder" / "4242").is_dir()  # dumps have somewhere to go
    assert got["env"]["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert got["env"]["NCCL_IB_HCA"] == "mlx5"
    assert int(got["env"]["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert all(got["env"][n] for n in ENV_NAMES)


@needs_bash
@pytest.mark.parametrize(
    ("restarted", "rc", "requeued"), [(0, 1, True), (2, 1, True), (3, 1, False), (0, 2, False), (0, 3, False)]
)
def test_an_elastic_sbatch_job_goes_on_without_a_node_and_requeues_a_failure(
    tmp_path, fake_bin, restarted, rc, requeued
):
    """Three of four nodes are enough, one spare waits in the rendezvous; a job that fails
    anyway goes back in the queue, up to --max-restarts times, and says why. A user's mistake
    (2) and a crash loop (3) would fail again: they are not requeued."""
    text = render_slurm("configs/x.toml", NODES, GPUS, min_nodes=3, spare_nodes=1, rejoin_timeout_s=45)
    assert "#SBATCH --nodes=5" in text.splitlines()  # the spare is in the allocation
    assert "4 node(s) x 8 GPUs and 1 spare(s), going on with as few as 3 node(s)" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-e]",
        "SLURM_NNODES": "5",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_RESTART_COUNT": str(restarted),
        "FAKE_OUT": str(tmp_path / "torchrun.json"),
        "FAKE_SRUN": str(tmp_path / "srun.txt"),
        "FAKE_RC": str(rc),  # 1: the agents gave up (the first node lost, or the restarts spent)
    }
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == rc  # the step's failure is the job's exit code
    argv = json.loads((tmp_path / "torchrun.json").read_text())["argv"]
    assert argv[:2] == ["--nnodes", "3:4"]  # the spare waits: at most 4 nodes train
    assert argv[argv.index("--rdzv-conf") + 1] == "last_call_timeout=45"
    assert ((tmp_path / "requeued").is_file()) is requeued
    if requeued:
        assert (tmp_path / "requeued").read_text().strip() == "77"
        assert f"the job failed (exit {rc}); requeueing it" in r.stderr


@pytest.mark.parametrize(
    ("batch", "reliability", "message"),
    [
        (64, "min_nodes = 3", "(2 x 24 = 48) on 3 x 8 GPUs (after losing 1 of 4; reliability.min_nodes = 3)"),
        (64, "min_nodes = 5", "reliability.min_nodes (5) must lie between 1 and the job's 4 nodes"),
        (192, "min_nodes = 2", None),  # 192 sequences divide over 4, 3 and 2 nodes of 8 ranks of 2
    ],
)
def test_write_launch_checks_every_size_an_elastic_job_may_shrink_to(tmp_path, batch, reliability, message):
    f = tmp_path / "e.toml"
    f.write_text(f"[train]\nglobal_batch = {batch}\nmicro_batch = 2\n\n[reliability]\n{reliability}\n")
    out = tmp_path / "job.sbatch"
    if message is None:
        assert "--nnodes 2:4 " in write_launch("slurm", str(f), str(out), nodes=NODES).read_text()
        return
    with pytest.raises(StratusError) as e:
        write_launch("slurm", str(f), str(out), nodes=NODES)
    assert message in str(e.value)
    assert not out.exists()


# --- Kubernetes --------------------------------------------------------------------------------


def _pods(m: dict) -> dict[str, dict]:
    return m["spec"]["pytorchReplicaSpecs"]


def test_pytorchjob_has_one_master_and_the_other_nodes_as_workers():
    m = k8s_manifest("configs/x.toml", NODES, GPUS, overrides=OVERRIDES, pvc="team-data")
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert m["spec"]["nprocPerNode"] == "8"
    assert _pods(m)["Master"]["replicas"] == 1
    assert _pods(m)["Worker"]["replicas"] == 3
    # a pod killed (128 + signal) is restarted; one that exited 2 (a mistake) or 3 (a crash loop) is not
    assert {p["restartPolicy"] for p in _pods(m).values()} == {"ExitCode"}
    for role in ("Master", "Worker"):
        pod = _pods(m)[role]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["resources"]["limits"]["rdma/ib"] == 1
        assert {e["name"] for e in c["env"]} == set(ENV_NAMES)
        assert {e["name"]: e["value"] for e in c["env"]}["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "team-data"
        assert {v["mountPath"] for v in c["volumeMounts"]} == {"/dev/shm", "/workspace"}
        script = c["command"][2]
        assert "--nnodes=4:4 --nproc-per-node=8 --rdzv-backend=c10d" in script
        assert "-m stratus train configs/x.toml" in script
    assert "elasticPolicy" not in m["spec"]  # no node may be lost: not elastic
    elastic = k8s_manifest("configs/x.toml", NODES, GPUS, min_nodes=2, rejoin_timeout_s=30)
    policy = {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 3}
    assert elastic["spec"]["elasticPolicy"] == policy
    script = _pods(elastic)["Worker"]["template"]["spec"]["containers"][0]["command"][2]
    assert "--nnodes=2:4 " in script and "--rdzv-conf=last_call_timeout=30 " in script
    one = k8s_manifest("configs/x.toml", 1, GPUS, ib_resource=None)
    assert "Worker" not in _pods(one)
    assert "rdma/ib" not in _pods(one)["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_pytorchjob_yaml_parses_back_to_the_manifest():
    text = render_k8s(NASTY, NODES, gpus_per_node=GPUS, overrides=OVERRIDES)
    for name in ENV_NAMES:
        assert f"#   {name}: {WHY[name]}" in text
    assert "              resources:\n                limits:\n                  nvidia.com/gpu: 8\n" in text
    if yaml is None:
        pytest.skip("PyYAML not installed: the structure is checked on the dict")
    assert yaml.safe_load(text) == k8s_manifest(NASTY, NODES, GPUS, overrides=OVERRIDES)


def test_to_yaml_quotes_strings_that_yaml_would_read_otherwise():
    if yaml is None:
        pytest.skip("PyYAML not installed")
    tricky = ["yes", "no", "null", "0123", "1e3", "-x", "a: b", "# c", 'q"uote', "back\\slash", "tab\tnl\n"]
    tricky += ["\u00e9t\u00e9", "\x7f\x85", "\u2028", "\U0001f600", "", " lead", "{x}", "*a", "!t", "%p"]
    data = {
        "s": tricky,
        "n": [1, -2, 3.5, True, False, None],
        "e": {},
        "l": [],
        "nested": [{"a": [{"b": 1}]}],
    }
    data["weird key: #"] = "v"
    assert yaml.safe_load(to_yaml(data)) == data


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_pytorchjob_command_runs_torchrun_with_the_right_argv(tmp_path, fake_bin):
    m = k8s_manifest(NASTY, NODES, GPUS, overrides=OVERRIDES)
    c = _pods(m)["Worker"]["template"]["spec"]["containers"][0]
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in c["env"]},
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "fr" / "rank_"),
        "MASTER_ADDR": "stratus-master-0",  # set by the training operator
        "MASTER_PORT": "29500",
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "FAKE_OUT": str(tmp_path / "torchrun.json"),
    }
    r = subprocess.run(c["command"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "torchrun.json").read_text())
    assert got["argv"] == [
        "--nnodes=4:4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=stratus-master-0:29500",
        "--rdzv-id=stratus",
        "--rdzv-conf=last_call_timeout=60",
        "--max-restarts=3",
        *_train_argv(NASTY),
    ]
    assert (tmp_path / "fr").is_dir()


# --- write_launch ------------------------------------------------------------------------------


def test_write_launch_writes_the_rendered_file_under_launch(tmp_path, cfg_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write_launch("slurm", str(cfg_file), None, nodes=NODES, gpus_per_node=GPUS, overrides=OVERRIDES)
    assert p == Path("launch/stratus.sbatch")
    assert p.read_text() == render_slurm(str(cfg_file), NODES, GPUS, overrides=OVERRIDES)
    assert Path("logs").is_dir()  # Slurm would not create the --output directory
    p = write_launch("k8s", str(cfg_file), None, nodes=NODES, job_name="big-run", image="reg/stratus:1")
    assert p == Path("launch/big-run.yaml")
    assert p.read_text() == render_k8s(str(cfg_file), NODES, job_name="big-run", image="reg/stratus:1")
    out = tmp_path / "elsewhere" / "job.sh"
    assert write_launch("slurm", str(cfg_file), str(out), nodes=2) == out and out.is_file()
    assert sorted(x.name for x in (tmp_path / "launch").iterdir()) == ["big-run.yaml", "stratus.sbatch"]


@pytest.mark.parametrize(
    ("kind", "nodes", "gpus", "extra", "message"),
    [
        ("slurm", 0, 8, {}, "--nodes must be at least 1"),
        ("slurm", 4, 0, {}, "--gpus-per-node must be between 1 and 16"),
        ("slurm", 4, 17, {}, "--gpus-per-node must be between 1 and 16"),
        ("pbs", 4, 8, {}, "unknown launcher 'pbs'"),
        ("slurm", 4, 8, {"image": "x"}, "stratus launch slurm has no option image"),
        ("k8s", 4, 8, {"job_name": "Big_Run"}, "job name 'Big_Run' is not allowed"),
        ("slurm", 4, 8, {"job_name": "a b"}, "job name 'a b' is not allowed"),
        ("slurm", 4, 8, {"overrides": ["--model.n_layerz=3"]}, "model.n_layerz: unknown key"),
        ("slurm", 4, 8, {"overrides": ["--train.global_batch=48"]}, "train.global_batch (48) must be"),
        ("slurm", 4, 8, {"overrides": ["--parallel.pp=2"]}, "needs at least as many micro batches"),
    ],
)
def test_write_launch_refuses_bad_input_and_writes_nothing(
    tmp_path, cfg_file, monkeypatch, kind, nodes, gpus, extra, message
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StratusError) as e:
        write_launch(kind, str(cfg_file), None, nodes=nodes, gpus_per_node=gpus, **extra)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "launch").exists() and not (tmp_path / "logs").exists()


def test_write_launch_refuses_a_missing_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StratusError, match="config file nope.toml not found"):
        write_launch("slurm", "nope.toml", None, nodes=4)
    assert list(tmp_path.iterdir()) == []


def test_write_launch_replaces_an_existing_file_only_with_force(tmp_path, cfg_file):
    out = tmp_path / "job.sbatch"
    write_launch("slurm", str(cfg_file), str(out), nodes=4)
    before = out.read_text()
    with pytest.raises(StratusError, match="exists: pass --force"):
        write_launch("slurm", str(cfg_file), str(out), nodes=8)
    assert out.read_text() == before
    write_launch("slurm", str(cfg_file), str(out), nodes=8, force=True)
    assert "#SBATCH --nodes=8" in out.read_text()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_write_launch_leaves_nothing_half_written(tmp_path, cfg_file, monkeypatch):
    out = tmp_path / "launch" / "job.yaml"

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)  # the one atomic-write helper
    with pytest.raises(OSError, match="disk full"):
        write_launch("k8s", str(cfg_file), str(out), nodes=4)
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary


@pytest.mark.skipif("parallel" not in Config.model_fields, reason="no [parallel] section yet")
@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("tp = 16", "parallel.tp (16) must divide --gpus-per-node (8)"),
        ("dp_replicate = 3", "does not divide the job's 32 ranks"),
        ("dp_replicate = 2\ndp_shard = 8", "but the job has 32"),
        ("tp = 8\n[model]\nn_heads = 4\nd_model = 64", "parallel.tp (8) must divide model.n_heads (4)"),
        ("dp_replicate = 4\ndp_shard = 8", None),
        ("tp = 4", None),
    ],
)
def test_write_launch_checks_the_parallel_layout_against_the_gpus(tmp_path, section, message):
    f = tmp_path / "p.toml"
    model = "" if "[model]" in section else "[model]\nd_model = 128\nn_heads = 8\n"
    f.write_text(f"{model}[parallel]\n{section}\n")
    out = tmp_path / "job.sbatch"
    if message is None:
        assert write_launch("slurm", str(f), str(out), nodes=NODES, gpus_per_node=GPUS).is_file()
        return
    with pytest.raises(StratusError) as e:
        write_launch("slurm", str(f), str(out), nodes=NODES, gpus_per_node=GPUS)
    assert message in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_shipped_configs_load_and_launch(config: Path, tmp_path: Path):
    """Every config in configs/ is valid, and the cluster ones fit a 8 x 8-GPU layout."""
    from stratus.config import load_config

    cfg = load_config(config)
    if cfg.train.device == "cuda":
        out = write_launch("slurm", str(config), str(tmp_path / "job.sbatch"), nodes=8, gpus_per_node=8)
        assert out.is_file()
