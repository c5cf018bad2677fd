"""Incremental detokenization with stop strings: text goes out only once it can no longer
turn out to be the start of a stop string or half of a UTF-8 character.

Each token is decoded once, by the tokenizers library's DecodeStream (which keeps the few
tokens a merge or a multi-byte character still needs), where decoding the whole output again
for every token made a request's detokenization quadratic in its length."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), skip: str = ""):
        self.tokenizer = tokenizer
        self.skip = skip  # text the output re-types from the prompt (token healing): not sent
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stream = DecodeStream(skip_special_tokens=True)  # as Tokenizer.decode does
        self.raw = ""  # everything decoded so far, the re-typed prompt tail included
        self.text = ""  # what follows the prompt (cut at a stop string once one is found)
        self.sent = 0  # characters of text already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """Take one more token; return (new text that is safe to send, whether a stop string
        ended the text). Past a stop string nothing is ever returned."""
        self.raw += self.stream.step(self.tokenizer, token) or ""  # None: a character still incomplete
        if self.skip.startswith(self.raw):  # still inside the re-typed tail
            self.text = ""
        elif self.skip and self.raw.startswith(self.skip):
            self.text = self.raw[len(self.skip) :]
        else:
            self.text = self.raw
        # A stop string that ends in the new text starts at or after `sent`: text before
        # `sent` was checked when it arrived, and the last `hold` characters were held back.
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            cut = min(hits)
            piece, self.text, self.sent = self.text[self.sent : cut], self.text[:cut], cut
            return piece, True
        safe = len(self.text) - self.hold
        while safe > self.sent and self.text[safe - 1] == "\ufffd":  # a character still incomplete
            safe -= 1
        if safe <= self.sent:
            return "", False
        piece, self.sent = self.text[self.sent : safe], safe
        return piece, False

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The raw bytes a token stands for (the `bytes` of OpenAI's logprobs): a token may be
    part of a UTF-8 character, so its text alone can be lossy."""
    piece = tokenizer.id_to_token(token) or ""
    table = _byte_decoder()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.encode()  # special tokens (end-of-text) are stored as plain text
