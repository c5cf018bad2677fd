"""Hugging Face export: transformers loads the directory as a Llama model and tokenizer,
and its logits equal stratus's within 1e-4 (same RoPE convention, no permutation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.hf_export import export_hf
from stratus.checkpoint.load import load_trained
from stratus.data.tokenizer import load_tokenizer
from stratus.errors import StratusError
from stratus.train.loop import train
from tests.serving import make_export

transformers = pytest.importorskip("transformers")


def _compare(src: Path, out: Path) -> None:
    export_hf(src, out)
    ours = load_trained(src).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.max_seq_len))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def alpha_1(beta):\n    return beta + 7\n"
    assert tok(text)["input_ids"] == load_tokenizer(out / "tokenizer.json").encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok(text)["input_ids"]) == text


def test_trained_run_exports_to_transformers_with_equal_logits(tiny_config, tmp_path):
    cfg = tiny_config(model__n_kv_heads=2)  # grouped-query attention, untied output
    train(cfg)
    _compare(Path(cfg.run.dir), tmp_path / "hf")
    info = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert info["model_type"] == "llama" and info["num_key_value_heads"] == 2
    with pytest.raises(StratusError, match="already exists"):
        export_hf(cfg.run.dir, tmp_path / "hf")
    assert not list(tmp_path.glob(".hf.tmp-*"))  # nothing half-written left behind


def test_tied_embeddings_export(tiny_data, tmp_path):
    src = make_export(tmp_path / "tied", tiny_data / "tokenizer.json", tie_embeddings=True, init_std=0.02)
    _compare(src, tmp_path / "hf")
