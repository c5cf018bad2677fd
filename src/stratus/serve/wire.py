"""OpenAI's response objects, built as plain dicts: chat completions, text completions,
their streaming chunks, usage and logprobs in both of OpenAI's logprob formats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from stratus.inference.detok import token_bytes
from stratus.inference.request import Event


@dataclass
class Choice:
    """What one request (one choice) has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] | None = None  # parsed out of the text (serve/tools.py)
    prompt_logprobs: list | None = None  # echo with logprobs: the prompt's (engine Event)

    def add(self, ev: Event) -> None:
        self.text.append(ev.text)
        if ev.token is not None:
            self.tokens.append(ev.token)
            if ev.logprob is not None:
                self.logprobs.append((ev.token, ev.logprob, ev.top_logprobs or []))
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _piece(tok: Tokenizer, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, items: list[tuple[int, float, list[tuple[int, float]]]]) -> dict:
    def entry(token: int, lp: float) -> dict:
        return {"token": _piece(tok, token), "logprob": lp, "bytes": list(token_bytes(tok, token))}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]} for t, lp, top in items
        ],
        "refusal": None,
    }


def completion_logprobs(
    tok: Tokenizer, items: list[tuple[int, float | None, list[tuple[int, float]] | None]], offset: int = 0
) -> dict:
    """OpenAI's legacy format; an echoed prompt's first token has a null logprob and top."""
    tokens = [_piece(tok, t) for t, _, _ in items]
    offsets, at = [], offset
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in items],
        "top_logprobs": [
            None if top is None else {_piece(tok, a): alp for a, alp in top} for _, _, top in items
        ],
        "text_offset": offsets,
    }


def chat_response(
    rid: str, created: int, model: str, choices: list[Choice], logprobs: bool, tok: Tokenizer, use: dict
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": chat_logprobs(tok, c.logprobs) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def _message(c: Choice) -> dict:
    text = "".join(c.text)
    message = {"role": "assistant", "content": text if text or not c.tool_calls else None, "refusal": None}
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    return message


def completion_response(
    rid: str, created: int, model: str, choices: list[Choice], logprobs: bool, tok: Tokenizer, use: dict
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": completion_logprobs(tok, c.logprobs) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict:
    chunk = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return chunk


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict:
    chunk = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = None
    return chunk
