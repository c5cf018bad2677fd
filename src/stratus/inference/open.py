"""A run, checkpoint or export opened for serving: the engine, and what the HTTP side needs
beside it (tokenizer, chat template, name), which it can also find without the weights when
the engine runs in a process of its own (inference/core.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from stratus.checkpoint.load import load_trained
from stratus.data.chat_template import ChatTemplate, find_template
from stratus.data.tokenizer import load_tokenizer
from stratus.inference.engine import Engine, EngineConfig


def serving_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on a GPU (what it was trained in, at half fp32's memory and bandwidth),
    fp32 on a CPU (no fast bf16 matmul on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass(frozen=True)
class Source:
    """Where a served model's files are."""

    path: Path  # what the user gave
    tokenizer_path: Path
    weights: Path  # the checkpoint or export directory the weights came from
    run_dir: Path | None

    @property
    def name(self) -> str:
        return (self.run_dir or self.weights).resolve().name

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def template(self) -> ChatTemplate:
        return find_template(self.path, self.weights, self.run_dir)


def load_engine(
    path: str | Path, config: EngineConfig, device: str = "auto", dtype: str = "auto", tp: int = 1
) -> tuple[Engine, Source]:
    """The engine on a run, checkpoint or export; with tp > 1 (under torchrun), on this
    rank's shard of it (inference/tensor_parallel.py)."""
    mesh = None
    if tp > 1:
        from stratus.inference import tensor_parallel

        device, mesh = tensor_parallel.init(tp, device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained(path, device)
    trained.model.to(serving_dtype(dtype, device))
    if mesh is not None:
        tensor_parallel.shard(trained.model, mesh)
    source = Source(Path(path), trained.tokenizer_path, trained.source, trained.run_dir)
    return Engine(trained.model, source.tokenizer(), config), source


def open_engine(
    path: str | Path, config: EngineConfig, device: str = "auto", dtype: str = "auto", tp: int = 1
) -> tuple[Engine, Tokenizer, ChatTemplate, str]:
    """(engine, tokenizer, template, name), ready to serve in this process."""
    engine, source = load_engine(path, config, device, dtype, tp)
    return engine, engine.tokenizer, source.template(), source.name
