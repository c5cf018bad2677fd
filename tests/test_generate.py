"""Sampling and generation: greedy and seeded determinism, top-k/top-p, stop strings,
streaming, token healing, and a sliding window past the context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stratus.config import ModelConfig
from stratus.data.tokenizer import load_tokenizer
from stratus.inference.generate import generate, generate_ids
from stratus.inference.prompt import encode_prompt
from stratus.inference.request import RequestParams
from stratus.inference.sampling import SamplingParams, sample
from stratus.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, n_layers=2, d_model=32, n_heads=4, max_seq_len=24)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok(tiny_data: Path):
    return load_tokenizer(tiny_data / "tokenizer.json")


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, SamplingParams(temperature=0), None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 3}  # only the two likeliest tokens
    draws = {sample(logits, SamplingParams(top_p=0.5), g).item() for _ in range(200)}
    assert draws == {1}  # token 1 alone holds more than half the mass
    a = [sample(logits, SamplingParams(), torch.Generator().manual_seed(7)).item() for _ in range(5)]
    b = [sample(logits, SamplingParams(), torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert a == b


def test_streamed_pieces_make_the_returned_text(model, tok):
    pieces: list[str] = []
    g = generate(model, tok, "def ", 15, SamplingParams(seed=1), on_text=pieces.append)
    assert "".join(pieces) == g.text
    assert g.completion_tokens == 15 and g.finish_reason == "length"


def test_stop_string_truncates_and_nothing_past_it_is_streamed(model, tok):
    free = generate(model, tok, "x", 20, SamplingParams(temperature=0))
    stop = free.text[5:7]  # a string the greedy continuation is known to contain
    assert stop and stop in free.text
    pieces: list[str] = []
    g = generate(model, tok, "x", 20, SamplingParams(temperature=0), stop=[stop], on_text=pieces.append)
    assert g.text == free.text[: free.text.index(stop)]
    assert g.finish_reason == "stop" and "".join(pieces) == g.text


def test_token_healing_constrains_the_first_token(tok):
    ids = tok.encode("def ", add_special_tokens=False).ids
    enc = encode_prompt(tok, "def ", 0)
    assert enc.ids == [0, *ids[:-1]] and enc.heal_text == tok.decode([ids[-1]])
    last = tok.id_to_token(ids[-1])
    assert enc.heal_ids and all(tok.id_to_token(i).startswith(last) for i in enc.heal_ids)
    assert len(enc.heal_ids) < tok.get_vocab_size()


def test_sliding_window_goes_past_the_context(model):
    prompt = [0, 5, 6, 7]
    params = RequestParams(temperature=0)
    long = list(generate_ids(model, prompt, 40, params, 320))  # context is 24 tokens
    assert len(long) == 40
    # until the window first slides, the tokens are those of plain greedy decoding
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24 - len(prompt)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert long[: 24 - len(prompt)] == ids[len(prompt) :]
