"""Per-request choice of the next token: logit bias, presence/frequency penalties, log
probabilities, min-p, then temperature / top-k / top-p sampling (sampling.py)."""

from __future__ import annotations

import torch

from stratus.inference.request import Request
from stratus.inference.sampling import SamplingParams, sample


def choose(logits: torch.Tensor, req: Request) -> tuple[int, float | None, list[tuple[int, float]] | None]:
    """logits (vocab,) of one request -> (token, its logprob, [(token, logprob)] of the
    likeliest alternatives). Log probabilities are those of the distribution after bias
    and penalties and before temperature, top-k, top-p and min-p (what vLLM reports by
    default): they describe the model, not the dice."""
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
    token = int(sample(logits[None], SamplingParams(p.temperature, p.top_k, p.top_p), req.generator)[0])
    if req.counts is not None:
        req.counts[token] += 1
    if logprobs is None:
        return token, None, None
    top: list[tuple[int, float]] = []
    if p.logprobs:
        values, ids = torch.topk(logprobs, min(p.logprobs, logprobs.shape[-1]))
        # a healed first token has few candidates: the others' -inf is no alternative
        top = [(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")]
    return token, float(logprobs[token]), top
