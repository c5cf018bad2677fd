"""How a text prompt becomes token ids: the one rule `stratus generate` and /v1/completions
share, so that the same prompt and seed give the same text through either.

- Documents began after end-of-text in training, so a prompt starts with one (as Llama's
  tokenizer puts BOS first); it counts as a prompt token in usage.
- Token healing: a prompt that ends mid-token ("def " where training text has "def" +
  " name") puts the model off its distribution. The last prompt token is dropped, the first
  generated token must begin with its text, and the text it re-types is not part of the
  completion (the completion is what follows the prompt's text).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

_VOCABS: dict[int, tuple[Tokenizer, list[tuple[str, int]]]] = {}


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    heal_ids: tuple[int, ...] = ()  # the first generated token is one of these (none: any)
    heal_text: str = ""  # the prompt's tail that token re-types: left out of the completion


def _vocab(tokenizer: Tokenizer) -> list[tuple[str, int]]:
    """The tokenizer's (token, id) pairs, built once per tokenizer (a 128k vocabulary is
    a dictionary of 128k strings)."""
    held = _VOCABS.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = (tokenizer, list(tokenizer.get_vocab().items()))
        _VOCABS[id(tokenizer)] = held
    return held[1]


def encode_prompt(tokenizer: Tokenizer, text: str, eos: int, heal: bool = True) -> Encoded:
    """A text prompt's ids; healed unless `heal` is off (a chat template's last token is its
    own: nothing is cut mid-token there)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids = ids if ids[:1] == [eos] else [eos, *ids]
    if not heal or len(ids) < 2:
        return Encoded(ids)
    last = tokenizer.id_to_token(ids[-1])  # byte-level alphabet: a string prefix is a byte prefix
    allowed = tuple(sorted(i for tok, i in _vocab(tokenizer) if tok.startswith(last)))
    return Encoded(ids[:-1], allowed, tokenizer.decode([ids[-1]]))
