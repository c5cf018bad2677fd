"""Autoregressive generation with a KV cache, streaming text as it is decoded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from stratus.data.tokenizer import eos_id
from stratus.errors import StratusError
from stratus.inference.sampling import SamplingParams, sample
from stratus.model import Transformer


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length"


def heal_prompt(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[int], torch.Tensor | None]:
    """Token healing: a prompt that ends mid-token ("def " where training text has "def" +
    " name") puts the model off its distribution. Drop the last prompt token and allow, as
    the first generated token, only tokens that begin with its bytes. Returns the shortened
    prompt and a boolean mask over the vocabulary (None when nothing was dropped)."""
    if len(ids) < 2:
        return ids, None
    last = tokenizer.id_to_token(ids[-1])  # byte-level alphabet: a string prefix is a byte prefix
    vocab = tokenizer.get_vocab()
    allowed = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    allowed[[i for tok, i in vocab.items() if tok.startswith(last)]] = True
    return ids[:-1], allowed


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    first_allowed: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yields one new token id at a time: the prompt is prefilled once, then each step feeds
    only the newest token through the cached keys and values. When the context is full, the
    newest half of it is prefilled into a fresh cache and generation goes on (a sliding
    window, as nanoGPT crops to its block size). first_allowed (vocab,) bool restricts the
    first token (token healing)."""
    device = model.output.weight.device
    context = model.cfg.max_seq_len
    if len(prompt_ids) >= context:
        raise StratusError(
            f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}: shorten the prompt"
        )
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = list(prompt_ids)
    cache = model.new_cache(batch=1, max_len=min(context, len(ids) + max_new_tokens))
    logits = model(torch.tensor([ids], device=device), 0, cache)[:, -1]
    if first_allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        keep[: len(first_allowed)] = first_allowed.to(device)
        logits = logits.masked_fill(~keep, float("-inf"))
    pos = len(ids)
    for i in range(max_new_tokens):
        nxt = int(sample(logits, params, generator).item())
        yield nxt
        if i == max_new_tokens - 1:
            return
        ids.append(nxt)
        if pos == cache.max_len:  # full: restart from the newest half of the context
            ids = ids[-(context // 2) :]
            cache = model.new_cache(batch=1, max_len=context)
            logits = model(torch.tensor([ids], device=device), 0, cache)[:, -1]
            pos = len(ids)
        else:
            logits = model(torch.tensor([[nxt]], device=device), pos, cache)[:, -1]
            pos += 1


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    params: SamplingParams | None = None,
    stop: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate a continuation of prompt. on_text receives each newly decoded piece of text;
    nothing past a stop string is ever passed to it or returned."""
    params = params or SamplingParams()
    eos = eos_id(tokenizer)
    # Documents were preceded by end-of-text in training, so a prompt starts a new document.
    prompt_ids = [eos] + tokenizer.encode(prompt, add_special_tokens=False).ids
    prompt_ids, first_allowed = heal_prompt(tokenizer, prompt_ids)
    stop = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be still arriving
    out: list[int] = []
    text, sent, reason = "", 0, "length"
    for tok in generate_ids(model, prompt_ids, max_new_tokens, params, first_allowed):
        if tok == eos:
            reason = "stop"
            break
        out.append(tok)
        # what follows the prompt; a healed token re-types the prompt's tail first
        text = tokenizer.decode(prompt_ids[1:] + out)[len(prompt) :]
        hit = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
        if hit >= 0:
            text, reason = text[:hit], "stop"
            break
        safe = len(text) - hold
        while safe > sent and text[safe - 1] == "\ufffd":  # a UTF-8 character still incomplete
            safe -= 1
        if on_text and safe > sent:
            on_text(text[sent:safe])
            sent = safe
    if on_text and len(text) > sent:
        on_text(text[sent:])
    return Generation(text, len(prompt_ids), len(out), reason)
