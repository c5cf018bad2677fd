"""Surviving faults with real processes and real files: SIGKILL at random steps (1 and 2
ranks), a crash in the middle of a save, corrupt and full-disk checkpoints, a stopped rank,
NaN and spike injection, crash loops, stragglers, goodput."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratus.checkpoint.manager import list_checkpoints, newest_verified
from stratus.checkpoint.manifest import verify
from stratus.errors import StratusError
from stratus.reliability.faults import Fault, parse_faults
from tests.conftest import ROOT, TINY_ARGS, curve, free_port, metrics, torchrun_script

TINY = [
    *TINY_ARGS,
    "--train.micro_batch=8",
    "--checkpoint.interval=2",
    "--checkpoint.keep=3",
    # a lost peer must fail fast, not after the default ten minutes
    "--parallel.timeout_s=30",
    "--reliability.hang_timeout_s=30",
]
STEPS = 12


def stratus(
    *args: str, faults: str = "", nproc: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRATUS_FAULTS": faults}
    if nproc > 1:  # under `stratus torchrun`, as `stratus launch` runs a job
        restarts = ("--max-restarts=10",)
        return torchrun_script(
            "-m",
            "stratus",
            *args,
            nproc=nproc,
            torchrun_args=restarts,
            env=env,
            timeout=timeout,
            launcher=("stratus", "torchrun"),
        )
    cmd = [sys.executable, "-m", "stratus", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", f"--data.path={data}", f"--run.dir={run}", *TINY, f"--train.steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory) -> dict[int, tuple]:
    run = tmp_path_factory.mktemp("ref") / "run"
    r = stratus(*train_args(tiny_data, run))
    assert r.returncode == 0, r.stderr[-3000:]
    return curve(run)


def test_fault_specs_parse_and_refuse_nonsense():
    assert parse_faults("kill@step=37:rank=1, hang@step=50,slow@rank=0:factor=2") == [
        Fault("kill", 37, 1),
        Fault("hang", 50, 0),
        Fault("slow", None, 0, 2.0),
    ]
    assert parse_faults("spike@step=3")[0].factor == 50.0
    for bad in ("explode@step=1", "kill", "kill@step=x", "nan@when=3"):
        with pytest.raises(StratusError):
            parse_faults(bad)


def test_sigkill_at_random_steps_one_rank_resumes_bit_identical(reference, tiny_data: Path, tmp_path: Path):
    steps = sorted(random.Random(7).sample(range(2, STEPS + 1), 5))
    faults = ",".join(f"kill@step={s}" for s in steps)
    run = tmp_path / "run"
    r = stratus(*train_args(tiny_data, run), "--max-restarts=10", faults=faults)
    assert r.returncode == 0, r.stderr[-3000:]
    assert curve(run) == reference  # every step's loss and grad norm, bit for bit
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 5 and all("SIGKILL" in x["failure"] for x in restarts)
    g = json.loads((run / "goodput.json").read_text())
    assert g["restarts"] == 5 and g["recomputed_s"] > 0 and g["startup_s"] > 0
    wall = g["last_update"] - g["first_start"]
    parts = sum(g[k] for k in ("productive_s", "recomputed_s", "checkpoint_s", "startup_s", "downtime_s"))
    assert 0.6 * wall < parts <= wall * 1.01  # the split accounts for the wall time


@pytest.mark.parametrize("layout", ["--parallel.dp_shard=2", "--parallel.pp=2"], ids=["fsdp", "pp"])
def test_sigkill_two_ranks_fsdp_resumes_bit_identical(
    layout, reference, tiny_data: Path, tmp_path: Path, request
):
    faults = "kill@step=3:rank=1,kill@step=6:rank=0,kill@step=9:rank=1"
    run = tmp_path / "run"
    r = stratus(*train_args(tiny_data, run, layout, "--train.micro_batch=4"), faults=faults, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = curve(run)
    assert sorted(two) == list(range(1, STEPS + 1))
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert [(r["first_rank"], r["failure"]) for r in restarts] == [
        (k, "killed by SIGKILL") for k in (1, 0, 1)
    ]
    # 2 ranks reduce in another order than 1 process: the same to fp32 rounding, and the
    # resumed run equals the uninterrupted 2-rank run bit for bit
    if layout == "--parallel.dp_shard=2":
        whole = request.getfixturevalue("two_rank_curve")  # the same run, shared with other tests
    else:
        r = stratus(*train_args(tiny_data, tmp_path / "whole", layout, "--train.micro_batch=4"), nproc=2)
        assert r.returncode == 0
        whole = curve(tmp_path / "whole")
    assert two == whole
    for step, (loss, _) in reference.items():
        assert two[step][0] == pytest.approx(loss, rel=1e-4)


def test_crash_during_async_save_is_never_taken_as_latest(reference, tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--checkpoint.async_save=true"),
        "--max-restarts=3",
        faults="crash_during_save@step=6",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["resume_step"] == 4  # the half-written step 6 was not used
    assert curve(run) == reference
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the debris was cleared by the re-save


def test_corrupted_newest_checkpoint_is_skipped_on_restart(reference, tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run), "--max-restarts=3", faults="corrupt_checkpoint@step=6,kill@step=8"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert restarts[0]["resume_step"] == 6  # `latest` says 6, but its checksum fails ...
    log = r.stdout + r.stderr  # found before the run's log file is opened: on the console
    assert "step-00000006 is unusable" in log and "does not match its sha256" in log
    assert "resumed from" in (run / "train.log").read_text()
    assert curve(run) == reference  # ... so step 4 was used and nothing was lost


def test_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(run / "checkpoints")],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        r = stratus(*train_args(tiny_data, run, "--train.steps=6", "--checkpoint.keep=5"))
        assert r.returncode == 0, r.stderr[-3000:]
        failed = [m for m in metrics(run) if "checkpoint_failed" in m]
        assert failed and "No space left on device" in failed[0]["checkpoint_failed"]
        assert "the previous checkpoint step-00000002 is kept" in failed[0]["checkpoint_failed"]
        good = newest_verified(run / "checkpoints")
        assert good is not None and good[0] == 2 and verify(good[1]) is None
        assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save was removed
        stop = stratus(
            *train_args(tiny_data, tmp_path / "run", "--train.steps=8", "--checkpoint.on_failure=stop")
        )
        assert stop.returncode == 3 and "No space left on device" in stop.stderr
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], check=False)


def _rank_pid(run: Path, rank: int, timeout: float = 60) -> int:
    """The pid of a torchrun worker of this run with this RANK, read from /proc."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            worker = b"torch.distributed.run" not in cmd and f"--run.dir={run}".encode() in cmd
            if worker and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError("worker not found")


def test_sigstop_one_rank_watchdog_fires_and_the_job_recovers(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = train_args(
        tiny_data,
        run,
        "--parallel.dp_shard=2",
        "--train.micro_batch=4",
        "--train.steps=16",
        "--reliability.hang_timeout_s=4",
        # the stop can land in a save, where the save's limit applies instead of the step's
        "--reliability.checkpoint_timeout_s=6",
        "--checkpoint.interval=5",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRATUS_FAULTS": ""}
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stratus",
            "torchrun",
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=3",
            "-m",
            "stratus",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 6:
            assert time.time() < deadline and job.poll() is None
            time.sleep(0.2)
        os.kill(_rank_pid(run, 1), signal.SIGSTOP)
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    dumps = list((run / "hangs").glob("rank0-*.txt"))
    assert dumps and "stacks of every thread" in dumps[0].read_text()
    assert "Thread" in dumps[0].read_text() or "File" in dumps[0].read_text()
    assert max(m["step"] for m in metrics(run)) == 16


def test_nan_step_is_skipped_everywhere_and_counted(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(*train_args(tiny_data, run, "--train.steps=6"), faults="nan@step=3")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run)}
    assert rows[3]["skipped"] == "nonfinite" and rows[3]["grad_norm"] is None
    assert rows[2]["skipped_nonfinite"] == 0 and rows[6]["skipped_nonfinite"] == 1
    assert all(m["loss"] == m["loss"] for s, m in rows.items() if s != 3)  # finite again after the skip


@pytest.mark.parametrize(
    "layout, rank", [("--parallel.dp_shard=2", 1), ("--parallel.pp=2", 0)], ids=["fsdp", "pp_first_stage"]
)
def test_nan_on_one_rank_is_skipped_on_every_rank(layout, rank, tiny_data: Path, tmp_path: Path):
    """A NaN on one rank alone: the other, whose own loss is finite, skips the same update (the
    mean loss and the global norm carry the NaN to it), and the ranks end in step. Under
    pipelining rank 0 is the first stage, which has no loss of its own to poison."""
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--train.steps=5", layout, "--train.micro_batch=4"),
        nproc=2,
        faults=f"nan@step=3:rank={rank}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run)}  # rank 0 writes the metrics
    assert rows[3]["skipped"] == "nonfinite" and rows[5]["skipped_nonfinite"] == 1
    assert all(m["loss"] == m["loss"] for s, m in rows.items() if s != 3)
    assert json.loads((run / "goodput.json").read_text())["restarts"] == 0  # no rank died and restarted


def test_damaged_shard_found_by_one_rank_stops_every_rank(tiny_data: Path, tmp_path: Path):
    """The second shard is rank 1's to checksum: rank 0 never hashes it, yet it stops with
    the same error line (the ranks agree), and no checkpoint is taken from the run."""
    import shutil

    from stratus.data.manifest import read_manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    second = data / read_manifest(data)["shards"][1]["file"]
    raw = bytearray(second.read_bytes())
    raw[5] ^= 0xFF
    second.write_bytes(bytes(raw))
    run = tmp_path / "run"
    args = train_args(data, run, "--train.steps=3", "--parallel.dp_shard=2", "--train.micro_batch=4")
    r = torchrun_script("-m", "stratus", *args)  # no torchrun restarts: one round, one verdict
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "stratus: error: shard" in line]
    assert len(errors) == 1 and second.name in errors[0] and "sha256" in errors[0], r.stderr[-3000:]
    assert list_checkpoints(run / "checkpoints") == []


def test_spike_rolls_back_and_skips_data(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--reliability.spike_min_steps=3", "--reliability.spike_skip_steps=4"),
        faults="spike@step=7",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    spike = next(m for m in metrics(run) if m.get("spike"))
    assert spike["rollback_from"] == 7 and spike["rollback_to"] == 6
    assert spike["data_skipped_to"] == (7 + 4) * 8  # past the spike batch and 4 more global batches
    assert max(m["step"] for m in metrics(run)) == STEPS

    stop = stratus(
        *train_args(
            tiny_data, tmp_path / "unstable", "--reliability.spike_min_steps=3", "--reliability.max_spikes=2"
        ),
        faults="spike@step=5,spike@step=8",
    )
    assert stop.returncode == 3 and "loss spike 2 of reliability.max_spikes = 2" in stop.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_no_host_read_inside_a_step_and_reads_only_when_due(tiny_data: Path, tmp_path: Path, nproc: int):
    """The step (forward, backward, clip, all-reduce of the loss, update) reads no value to
    the host, on one process and on 2 FSDP ranks; the loop reads on logged steps and before
    each save only (log every 4, save every 6 and at the end: steps 4, 6, 8, 12)."""
    run, out = tmp_path / "run", tmp_path / "reads"
    args = train_args(tiny_data, run, "--log.interval=4", "--checkpoint.interval=6")
    if nproc == 2:
        args += ["--parallel.dp_shard=2", "--train.micro_batch=4"]
        r = torchrun_script(ROOT / "tests" / "sync_peer.py", str(out), *args)
    else:
        cmd = [sys.executable, str(ROOT / "tests" / "sync_peer.py"), str(out), *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(nproc):
        found = json.loads((out / f"rank-{rank}.json").read_text())
        assert found["in_step"] == [], found["in_step"][:3]
        assert found["read_at"] == [4, 6, 8, 12]
        assert "tolist" in found["outside"]  # the instrument sees the loop's own reads
    assert [m["step"] for m in metrics(run) if "grad_norm" in m] == [4, 8, 12]


def test_nan_and_spike_between_logged_steps_are_judged_at_the_next_read(tiny_data: Path, tmp_path: Path):
    """Log every 4 steps, save every 4: a NaN at step 2 was skipped on the device and gets its
    own line at the read of step 4; a spike at step 6, read at step 8, rolls back to the save
    of step 4 (from before the spike) and skips the data from step 6's batch on, as a
    spike read at once would."""
    run = tmp_path / "run"
    extra = ("--log.interval=4", "--checkpoint.interval=4", "--reliability.spike_min_steps=2")
    r = stratus(
        *train_args(tiny_data, run, *extra, "--reliability.spike_skip_steps=4"),
        faults="nan@step=2,spike@step=6",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = metrics(run)
    skipped = next(m for m in lines if m.get("skipped"))
    assert skipped["step"] == 2 and skipped["grad_norm"] is None and skipped["skipped_nonfinite"] == 1
    spike = next(m for m in lines if m.get("spike"))
    assert spike["rollback_from"] == 6 and spike["rollback_to"] == 4
    assert spike["data_skipped_to"] == (6 + 4) * 8  # past the spike batch and 4 more global batches
    assert max(m["step"] for m in lines) == STEPS
    assert all(m["loss"] == m["loss"] for m in lines if m["step"] != 2)


def test_crash_loop_stops_with_a_diagnosis(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(*train_args(tiny_data, run), "--max-restarts=10", faults="kill@step=5:times=10")
    assert r.returncode == 3
    assert "crash loop" in r.stderr and "step 4" in r.stderr
    assert len((run / "restarts.jsonl").read_text().splitlines()) == 3


def test_hang_is_caught_by_the_watchdog_and_restarted(reference, tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--reliability.hang_timeout_s=3"),
        "--max-restarts=2",
        faults="hang@step=5",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hang (watchdog)" in (run / "restarts.jsonl").read_text()
    assert "stacks of every thread" in next((run / "hangs").glob("rank0-*.txt")).read_text()
    assert curve(run) == reference


def test_a_rank_on_a_crowded_core_is_named_a_straggler(tiny_data: Path, tmp_path: Path):
    """Really slow: once training runs, rank 1 shares its core with five busy processes and
    rank 0 has the other core (with whatever else the machine runs). Nothing is injected
    into the code that measures."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two CPU cores: one for each rank")
    fast, crowded = cores[0], cores[1]
    run = tmp_path / "run"
    args = train_args(
        tiny_data,
        run,
        "--parallel.dp_shard=2",
        # compute-bound steps (a few tens of ms), so the crowded core shows in the compute
        "--model.d_model=256",
        "--model.n_heads=4",
        "--model.n_kv_heads=4",
        "--train.micro_batch=4",
        "--train.steps=16",
        "--checkpoint.interval=100",
        "--log.interval=2",
        "--reliability.straggler_interval=4",
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "STRATUS_FAULTS": "",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }

    def pinned(core: int):
        return lambda: os.sched_setaffinity(0, {core})

    logs = [open(tmp_path / f"rank{r}.err", "w") for r in (0, 1)]  # noqa: SIM115
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "stratus", *args],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            preexec_fn=pinned(core),
            stdout=subprocess.DEVNULL,
            stderr=logs[r],
        )
        for r, core in ((0, fast), (1, crowded))
    ]
    busy = []
    try:
        # the crowd arrives once training runs, so start-up is not slowed
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() or not metrics(run):
            assert time.time() < deadline and all(p.poll() is None for p in ranks)
            time.sleep(0.1)
        busy = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pinned(crowded))
            for _ in range(5)
        ]
        for p in ranks:
            p.wait(timeout=600)
    finally:
        for b in busy:
            b.kill()
            b.wait()
        for p in ranks:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    errors = "".join((tmp_path / f"rank{r}.err").read_text()[-3000:] for r in (0, 1))
    assert [p.returncode for p in ranks] == [0, 0], errors
    checks = [m for m in metrics(run) if "compute_s" in m]
    assert [m["step"] for m in checks] == [4, 8, 12, 16]
    for m in checks[1:]:  # the windows after the crowd arrived
        assert m["compute_s"][1] > 1.5 * m["compute_s"][0], m
        assert [s["rank"] for s in m.get("stragglers", [])] == [1], m
    assert "straggler: rank 1" in (run / "train.log").read_text()


def test_outliers_use_the_ratio_for_few_ranks_and_the_z_score_for_many():
    from stratus.reliability.stragglers import outliers

    assert [r for r, _, _ in outliers([1.0, 4.0], 0.1, 3.0)] == [1]
    assert outliers([1.0, 1.05], 0.1, 3.0) == []
    # 8 ranks: one 30% slower stands out; spread-out times 15% apart do not
    assert [r for r, _, _ in outliers([1.0, 1.01, 0.99, 1.0, 1.3, 1.02, 0.98, 1.0], 0.1, 3.0)] == [4]
    assert outliers([1.0, 1.15, 0.9, 1.2, 0.85, 1.1, 0.95, 1.05], 0.1, 3.0) == []


def test_retention_never_deletes_the_last_verified(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(*train_args(tiny_data, run, "--checkpoint.keep=1", "--train.steps=6"))
    assert r.returncode == 0
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6]


# the watchdog's limits, short: a step of the tiny model takes milliseconds
SHORT_LIMITS = ("--checkpoint.interval=2", "--reliability.hang_timeout_s=3")


def test_hang_during_save_is_caught_and_the_job_recovers(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--train.steps=6", *SHORT_LIMITS),
        "--reliability.checkpoint_timeout_s=6",
        "--max-restarts=2",
        faults="hang_during_save@step=4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hang (watchdog)" in (run / "restarts.jsonl").read_text()
    dump = next((run / "hangs").glob("rank0-*.txt")).read_text()
    assert "limit 6s" in dump and "_hang" in dump  # caught at the save's limit, inside the save
    assert max(m["step"] for m in metrics(run)) == 6


def test_slow_but_progressing_save_is_not_killed(tiny_data: Path, tmp_path: Path):
    """Every file of the save takes 2 s more: the save takes longer than its 5 s limit, but
    it never goes 5 s without progress."""
    run = tmp_path / "run"
    r = stratus(
        *train_args(tiny_data, run, "--train.steps=2", *SHORT_LIMITS),
        "--reliability.checkpoint_timeout_s=5",
        faults="slow_save@factor=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "goodput.json").read_text())["checkpoint_s"] > 5  # longer than its limit
    assert not (run / "hangs").exists() or not list((run / "hangs").glob("rank*.txt"))
