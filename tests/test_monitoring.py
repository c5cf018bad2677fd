"""Monitoring for operators: a running training job scraped over HTTP on
log.prometheus_port; the shipped Grafana dashboards query only metrics that the code really
exports; experiment trackers write their own files offline."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, TINY_ARGS, free_port, run_cli
from tests.serving import LiveServer, make_export

DASHBOARDS = ROOT / "deploy" / "grafana"


def exported_names(exposition: str) -> set[str]:
    """The series names a Prometheus scrape can return, from the # TYPE lines: a histogram x
    is x_bucket, x_sum and x_count; a counter is x_total (written so in its TYPE line),
    with no sample until a labelled child is used."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.M):
        if kind == "histogram":
            names.update(family + s for s in ("_bucket", "_sum", "_count"))
        elif kind == "counter" and not family.endswith("_total"):
            names.add(family + "_total")
        else:
            names.add(family)
    return names


def queried_names(dashboard: Path) -> set[str]:
    d = json.loads(dashboard.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    assert exprs and all(exprs), f"{dashboard.name}: a panel without a query"
    return {n for e in exprs for n in re.findall(r"\b(stratus_[a-z0-9_]+)\b", e)}


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def _value(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else None


def test_training_job_is_scraped_and_the_train_dashboard_matches(tiny_data: Path, tmp_path: Path):
    port = free_port()
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "stratus",
        "train",
        *TINY_ARGS,
        f"--data.path={tiny_data}",
        f"--run.dir={run}",
        "--train.steps=5000",  # far more than the test waits for: it is stopped below
        "--checkpoint.interval=3",
        f"--log.prometheus_port={port}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, text = time.monotonic() + 240, None  # generous: a busy machine
        while time.monotonic() < deadline and proc.poll() is None:
            text = _scrape(f"http://127.0.0.1:{port}/metrics")
            age = _value(text or "", "stratus_train_last_checkpoint_age_seconds")
            if (
                text
                and (_value(text, "stratus_train_step") or 0) >= 6
                and age is not None
                and math.isfinite(age)
            ):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no scrape with step >= 6 and a checkpoint: {proc.poll()} {text and text[-800:]}")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    step = _value(text, "stratus_train_step")
    loss = _value(text, "stratus_train_loss")
    # the gauges are the numbers the run wrote: the scraped loss is a line of metrics.jsonl
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any(r["step"] == step and r["loss"] == pytest.approx(loss) for r in lines), (step, loss)
    assert 0 < _value(text, "stratus_train_ettr") <= 1
    assert _value(text, "stratus_train_tokens_per_second") > 0
    assert _value(text, "stratus_train_restarts") == 0
    assert 0 <= _value(text, "stratus_train_last_checkpoint_age_seconds") < 240
    assert math.isnan(_value(text, "stratus_train_mfu"))  # a CPU has no known peak: unknown, not 0
    missing = queried_names(DASHBOARDS / "stratus-train.json") - exported_names(text)
    assert not missing, f"the training dashboard queries metrics that are not exported: {missing}"


@pytest.fixture(scope="module")
def export(tiny_data: Path, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("mon") / "tiny", tiny_data / "tokenizer.json")


def test_serve_dashboard_queries_what_the_server_exports(export: Path):
    server = LiveServer(export)
    try:
        r = httpx.post(
            f"{server.url}/v1/completions", json={"model": server.model, "prompt": "def ", "max_tokens": 3}
        )
        assert r.status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    names = exported_names(text)
    assert "stratus_time_to_first_token_seconds_bucket" in names  # the parsing itself works
    missing = queried_names(DASHBOARDS / "stratus-serve.json") - names
    assert not missing, f"the serving dashboard queries metrics that are not exported: {missing}"


def _tracker_run(tiny_data: Path, run: Path, tracker: str, env: dict | None = None):
    return run_cli(
        "train",
        *TINY_ARGS,
        f"--data.path={tiny_data}",
        f"--run.dir={run}",
        "--train.steps=4",
        f'--log.trackers=["{tracker}"]',
        env={"WANDB_MODE": "offline", **(env or {})},
        timeout=300,
    )


def test_wandb_offline_writes_its_run_files(tiny_data: Path, tmp_path: Path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'stratus[trackers]')")
    r = _tracker_run(tiny_data, tmp_path / "run", "wandb")
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((tmp_path / "run").rglob("*"))[:30]
    blob = files[0].read_bytes()
    assert b"tokens_per_s" in blob and b"grad_norm" in blob  # the metrics went in


def test_mlflow_writes_metrics_and_params_to_a_local_store(tiny_data: Path, tmp_path: Path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'stratus[trackers]')")
    r = _tracker_run(tiny_data, tmp_path / "run", "mlflow", env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    (loss,) = (tmp_path / "run" / "mlruns").glob("*/*/metrics/loss")
    assert len(loss.read_text().splitlines()) == 4  # one per logged step
    assert (loss.parent.parent / "params" / "train.steps").read_text() == "4"


def test_a_tracker_that_is_not_installed_is_one_clear_error(tiny_data: Path, tmp_path: Path):
    # the package made unimportable for this one process, as on a machine without it
    code = (
        "import sys; sys.modules['wandb'] = None; from stratus.cli import main; "
        f"sys.exit(main(['train', *{TINY_ARGS!r}, '--data.path={tiny_data}', '--run.dir={tmp_path / 'run'}', "
        "'--log.trackers=[\"wandb\"]']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install wandb" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
