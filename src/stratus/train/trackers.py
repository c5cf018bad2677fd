"""Experiment trackers (`log.trackers = ["wandb"]` or `["mlflow"]`): the numbers of
metrics.jsonl and the resolved config, through each tracker's own client. Nothing leaves the
machine unasked: wandb runs offline (files under RUN/wandb; `wandb sync` uploads them) and
mlflow writes a file store under RUN/mlruns, unless WANDB_MODE or MLFLOW_TRACKING_URI say
otherwise. Both packages are optional (`pip install 'stratus[trackers]'`)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from stratus.errors import StratusError

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """On every rank before any collective, so a missing package stops all of them alike."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise StratusError(
                f"log.trackers names {name}, but the {name} package is not installed: "
                f"pip install {name} (or 'stratus[trackers]'), or remove it from log.trackers"
            )


def open_trackers(names: list[str], run_dir: Path) -> list:
    config = _resolved_config(run_dir)
    return [{"wandb": WandbSink, "mlflow": MlflowSink}[name](run_dir, config) for name in names]


def _resolved_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.toml (written before training starts), as the tracker's parameters."""
    from stratus.config import tomllib

    try:
        return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _run_id(run_dir: Path, tracker: str) -> str:
    """One tracker run per stratus run: a restarted process resumes the same one."""
    path = run_dir / f".{tracker}-run-id"
    if path.is_file():
        return path.read_text().strip()
    run_id = os.urandom(8).hex()
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "stratus"),
            name=run_dir.resolve().name,
            id=_run_id(run_dir, "wandb"),
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def write(self, step: int, numbers: dict[str, float]) -> None:
        self._run.log(numbers, step=step)

    def event(self, kind: str, step: int, record: dict) -> None:
        if kind in ("start", "end"):
            return
        # markers as counters at their step: a tracker's chart shows where they happened
        self._run.log({f"event/{kind}": 1}, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import mlflow

        self._mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A file store needs nothing but the client (mlflow-skinny has no database driver);
            # mlflow 3 keeps it working in maintenance mode when asked to.
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "stratus"))
        id_path = run_dir / ".mlflow-run-id"
        resumed = id_path.is_file()
        run = mlflow.start_run(run_id=id_path.read_text().strip() if resumed else None)
        if not resumed:
            id_path.write_text(run.info.run_id + "\n")
            mlflow.log_params(
                {
                    f"{section}.{key}": json.dumps(value) if isinstance(value, list) else value
                    for section, keys in config.items()
                    for key, value in keys.items()
                }
            )

    def write(self, step: int, numbers: dict[str, float]) -> None:
        self._mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in numbers.items()}, step=step)

    def event(self, kind: str, step: int, record: dict) -> None:
        if kind not in ("start", "end"):
            self._mlflow.log_metric(f"event_{kind}", 1.0, step=step)

    def close(self) -> None:
        self._mlflow.end_run()
