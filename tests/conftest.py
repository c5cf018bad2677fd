"""Shared fixtures: a small generated corpus, its prepared data, tiny configs, the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stratus.config import Config, load_config
from stratus.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "index"]


def write_corpus(directory: Path, n_docs: int = 24) -> Path:
    """Deterministic Python-like documents: small, repetitive, learnable."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for j in range(12):
            a, b = WORDS[(i + j) % 8], WORDS[(i * 3 + j) % 8]
            lines.append(f"def {a}_{j}({b}):\n    return {b} + {i * j}\n\n")
        (directory / f"doc_{i:02d}.py").write_text("".join(lines), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    out = base / "data"
    prepare([str(write_corpus(base / "corpus"))], out, vocab_size=320, val_fraction=0.15, say=lambda s: None)
    return out


TINY = {
    "model.n_layers": 2,
    "model.d_model": 32,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.max_seq_len": 64,
    "data.seq_len": 32,
    "train.micro_batch": 4,
    "train.steps": 8,
    "train.warmup_steps": 2,
    "train.lr": 3e-3,
    "train.min_lr": 3e-4,
    "train.deterministic": True,
    "log.interval": 1,
    "log.tensorboard": False,
    "log.progress": "plain",
    "eval.interval": 0,
    "checkpoint.interval": 4,
    "checkpoint.keep": 10,
}


# The same tiny model as TINY, as CLI flags for tests that run real processes (torchrun).
TINY_ARGS = [
    "--model.n_layers=2",
    "--model.d_model=32",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.max_seq_len=64",
    "--data.seq_len=32",
    "--train.lr=3e-3",
    "--train.warmup_steps=1",
    "--train.global_batch=8",
    "--log.interval=1",
    "--log.tensorboard=false",
    "--eval.interval=0",
    "--train.deterministic=true",
]


@pytest.fixture
def tiny_config(tiny_data: Path, tmp_path: Path):
    """A factory: tiny_config(**overrides) with dotted keys written as section__key."""

    def make(run: str = "run", **overrides) -> Config:
        values = dict(TINY, **{"data.path": str(tiny_data), "run.dir": str(tmp_path / run)})
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, values)

    return make


def metrics(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl, parsed."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> dict[int, tuple]:
    """Step -> (loss, grad_norm), the last line for each step (a restart redoes some steps)."""
    return {r["step"]: (r["loss"], r.get("grad_norm")) for r in metrics(run) if "grad_norm" in r}


@pytest.fixture(scope="session")
def two_rank_curve(tiny_data: Path, tmp_path_factory) -> dict[int, tuple]:
    """The curve of a fault-free run of the tiny model on two FSDP ranks, 12 steps of 8
    sequences, 4 a rank: what the restart tests on two ranks (one node, or one rank on each of
    two) must reproduce bit for bit. Checkpoint settings do not change a curve."""
    run = tmp_path_factory.mktemp("two-rank") / "run"
    args = [*TINY_ARGS, "--train.micro_batch=4", "--train.steps=12", "--parallel.dp_shard=2"]
    r = torchrun_script("-m", "stratus", "train", f"--data.path={tiny_data}", f"--run.dir={run}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return curve(run)


def torchrun_script(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    torchrun_args: tuple[str, ...] = (),
    env: dict | None = None,
    timeout: float = 300,
    launcher: tuple[str, ...] = ("torch.distributed.run",),
) -> subprocess.CompletedProcess:
    """A Python script (or "-m", "module") on `nproc` real local ranks under torchrun (gloo),
    one thread each, with no restarts unless torchrun_args ask for them. launcher ("stratus",
    "torchrun") runs them under stratus's restart policy instead."""
    cmd = [
        sys.executable,
        "-m",
        *launcher,
        "--standalone",
        f"--nproc-per-node={nproc}",
        *torchrun_args,
        str(script),
        *args,
    ]
    env = env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> int:
    """A port of 127.0.0.1 free a moment ago, for a process that must be told its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """The real `stratus` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "stratus", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
