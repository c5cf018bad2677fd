"""The GPU benchmarks at a tiny shape on the CPU: benchmarks/gpu.py (workers under torchrun,
the dry run's prediction beside each row) and benchmarks/serve.py (the server under load,
transformers beside it). Their own code paths run in the suite, so they work the day a GPU
is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _smoke(script: str, out: Path, *args: str):
    """The benchmark's --smoke run; what it wrote to its --json file."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_benchmark_smoke(tmp_path):
    rows = _smoke("gpu.py", tmp_path / "rows.json")
    assert [row["gpus"] for row in rows] == [1, 2]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["predicted_gib"] > 0
        assert row["mfu"] is None and row["peak_gib"] is None  # no peak FLOP/s or allocator on the CPU


def test_serve_benchmark_smoke(tmp_path, tiny_data):
    """benchmarks/serve.py --smoke: the server under load and transformers beside it, on a
    tiny random model on the CPU; `--device cuda` is the same code on a GPU."""
    rows = _smoke(
        "serve.py",
        tmp_path / "serve.json",
        "--device",
        "cpu",
        "--tokenizer",
        str(tiny_data / "tokenizer.json"),
    )
    assert set(rows) == {
        "stratus serve, concurrency 1",
        "stratus serve, concurrency 4",
        "transformers generate, batch 1",
        "transformers generate, batch 8",
    }
    for row in rows.values():
        assert row["output_tps"] > 0 and row["ttft_ms"] > 0
