"""`stratus export`: consolidated safetensors weights + config.json + tokenizer.json, the
self-contained form for inference. Written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from stratus.checkpoint.load import EXPORT_FORMAT, load_trained
from stratus.errors import StratusError


def export(source: str | Path, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise StratusError(f"{out} already exists: use --force to replace it, or another --out")
    trained = load_trained(source)
    if not trained.tokenizer_path.is_file():
        raise StratusError(f"no tokenizer.json next to {trained.source}: the run directory is incomplete")
    model = trained.model
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        weights.pop("output.weight")  # safetensors stores no shared tensors; config says it is tied
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        info = {
            "format": EXPORT_FORMAT,
            "step": trained.step,
            "source": str(trained.source),
            "model": model.cfg.model_dump(),
        }
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.copyfile(trained.tokenizer_path, tmp / "tokenizer.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
