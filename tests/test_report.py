"""`stratus report`: real runs (one under the supervisor with a kill, a NaN and a crash in a
save; one without faults) rendered to HTML and PNG, looked at in headless Chromium; gaps in
a run's files named; a missing run refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from stratus.report.run import read_run
from stratus.report.timeline import build_timeline
from tests.browser import chromium  # noqa: F401  (a fixture)
from tests.conftest import TINY_ARGS, run_cli

FAULTS = "kill@step=6,nan@step=9,crash_during_save@step=12,spike@step=14"
PANELS = [
    "Loss",
    "Loss against tokens",
    "Learning rate and gradient norm",
    "Throughput, MFU and memory",
    "Timeline",
]


def _train(run: Path, data: Path, *extra: str):
    r = run_cli(
        "train",
        *TINY_ARGS,
        f"--data.path={data}",
        f"--run.dir={run}",
        "--train.steps=16",
        "--checkpoint.interval=4",
        "--reliability.hang_timeout_s=20",
        *extra,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("report")
    faulty = _train(
        base / "faulty",
        tiny_data,
        "--max-restarts=3",
        "--reliability.spike_min_steps=3",
        f"--reliability.faults={FAULTS}",
    )
    clean = _train(base / "clean", tiny_data, "--eval.interval=4")
    return faulty, clean


def _ink(image: np.ndarray) -> float:
    """Share of pixels that are not (near) white."""
    rgb = image[..., :3].astype(float)
    rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
    return float((rgb.min(axis=-1) < 0.9).mean())


def test_timeline_places_starts_restarts_and_recomputed_steps(runs):
    faulty, _ = runs
    run = read_run(faulty)
    tl = build_timeline(run)
    assert run.gaps == []
    # three processes: the first, and one after each of the two failures
    assert len([s for s in tl.segments if s.category == "start-up"]) == 3
    restarts = [m for m in tl.markers if m.kind == "restart"]
    assert [m.label.split(":")[0] for m in restarts] == ["restart 1", "restart 2"]
    assert "killed by SIGKILL, resumed from step 4" in restarts[0].label
    faults = sorted(m.label.split(" (")[0] for m in tl.markers if m.kind == "fault")
    assert faults == ["crash_during_save at step 12", "kill at step 6", "nan at step 9", "spike at step 14"]
    rollback = next(m for m in tl.markers if m.kind == "rollback")
    assert rollback.label == "spike rollback at step 14 to step 12"
    # a fault comes before the restart it caused, and the next start-up after that
    kill = next(m for m in tl.markers if m.label.startswith("kill"))
    second_startup = sorted(s.start for s in tl.segments if s.category == "start-up")[1]
    assert kill.time <= restarts[0].time <= second_startup + 0.5
    # steps 5-6 (after the kill) and 9-12 (after the crash) were done twice
    assert tl.total("recomputed") > 0 and tl.total("productive") > 0
    assert any(m.kind == "skipped_nonfinite" and m.step == 9 for m in tl.markers)
    # the drawing spans the run's wall time
    end = max(s.end for s in tl.segments)
    wall = run.goodput["last_update"] - run.goodput["first_start"]
    assert abs(end - wall) < 2.0, (end, wall)
    # the curve is the trajectory as it stands: each step once
    steps, _ = run.series("loss")
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_report_of_two_runs_renders_in_chromium(runs, tmp_path: Path, chromium):  # noqa: F811
    faulty, clean = runs
    out = tmp_path / "r" / "report.html"
    r = run_cli("report", str(faulty), str(clean), "--out", str(out), "--label", "faults", "--label", "clean")
    assert r.returncode == 0, r.stderr
    assert f"report: {out}" in r.stdout and out.with_suffix(".png").is_file()
    page = out.read_text()
    # self-contained: nothing to fetch, no script
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)

    dom = chromium.dom(out)
    titles = re.findall(r"<h2>(.*?)</h2>", dom)
    assert titles[: len(PANELS)] == PANELS and "Config" in titles
    assert dom.count("<svg") >= len(PANELS)
    for label in (
        "restart 1: killed by SIGKILL",
        "kill at step 6",
        "crash_during_save at step 12",
        "skipped (non-finite) at step 9",
        "spike rollback at step 14 to step 12",
    ):
        assert label in dom, label
    assert re.search(r"<td>faults</td><td>16</td>", dom) and re.search(r"<td>clean</td><td>16</td>", dom)

    shot = chromium.screenshot(out, tmp_path / "shot.png", 1280, 3000)
    image = plt.imread(shot)
    assert image.shape[:2] == (3000, 1280)
    assert _ink(image) > 0.03, "the screenshot is blank"
    # the panels are drawn where they stand: each of the top screen's third has ink
    thirds = np.array_split(image[:2400], 3)
    assert all(_ink(t) > 0.01 for t in thirds)

    png = plt.imread(out.with_suffix(".png"))
    assert png.shape[0] > 500 and png.shape[1] > 1000 and _ink(png) > 0.03


def test_report_names_the_gaps_of_a_run_killed_mid_line(runs, tmp_path: Path):
    _, clean = runs
    run = tmp_path / "cut"
    shutil.copytree(clean, run, ignore=shutil.ignore_patterns("checkpoints"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (run / "goodput.json").unlink()
    r = run_cli("report", str(run))
    assert r.returncode == 0, r.stderr
    cut = f"metrics.jsonl: line {len(lines)} of {len(lines)} is cut off (the run was killed while writing it)"
    assert cut in r.stdout
    assert "goodput.json is missing" in r.stdout
    page = (run / "report.html").read_text()
    assert cut in page
    # what exists is shown: the lines before the cut one
    assert read_run(run).series("loss")[0][-1] == len(lines) - 1


def test_report_refuses_a_missing_run_and_a_bad_out(tmp_path: Path):
    r = run_cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("report", str(tmp_path / "empty"))
    assert r.returncode == 2 and "is not a run directory" in r.stderr
    r = run_cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "report.txt"))
    assert r.returncode == 2 and ".html" in r.stderr
    assert not (tmp_path / "report.txt").exists()
