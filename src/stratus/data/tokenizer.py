"""Byte-level BPE tokenizer (HF tokenizers): trained on the corpus or loaded from a file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stratus.errors import StratusError

EOS = "<|endoftext|>"  # separates documents in the token stream (GPT-2's convention)


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so no text is ever unknown."""
    if vocab_size < 257:
        raise StratusError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise StratusError(f"tokenizer {p} not found: give a tokenizer.json file")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise StratusError(f"tokenizer {p} could not be read: {e}") from None


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise StratusError(f"the tokenizer has no {EOS} token: train one with `stratus prepare`")
    return i
