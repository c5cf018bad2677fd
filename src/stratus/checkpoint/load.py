"""Open a trained model for inference or export from a run directory, a checkpoint
directory, or an exported directory (`stratus export`, either format), whichever the user
points at."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from stratus.checkpoint import manifest as mf
from stratus.checkpoint.hf_format import model_config_from_hf, one_line, stratus_weights
from stratus.checkpoint.manager import load_model_weights, newest_verified
from stratus.config import ModelConfig
from stratus.errors import StratusError
from stratus.model import Transformer

log = logging.getLogger("stratus.checkpoint")
EXPORT_FORMAT = "stratus-export/1"
WHAT_TO_GIVE = (
    "give a run directory, a checkpoint directory, or the output of `stratus export` "
    "or `stratus export --format hf`"
)


@dataclass
class Trained:
    model: Transformer
    tokenizer_path: Path
    step: int
    source: Path  # the checkpoint or export directory the weights came from
    run_dir: Path | None


def locate(path: str | Path) -> tuple[str, Path]:
    """('export' | 'hf' | 'checkpoint', directory) for what the user gave."""
    p = Path(path)
    if not p.exists():
        raise StratusError(f"{p} not found: {WHAT_TO_GIVE}")
    if (p / "config.json").is_file():
        return _export_kind(p), p
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
    raise StratusError(f"{p} is not a run, a checkpoint or an export of stratus: {WHAT_TO_GIVE}")


def _read_config(p: Path) -> dict:
    try:
        info = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StratusError(f"{p}/config.json cannot be read ({e}): {WHAT_TO_GIVE}") from None
    if not isinstance(info, dict):
        raise StratusError(f"{p}/config.json is not a JSON object: {WHAT_TO_GIVE}")
    return info


def _export_kind(p: Path) -> str:
    """'export' (stratus's format) or 'hf' (a Hugging Face Llama directory) from config.json,
    or a StratusError saying what the directory is instead."""
    info = _read_config(p)
    fmt = info.get("format")
    if fmt == EXPORT_FORMAT:
        kind = "export"
    elif isinstance(fmt, str) and fmt.startswith("stratus-export/"):
        raise StratusError(
            f"{p} is a stratus export in format {fmt}, which this version does not read "
            f"(it reads {EXPORT_FORMAT}): export it again with this version"
        )
    elif "model_type" in info:
        if info["model_type"] != "llama":
            raise StratusError(
                f"{p} holds a Hugging Face {info['model_type']!r} model, and stratus loads only the Llama "
                f"architecture: {WHAT_TO_GIVE}"
            )
        kind = "hf"
    else:
        raise StratusError(
            f"{p} has a config.json that is neither a stratus export nor a Hugging Face model: {WHAT_TO_GIVE}"
        )
    if not (p / "model.safetensors").is_file():
        sharded = (p / "model.safetensors.index.json").is_file()
        raise StratusError(
            f"{p} has no model.safetensors"
            + (" (its weights are sharded, which stratus does not read)" if sharded else "")
            + f": {WHAT_TO_GIVE}"
        )
    return kind


def _model_config(raw, where: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as e:
        raise StratusError(
            f"{where}/config.json has no valid model config ({one_line(e)}): prepare a new export"
        ) from None


def _fill(model: Transformer, weights: dict[str, torch.Tensor], where: Path) -> None:
    # checked here rather than by load_state_dict, whose shape error spans many lines
    expected = model.state_dict()
    tied = model.cfg.tie_embeddings  # a tied output projection is stored once, as the embedding
    unexpected = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights and not (tied and k == "output.weight")]
    reshaped = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if unexpected or missing or reshaped:
        if unexpected:
            first = f"unexpected {unexpected[0]}"
        elif missing:
            first = f"no {missing[0]}"
        else:
            k = reshaped[0]
            first = f"{k} is {tuple(weights[k].shape)}, the config gives {tuple(expected[k].shape)}"
        raise StratusError(
            f"{where}/model.safetensors does not fit its config.json ({first}): prepare a new export"
        )
    model.load_state_dict(weights, strict=False)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    kind, where = locate(path)
    if kind == "export":
        info = _read_config(where)
        model = Transformer(_model_config(info.get("model"), where))
        _fill(model, load_file(where / "model.safetensors"), where)
        return Trained(
            model.to(device).eval(), where / "tokenizer.json", int(info.get("step") or 0), where, None
        )
    if kind == "hf":
        info = _read_config(where)
        try:
            cfg, step = model_config_from_hf(info)
        except (ValueError, TypeError) as e:  # TypeError: a field of the wrong JSON type
            raise StratusError(
                f"{where} holds a Llama model that stratus cannot rebuild ({e}): {WHAT_TO_GIVE}"
            ) from None
        model = Transformer(cfg)
        _fill(model, stratus_weights(load_file(where / "model.safetensors"), model.cfg), where)
        return Trained(model.to(device).eval(), where / "tokenizer.json", step, where, None)
    manifest = mf.read_manifest(where)
    model = Transformer(ModelConfig.model_validate(manifest["model"]))
    load_model_weights(where, model)
    run_dir = where.parent.parent
    return Trained(model.to(device).eval(), run_dir / "tokenizer.json", int(manifest["step"]), where, run_dir)


def trained_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """The model config and tokenizer file of a run, checkpoint or export, without reading
    its weights (what every rank of a fine-tuning job needs before the model exists)."""
    kind, where = locate(path)
    if kind == "export":
        return _model_config(_read_config(where).get("model"), where), where / "tokenizer.json"
    if kind == "hf":
        try:
            cfg, _ = model_config_from_hf(_read_config(where))
        except (ValueError, TypeError) as e:
            raise StratusError(
                f"{where} holds a Llama model that stratus cannot rebuild ({e}): {WHAT_TO_GIVE}"
            ) from None
        return cfg, where / "tokenizer.json"
    manifest = mf.read_manifest(where)
    return ModelConfig.model_validate(manifest["model"]), where.parent.parent / "tokenizer.json"
