"""Open a trained model for inference or export from a run directory, a checkpoint
directory, or an exported directory, whichever the user points at."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from stratus.checkpoint import manifest as mf
from stratus.checkpoint.manager import load_model_weights, newest_verified
from stratus.config import ModelConfig
from stratus.errors import StratusError
from stratus.model import Transformer

log = logging.getLogger("stratus.checkpoint")
EXPORT_FORMAT = "stratus-export/1"


@dataclass
class Trained:
    model: Transformer
    tokenizer_path: Path
    step: int
    source: Path  # the checkpoint or export directory the weights came from
    run_dir: Path | None


def locate(path: str | Path) -> tuple[str, Path]:
    """('export' | 'checkpoint', directory) for what the user gave."""
    p = Path(path)
    if not p.exists():
        raise StratusError(f"{p} not found: give a run directory, a checkpoint directory or an export")
    if (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        return "export", p
    if (p / mf.NAME).is_file():
        problem = mf.verify(p)
        if problem:
            raise StratusError(f"checkpoint {p} is damaged ({problem}): use another one")
        return "checkpoint", p
    if (p / "checkpoints").is_dir():
        found = newest_verified(p / "checkpoints")
        if found is None:
            raise StratusError(f"run {p} has no verified checkpoint yet: train it first")
        return "checkpoint", found[1]
    raise StratusError(f"{p} is not a run, a checkpoint or an export of stratus")


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    kind, where = locate(path)
    if kind == "export":
        info = json.loads((where / "config.json").read_text())
        model = Transformer(ModelConfig.model_validate(info["model"]))
        weights = load_file(where / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not (k == "output.weight" and model.cfg.tie_embeddings)]:
            raise StratusError(
                f"{where}/model.safetensors does not fit its config.json: prepare a new export"
            )
        return Trained(model.to(device).eval(), where / "tokenizer.json", int(info["step"]), where, None)
    manifest = mf.read_manifest(where)
    model = Transformer(ModelConfig.model_validate(manifest["model"]))
    load_model_weights(where, model)
    run_dir = where.parent.parent
    return Trained(model.to(device).eval(), run_dir / "tokenizer.json", int(manifest["step"]), where, run_dir)
