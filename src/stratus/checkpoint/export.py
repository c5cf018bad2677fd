"""`stratus export`: consolidated safetensors weights + config.json + tokenizer.json, the
self-contained form for inference. Written under a temporary name, then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from stratus.atomic import atomic_directory, refuse_existing
from stratus.checkpoint.load import EXPORT_FORMAT, load_trained
from stratus.data.chat_template import CONFIG_FILE
from stratus.errors import StratusError


def export(source: str | Path, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    refuse_existing(out, force)
    trained = load_trained(source)
    if not trained.tokenizer_path.is_file():
        raise StratusError(f"no tokenizer.json next to {trained.source}: the run directory is incomplete")
    model = trained.model
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        weights.pop("output.weight")  # safetensors stores no shared tensors; config says it is tied
    with atomic_directory(out) as tmp:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        info = {
            "format": EXPORT_FORMAT,
            "step": trained.step,
            "source": str(trained.source),
            "model": model.cfg.model_dump(),
        }
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.copyfile(trained.tokenizer_path, tmp / "tokenizer.json")
        template = trained.tokenizer_path.parent / CONFIG_FILE
        if template.is_file():  # the chat contract travels with the tokenizer
            shutil.copyfile(template, tmp / CONFIG_FILE)
    return out
