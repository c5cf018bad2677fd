"""Per-request choice of the next token: logit bias, presence/frequency penalties, log
probabilities, min-p, then temperature / top-k / top-p sampling (sampling.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stratus.inference.request import Request
from stratus.inference.sampling import SamplingParams, sample


@dataclass
class Draw:
    """One request's choice, still on the device: the token, its logprob and the likeliest
    alternatives (`resolve` brings every row's to the host at once)."""

    token: torch.Tensor  # 0-d
    logprob: torch.Tensor | None = None  # 0-d
    top_ids: torch.Tensor | None = None  # (k,)
    top_values: torch.Tensor | None = None


def draw(logits: torch.Tensor, req: Request) -> Draw:
    """logits (vocab,) of one request -> its Draw. Log probabilities are those of the
    distribution after bias and penalties and before temperature, top-k, top-p and min-p
    (what vLLM reports by default): they describe the model, not the dice. Nothing here
    waits for the device: a GPU step syncs once for all its rows, in `resolve`."""
    p = req.params
    logits = logits.float()
    if p.heal_ids and not req.out:  # token healing: the first token re-types the prompt's tail
        allowed = torch.tensor(p.heal_ids, device=logits.device)
        logits = torch.full_like(logits, float("-inf")).index_copy(0, allowed, logits[allowed])
    if p.logit_bias:
        ids = torch.tensor([i for i, _ in p.logit_bias], device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
    if req.counts is not None:  # OpenAI's definition: mu[j] - c[j] * alpha_freq - (c[j] > 0) * alpha_presence
        logits = logits - req.counts * p.frequency_penalty - (req.counts > 0) * p.presence_penalty
    logprobs = torch.log_softmax(logits, dim=-1) if p.logprobs is not None else None
    if p.min_p > 0 and p.temperature > 0:
        probs = torch.softmax(logits / p.temperature, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    token = sample(logits[None], SamplingParams(p.temperature, p.top_k, p.top_p), req.generator)[0]
    if req.counts is not None:
        req.counts.index_add_(0, token[None], torch.ones(1, device=logits.device))
    if logprobs is None:
        return Draw(token)
    out = Draw(token, logprobs[token])
    if p.logprobs:
        out.top_values, out.top_ids = torch.topk(logprobs, min(p.logprobs, logprobs.shape[-1]))
    return out


def resolve(draws: list[Draw]) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
    """(token, logprob, top) of each draw, brought to the host in one transfer per kind."""
    if not draws:
        return []
    tokens = torch.stack([d.token for d in draws]).tolist()
    scored = [d for d in draws if d.logprob is not None]
    lps = iter(torch.stack([d.logprob for d in scored]).tolist() if scored else [])
    ranked = [d for d in draws if d.top_ids is not None]
    ids = iter(torch.cat([d.top_ids for d in ranked]).tolist() if ranked else [])
    values = iter(torch.cat([d.top_values for d in ranked]).tolist() if ranked else [])
    out = []
    for d, token in zip(draws, tokens, strict=True):
        lp = next(lps) if d.logprob is not None else None
        top = None
        if lp is not None:
            k = len(d.top_ids) if d.top_ids is not None else 0
            pairs = [(next(ids), next(values)) for _ in range(k)]
            # a healed first token has few candidates: the others' -inf is no alternative
            top = [(i, v) for i, v in pairs if v != float("-inf")]
        out.append((token, lp, top))
    return out


def choose(logits: torch.Tensor, req: Request) -> tuple[int, float | None, list[tuple[int, float]] | None]:
    """logits (vocab,) of one request -> (token, its logprob, [(token, logprob)] of the
    likeliest alternatives): one row's draw, resolved at once (`generate`)."""
    return resolve([draw(logits, req)])[0]
