"""Model presets with their published shapes, and reading a model from a stratus config."""

from __future__ import annotations

from pathlib import Path

from stratus.counts import shape_of
from stratus.errors import StratusError
from stratus.plan.model import ModelShape

# GPT-3 175B (Brown et al. 2020, Table 2.1; vocabulary padded to 51,200 as in Narayanan et al.).
# Llama 3 (Meta, "The Llama 3 Herd of Models", Table 3): vocabulary 128,256, 8 KV heads.
PRESETS: dict[str, ModelShape] = {
    "gpt3-175b": ModelShape("gpt3-175b", "gpt", 96, 12288, 96, 96, 4 * 12288, 51200, 2048, True),
    "llama3-8b": ModelShape("llama3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, 8192),
    "llama3-70b": ModelShape("llama3-70b", "llama", 80, 8192, 64, 8, 28672, 128256, 8192),
    "llama3-405b": ModelShape("llama3-405b", "llama", 126, 16384, 128, 8, 53248, 128256, 8192),
}


def from_config(path: str | Path, seq_len: int | None = None) -> ModelShape:
    """A stratus training config's [model] (and data.seq_len) as a llama-family shape."""
    from stratus.config import load_config  # pydantic only; no torch

    cfg = load_config(path)
    m = cfg.model
    if m.vocab_size == 0:
        raise StratusError(f"{path}: model.vocab_size is 0 (taken from the tokenizer); give --vocab V")
    return _replace(shape_of(m, seq_len or cfg.data.seq_len), name=Path(path).stem)


def resolve(
    name: str | None,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    ffn_hidden: int | None = None,
    seq_len: int | None = None,
    vocab: int | None = None,
    arch: str = "llama",
) -> ModelShape:
    """--model PRESET|CONFIG.toml, or an explicit shape; explicit flags override a preset's values."""
    if name:
        if name in PRESETS:
            base = PRESETS[name]
        elif name.endswith(".toml"):
            if not Path(name).is_file():
                raise StratusError(f"model config {name} not found")
            base = from_config(name, seq_len)
            if vocab:
                base = _replace(base, vocab=vocab)
        else:
            known = ", ".join(PRESETS)
            raise StratusError(f"unknown model {name!r}; known: {known}, or a CONFIG.toml")
        over = {
            k: v
            for k, v in dict(
                layers=layers,
                hidden=hidden,
                heads=heads,
                kv_heads=kv_heads,
                ffn_hidden=ffn_hidden,
                seq_len=seq_len,
                vocab=vocab,
            ).items()
            if v
        }
        return _replace(base, **over) if over else base
    missing = [
        flag
        for flag, v in (
            ("--layers", layers),
            ("--hidden", hidden),
            ("--heads", heads),
            ("--seq-len", seq_len),
        )
        if not v
    ] + (["--vocab"] if not vocab else [])
    if missing:
        raise StratusError(f"give --model PRESET|CONFIG.toml, or the shape: missing {' '.join(missing)}")
    assert layers and hidden and heads and seq_len and vocab
    if arch not in ("gpt", "llama"):
        raise StratusError(f"--arch must be gpt or llama (got {arch!r})")
    if ffn_hidden is None:  # GPT: 4h; Llama: 8h/3 rounded up to 256, as stratus.config does
        ffn_hidden = 4 * hidden if arch == "gpt" else 256 * -(-(8 * hidden // 3) // 256)
    return ModelShape(
        f"custom-{layers}x{hidden}",
        arch,  # type: ignore[arg-type]
        layers,
        hidden,
        heads,
        kv_heads or heads,
        ffn_hidden,
        vocab,
        seq_len,
    )


def _replace(m: ModelShape, **changes: object) -> ModelShape:
    from dataclasses import replace

    return replace(m, **changes)  # type: ignore[arg-type]
