"""What a client asks the engine for, and what the engine tells it back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stratus.errors import StratusError


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


class EngineDead(Exception):
    """The engine's loop has stopped; nothing more will be generated (HTTP 503)."""


class ContextOverflow(StratusError):
    """The prompt plus max_tokens does not fit the model's context (HTTP 400)."""


class NeverFits(StratusError):
    """More sequences in one call than the running slots and the queue hold together: no
    retry can succeed (HTTP 400, where a full queue is a 429)."""


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the likeliest token's probability; 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings; it is not returned
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k likeliest
    ignore_eos: bool = False  # end-of-text does not end the request (benchmarks)
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the request too (a chat model's end of turn)
    heal_ids: tuple[int, ...] = ()  # token healing (prompt.py): the first token is one of these
    heal_text: str = ""  # ... and the prompt's tail it re-types is not part of the completion
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's and the k likeliest
    grammar: str | None = None  # the output must match it (inference/grammar.py): JSON, tool calls


@dataclass
class Event:
    """One step of a request: a sampled token with the text it completes (possibly empty,
    while a stop string or a UTF-8 character may still be arriving), or the end."""

    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # on a request's first event, when asked for: (token, logprob, top) of prompt tokens 1..
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event
    error: str | None = None
    time: float = field(default_factory=time.monotonic)


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: RequestParams
    on_event: Callable[[Event], None]  # called on the engine's thread; must be quick and not block
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finish_reason: str | None = None
    # engine state
    blocks: list[int] | None = None  # its KV block table while it runs; None while it waits
    pos: int = 0  # tokens (prompt, then output) whose keys and values are in its blocks
    out: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    counts: torch.Tensor | None = None  # (vocab,) occurrences, for the penalties
    generator: torch.Generator | None = None
    detok: object = None
    matcher: object = None  # its grammar.Matcher, when the output is constrained
    prompt_lps: list = field(default_factory=list)  # prompt tokens 1.. scored so far
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        """What the model is fed: the prompt, then every token sampled (after a preemption
        the output is computed again with the prompt, and sampling goes on after it)."""
        return self.prompt + self.out

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.out)
