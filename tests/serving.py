"""Helpers for the engine and server tests: a small model saved as a stratus export, and
a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from stratus.checkpoint.load import EXPORT_FORMAT
from stratus.config import ModelConfig
from stratus.inference.core import EngineProcess
from stratus.inference.engine import EngineConfig
from stratus.inference.open import open_engine
from stratus.model import Transformer
from stratus.serve.app import ServerState
from stratus.serve.server import ENGINE_DIED, Limits, prepare_server

# Random weights with a wide init: greedy choices are separated by at least ~1e-3 in log
# probability on the prompts the tests use (checked where it matters), far above the
# rounding differences between a batch of one and a batch of many.
SHAPE = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128, "init_std": 1.0}
SEED = 3


def tiny_model(vocab: int = 320, seed: int = SEED, **shape) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, **{**SHAPE, **shape})).eval()


def make_export(out: Path, tokenizer: Path, seed: int = SEED, **shape) -> Path:
    """A model in `stratus export`'s format (what `stratus serve` loads)."""
    if (out / "config.json").is_file():
        return out
    model = tiny_model(seed=seed, **shape)
    out.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        weights.pop("output.weight")
    save_file(weights, out / "model.safetensors")
    info = {"format": EXPORT_FORMAT, "step": 0, "source": "random", "model": model.cfg.model_dump()}
    (out / "config.json").write_text(json.dumps(info))
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


class LiveServer:
    """`stratus serve` in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(
        self,
        export: Path,
        api_key: str | None = None,
        limits: Limits | None = None,
        max_body_bytes: int = 4 * 2**20,
        process: bool = False,
        **engine: int,
    ):
        cfg = EngineConfig(**{"max_batch": 8, "max_queue": 64, "prefill_chunk": 16, **engine})
        if process:  # the engine in a child process, as `stratus serve --engine process`
            self.engine = EngineProcess(str(export), cfg, "cpu", start_timeout_s=120)
            self.tokenizer, template = self.engine.tokenizer, self.engine.source.template()
            name = self.engine.source.name
        else:
            self.engine, self.tokenizer, template, name = open_engine(export, cfg, "cpu")
        self.state = ServerState(
            self.engine, self.tokenizer, name, api_key, template, max_body_bytes=max_body_bytes
        )
        self.running = prepare_server(self.state, "127.0.0.1", 0, "warning", limits)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        wait_until(lambda: self.running.server.started, 20, "the server did not start")
        self.url = f"http://127.0.0.1:{self.running.port}"
        self.model = name

    def _serve(self) -> None:
        self.exit_code = self.running.serve()

    def stop(self) -> int | None:
        self.running.server.should_exit = True
        self.thread.join(15)
        return self.exit_code


def wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


__all__ = ["ENGINE_DIED", "LiveServer", "make_export", "tiny_model", "wait_until"]
