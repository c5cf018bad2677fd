"""`stratus plan --from-run RUN`: a real 2-rank run, read back and planned on its own host and
layout; and the run directories it must refuse with one line."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from stratus.plan.catalog import load_catalog
from stratus.plan.efficiency import DEFAULT
from tests.conftest import TINY_ARGS, run_cli, torchrun_script


@pytest.fixture(scope="module")
def fsdp_run(tiny_data, tmp_path_factory):
    """Two gloo ranks (FSDP over 2, one thread each, as torchrun sets) for 6 logged steps."""
    run = tmp_path_factory.mktemp("from-run") / "fsdp2"
    args = [
        *TINY_ARGS,
        f"--data.path={tiny_data}",
        f"--run.dir={run}",
        "--train.steps=6",
        "--train.micro_batch=4",
    ]
    r = torchrun_script("-m", "stratus", "train", *args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def _plan(*args: str):
    return run_cli("plan", *args)


def test_from_run_reads_what_the_run_measured_and_plans_its_layout_on_its_host(fsdp_run):
    r = _plan("--from-run", str(fsdp_run), "--json", "--explain")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    start = [json.loads(x) for x in (fsdp_run / "timeline.jsonl").read_text().splitlines()]
    facts = [e for e in start if e["event"] == "start"][-1]
    rows = [json.loads(x) for x in (fsdp_run / "metrics.jsonl").read_text().splitlines()]
    # measured: the median step of the logged windows after the first, and the largest rank's peak
    tokens = facts["global_batch"] * facts["seq_len"]
    assert out["measured"]["step_time_s"] == pytest.approx(
        statistics.median(tokens / r["tokens_per_s"] for r in rows[1:]), rel=1e-3
    )
    peak_gib = max(r["memory_gb"] for r in rows) * 1e9 / 2**30  # logged in GB
    assert out["measured"]["memory_gib"] == pytest.approx(peak_gib, rel=1e-3)
    assert out["windows"] == len(rows) - 1 == 5
    # planned on the run's layout and host: 2 ranks of one thread on the CI's 2-core entry
    host = load_catalog().cpu("ci-2core")
    assert out["world_size"] == 2 and out["layout"] == facts["layout"]
    assert out["planned_on"].endswith(": 1 core a rank")
    assert out["breakdown"]["dp_comm"] > 0  # FSDP's gathers over gloo, charged
    # the process's RSS baseline takes the CUDA context's place; the allocator's share stays
    mem = out["memory"]
    dynamic = mem["total"] - mem["allowance"]
    assert mem["allowance"] == pytest.approx(host.rss_baseline_gb + DEFAULT.fragmentation * dynamic, abs=2e-3)
    for key in ("step_time", "memory"):
        assert out["error"][key] == pytest.approx(
            out["predicted"][f"{key}_s" if key == "step_time" else "memory_gib"]
            / out["measured"][f"{key}_s" if key == "step_time" else "memory_gib"]
            - 1,
            abs=2e-3,
        )
    # --explain: the terms the host replaced are marked as measured on it, the rest are not
    explained = {row["term"]: row for row in out["explain"]}
    assert explained["kernel_gap_us"]["value"] == pytest.approx(host.kernel_us)  # a core a rank
    assert "this host" in explained["kernel_gap_us"]["what"]
    assert "this host" in explained["attention_fraction"]["what"]  # measured: SDPA on the host
    assert "this host" not in explained["cross_entropy_bytes"]["what"]
    # the human table says the same
    human = _plan("--from-run", str(fsdp_run))
    assert human.returncode == 0, human.stderr
    assert "predicted" in human.stdout and "measured" in human.stdout and "dp_comm" in human.stdout


def test_from_run_survives_a_last_line_cut_by_a_kill(fsdp_run, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(fsdp_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')
    r = _plan("--from-run", str(run), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["windows"] == 5


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such run directory"),
        ("no-timeline", "timeline.jsonl not found"),
        ("one-window", "needs at least two"),
        ("damaged", "is not JSON"),
        ("with-tp", "leave out --tp"),
        ("bf16", "computed in bfloat16"),
    ],
)
def test_from_run_refuses_what_it_cannot_compare_with_one_line(fsdp_run, tmp_path, case, expected):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    extra: list[str] = []
    metrics = run / "metrics.jsonl"
    if case == "missing":
        run = tmp_path / "nowhere"
    elif case == "no-timeline":
        (run / "timeline.jsonl").unlink()
    elif case == "one-window":
        metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    elif case == "damaged":
        metrics.write_text("garbage\n" + metrics.read_text())
    elif case == "with-tp":
        extra = ["--tp", "2"]
    elif case == "bf16":
        timeline = run / "timeline.jsonl"
        timeline.write_text(timeline.read_text().replace('"dtype": "float32"', '"dtype": "bfloat16"'))
    before = sorted(p.name for p in run.iterdir()) if run.exists() else []
    r = _plan("--from-run", str(run), *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stratus: error:") and expected in lines[0], r.stderr
    assert (sorted(p.name for p in run.iterdir()) if run.exists() else []) == before  # nothing written


def test_cpu_without_from_run_is_refused():
    r = _plan("--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "8", "--cpu", "ci-2core")
    assert r.returncode == 2 and "use it with --from-run" in r.stderr
