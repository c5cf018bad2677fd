"""Autoregressive generation with a KV cache, streaming text as it is decoded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from stratus.data.tokenizer import eos_id
from stratus.errors import StratusError
from stratus.inference.choose import choose
from stratus.inference.detok import Detokenizer
from stratus.inference.prompt import encode_prompt
from stratus.inference.request import Request, RequestParams
from stratus.inference.sampling import SamplingParams
from stratus.model import Transformer


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length"


@torch.no_grad()
def generate_ids(
    model: Transformer, prompt_ids: list[int], max_new_tokens: int, params: RequestParams, vocab: int
) -> Iterator[int]:
    """Yields one new token id at a time, chosen as the engine chooses (choose.py: the same
    generator, the same vocabulary, token healing): the prompt is prefilled once, then each
    step feeds only the newest token through the cached keys and values. When the context is
    full, the newest half of it is prefilled into a fresh cache and generation goes on (a
    sliding window, as nanoGPT crops to its block size; the engine refuses such a request)."""
    device = model.output.weight.device
    context = model.cfg.max_seq_len
    if len(prompt_ids) >= context:
        raise StratusError(
            f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}: shorten the prompt"
        )
    req = Request(list(prompt_ids), params, lambda ev: None)
    if params.seed is not None:
        req.generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = list(prompt_ids)
    cache = model.new_cache(batch=1, max_len=min(context, len(ids) + max_new_tokens))
    logits = model(torch.tensor([ids], device=device), 0, cache)[0, -1]
    pos = len(ids)
    for i in range(max_new_tokens):
        nxt, _, _ = choose(logits[:vocab], req)
        req.out.append(nxt)
        yield nxt
        if i == max_new_tokens - 1:
            return
        ids.append(nxt)
        if pos == cache.max_len:  # full: restart from the newest half of the context
            ids = ids[-(context // 2) :]
            cache = model.new_cache(batch=1, max_len=context)
            logits = model(torch.tensor([ids], device=device), 0, cache)[0, -1]
            pos = len(ids)
        else:
            logits = model(torch.tensor([[nxt]], device=device), pos, cache)[0, -1]
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
    nothing past a stop string is ever passed to it or returned. The prompt is encoded and
    the text decoded by the rules /v1/completions uses (prompt.py, detok.py): the same
    prompt and seed give the same text through either."""
    params = params or SamplingParams()
    eos = eos_id(tokenizer)
    enc = encode_prompt(tokenizer, prompt, eos)
    rp = RequestParams(
        max_tokens=max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        heal_ids=enc.heal_ids,
        heal_text=enc.heal_text,
    )
    vocab = min(tokenizer.get_vocab_size(), model.cfg.vocab_size)
    detok = Detokenizer(tokenizer, tuple(stop or ()), enc.heal_text)
    out: list[int] = []
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)

    reason = "length"
    for tok in generate_ids(model, enc.ids, max_new_tokens, rp, vocab):
        if tok == eos:
            reason = "stop"
            break
        out.append(tok)
        piece, stopped = detok.add(tok)
        emit(piece)
        if stopped:  # nothing past a stop string is decoded or sent
            reason = "stop"
            break
    emit(detok.flush())
    text = "".join(pieces)
    return Generation(text, len(enc.ids), len(out), reason)
