"""Constrained decoding: a grammar decides which tokens a request may sample next.

The grammar library is llguidance (Microsoft's, which vLLM also ships). benchmarks/grammar.py
measured it against outlines-core on the served tokenizer: llguidance compiles a JSON
schema in about 1 ms and computes a token mask in 12-16 us; outlines-core masks faster
(about 1 us) but compiles by walking a regex over the whole vocabulary, 6-8 s for an
arbitrary JSON object, and a schema arrives with each request. xgrammar pulls triton and
transformers into a CPU install. The README has the table.

A grammar is llguidance's serialized form (a string), so it rides in the frozen
RequestParams and the n choices of a call share it. The server builds one from
`response_format` or a forced tool call; the engine checks it when the request is queued
(a bad schema is the client's 400, never a failed request later) and gives each request a
matcher that walks its output.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.torch as llt
import torch

from stratus.data.tokenizer import eos_id

# The JSON the model writes: json.dumps's separators and no other whitespace. Free
# whitespace would let a weak model pad forever; this is the spelling it was trained on.
JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ValueError):
    """A grammar (a JSON schema, a tool's parameters) that cannot be compiled: the
    client's mistake, a 400."""


def json_schema(schema: dict[str, Any] | bool) -> str:
    """The grammar of JSON documents valid against a schema ({"type": "object"} for
    `json_object`)."""
    if schema is True or schema == {}:
        schema = {}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"the JSON schema cannot be used: {e}") from None


def lark(source: str) -> str:
    """The grammar of a Lark source (llguidance's dialect: `%json {schema}` embeds a schema)."""
    return llguidance.LLMatcher.grammar_from_lark(source)


def json_in_lark(schema: dict[str, Any]) -> str:
    """A schema embedded in a Lark rule, with the same spelling as `json_schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class Grammars:
    """The grammars of one tokenizer: checking and matching."""

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        self.vocab = vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)

    @classmethod
    def of(cls, tokenizer) -> Grammars:
        """A `tokenizers.Tokenizer`'s grammars (this walks the vocabulary: build it once)."""
        return cls(tokenizer.to_str(), tokenizer.get_vocab_size(), eos_id(tokenizer))

    def check(self, grammar: str) -> None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"the output format cannot be enforced: {messages[0]}")

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, m: llguidance.LLMatcher, vocab: int):
        self.m = m
        self.vocab = vocab
        self._bits = llt.allocate_token_bitmask(1, vocab)
        self._shift = torch.arange(32, dtype=torch.int32)

    def allowed(self, also: tuple[int, ...] = ()) -> torch.Tensor:
        """(vocab,) bool on the CPU: the tokens the grammar allows next, plus `also` (a chat
        model's end of turn) once the output is complete."""
        llt.fill_next_token_bitmask(self.m, self._bits)
        mask = ((self._bits[0].unsqueeze(-1) >> self._shift) & 1).view(-1)[: self.vocab].bool()
        if also and self.m.is_accepting():
            mask[list(also)] = True
        return mask

    def accept(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()

    @property
    def done(self) -> bool:
        """Nothing can follow: the output is complete and must end here."""
        return self.m.is_stopped()
