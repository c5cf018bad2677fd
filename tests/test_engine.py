"""The continuous-batching engine: paged attention over a mixed batch equals the model's own
forward, chunked prefill, batching, prefix-cache hits and preemption leave greedy output
unchanged, per-request sampling and penalties, logprobs, stop strings, cancellation, the
bounded queue, context overflow, the KV memory budget, and a failing model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from stratus.data.tokenizer import load_tokenizer
from stratus.errors import StratusError
from stratus.inference.choose import choose
from stratus.inference.detok import Detokenizer, token_bytes
from stratus.inference.engine import Engine, EngineConfig, wait_idle
from stratus.inference.paged import BlockPool, PagedStep
from stratus.inference.request import ContextOverflow, QueueFull, Request, RequestParams
from tests.serving import tiny_model, wait_until

GREEDY = RequestParams(max_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def tok(tiny_data: Path):
    return load_tokenizer(tiny_data / "tokenizer.json")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def engine(model, tok):
    e = Engine(model, tok, EngineConfig(max_batch=4, max_queue=8, prefill_chunk=5)).start()
    yield e
    e.stop()


def prompt(tok, text: str) -> list[int]:
    return [0, *tok.encode(text, add_special_tokens=False).ids]


def plain_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by the model's own forward over the whole sequence each step."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1, :320].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def _paged(model, pool, rows):
    """One forward of the model over rows (block table, first position, tokens), flattened to
    one row as the engine runs it: logits (N, vocab) of every token."""
    tokens = torch.cat([t for _, _, t in rows], dim=1)
    positions = torch.cat([torch.arange(p, p + t.shape[1]) for _, p, t in rows])[None]
    step = PagedStep(pool, [(blocks, p, t.shape[1]) for blocks, p, t in rows], "cpu")
    with torch.no_grad():
        return model(tokens, positions, step)[0]


def _contiguous(model, x, chunks):
    """The same sequence through `generate`'s contiguous cache, in the same chunks."""
    cache, start, out = model.new_cache(1), 0, []
    with torch.no_grad():
        for n in chunks:
            out.append(model(x[:, start : start + n], start, cache)[0])
            start += n
    return torch.cat(out)


def test_paged_attention_over_a_mixed_batch_equals_contiguous_attention(model):
    pool = BlockPool(model.cfg, 12, 4, "cpu", torch.float32)
    a, b, c = torch.randint(0, 320, (1, 21)), torch.randint(0, 320, (1, 9)), torch.randint(0, 320, (1, 6))
    blocks_a, blocks_b, blocks_c = [7, 2, 9, 0, 5, 11], [3, 1, 8], [4, 6]  # scattered blocks
    # a prefilled in two chunks (the second after cached positions) beside b's whole prompt;
    # then one step of two decodes at positions 20 and 8 and c's whole prompt, in one forward
    first = _paged(model, pool, [(blocks_a, 0, a[:, :7])])
    second = _paged(model, pool, [(blocks_a, 7, a[:, 7:20]), (blocks_b, 0, b[:, :8])])
    third = _paged(model, pool, [(blocks_a, 20, a[:, 20:]), (blocks_b, 8, b[:, 8:]), (blocks_c, 0, c)])
    paged_a = torch.cat([first, second[:13], third[:1]])
    paged_b, paged_c = torch.cat([second[13:], third[1:2]]), third[2:]
    for paged, x, chunks, blocks in (
        (paged_a, a, [7, 13, 1], blocks_a),
        (paged_b, b, [8, 1], blocks_b),
        (paged_c, c, [6], blocks_c),
    ):
        contiguous = _contiguous(model, x, chunks)
        # the sequence alone, in the same chunks: paged attention equals contiguous attention
        alone, start = [], 0
        for n in chunks:
            alone.append(_paged(model, pool, [(blocks, start, x[:, start : start + n])]))
            start += n
        torch.testing.assert_close(torch.cat(alone), contiguous, atol=1e-5, rtol=0)
        # batched with other rows, the fp32 matmuls of another shape round differently (the
        # logits reach 20); and the model without a cache
        torch.testing.assert_close(paged, contiguous, atol=5e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(paged, model(x)[0], atol=1e-4, rtol=0)


def test_concurrent_chunked_greedy_equals_plain_greedy(engine, model, tok):
    prompts = [prompt(tok, t) for t in ["def alpha_1(beta):\n    return", "x", "value = count + total * 3"]]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = engine.generate(prompts[i], GREEDY).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, ids in enumerate(prompts):  # prompts of 2-9 tokens, prefill chunks of 5
        assert results[i] == plain_greedy(model, ids, 20, engine.eos)


def test_seed_reproduces_and_n_seeds_differ(engine, tok):
    ids = prompt(tok, "def ")
    params = RequestParams(max_tokens=24, temperature=1.0, seed=11)
    a, b = engine.generate(ids, params), engine.generate(ids, params)
    c = engine.generate(ids, RequestParams(max_tokens=24, temperature=1.0, seed=12))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_string_cuts_the_text_and_ends_the_request(engine, tok):
    ids = prompt(tok, "def ")
    free = engine.generate(ids, RequestParams(max_tokens=30, temperature=0, ignore_eos=True))
    stop = next(
        free.text[i : i + 2] for i in range(4, len(free.text)) if "\ufffd" not in free.text[i : i + 2]
    )
    cut = engine.generate(ids, RequestParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    assert len(cut.tokens) < len(free.tokens)


def test_detokenizer_holds_back_a_stop_string_arriving_in_pieces(tok):
    ids = tok.encode("return alpha + beta", add_special_tokens=False).ids
    d = Detokenizer(tok, ("a + b",))
    sent = ""
    for t in ids:
        piece, stopped = d.add(t)
        sent += piece
        if stopped:
            break
    assert stopped and sent == "return alph"
    assert token_bytes(tok, tok.encode("é", add_special_tokens=False).ids[0]) in ("é".encode(), b"\xc3")


def test_incremental_detokenizer_gives_the_whole_decode(tok):
    text = 'def alpha_1(beta):\n    return "é漢字" + beta  # ünïcode\n' * 3
    ids = tok.encode(text, add_special_tokens=False).ids
    d = Detokenizer(tok)
    pieces = [d.add(t)[0] for t in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # half a character is never sent


def test_penalties_and_logit_bias_change_the_choice(tok):
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    req = Request([0], RequestParams(temperature=0, presence_penalty=1.5, logprobs=2), lambda e: None)
    req.counts = torch.tensor([0.0, 1.0, 0.0, 0.0])  # token 1 already generated once
    token, lp, top = choose(logits, req)
    assert token == 3 and top[0][0] == 3 and lp == pytest.approx(top[0][1])
    assert req.counts[3] == 1
    req = Request([0], RequestParams(temperature=0, frequency_penalty=0.6), lambda e: None)
    req.counts = torch.tensor([0.0, 2.0, 0.0, 0.0])  # 3 - 1.2 < 2
    assert choose(logits, req)[0] == 3
    req = Request([0], RequestParams(temperature=0, logit_bias=((2, 5.0),)), lambda e: None)
    assert choose(logits, req)[0] == 2


def test_logprobs_are_the_models_and_greedy_takes_the_top(engine, model, tok):
    ids = prompt(tok, "x")
    c = engine.generate(ids, RequestParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0, -1, :320], -1)
    token, lp, top = c.logprobs[0]
    assert lp == pytest.approx(float(first[token]), abs=1e-5)
    assert len(top) == 3 and top[0][0] == token and top[0][1] >= top[1][1] >= top[2][1]


def test_cancel_frees_the_slot_at_once(engine, tok):
    events = engine.stream(prompt(tok, "x"), RequestParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(events)
    events.close()  # the consumer goes away after one token
    assert wait_idle(engine, 5) and engine.running() == 0 and engine.pool.available() == engine.pool.blocks


def test_bounded_queue_refuses_before_queuing(model, tok):
    e = Engine(model, tok, EngineConfig(max_batch=1, max_queue=1)).start()
    try:
        long = RequestParams(max_tokens=100, temperature=0, ignore_eos=True)
        first = e.submit(prompt(tok, "x"), long, lambda ev: None)
        wait_until(lambda: first.blocks is not None, 5, "the first request never ran")
        e.submit(prompt(tok, "y"), long, lambda ev: None)  # waits
        with pytest.raises(QueueFull):
            e.submit(prompt(tok, "z"), long, lambda ev: None)
        assert e.queue_depth() == 1
    finally:
        e.stop()


def test_context_overflow_is_reported_before_any_token(engine, tok):
    ids = prompt(tok, "x")
    got: list = []
    with pytest.raises(ContextOverflow, match="maximum context length is 128"):
        engine.submit(ids, RequestParams(max_tokens=128), got.append)
    with pytest.raises(ContextOverflow):
        engine.submit(list(range(1, 129)), RequestParams(), got.append)
    assert got == [] and engine.idle()
    # without max_tokens the completion may fill the context
    c = engine.generate(ids, RequestParams(temperature=0, ignore_eos=True))
    assert c.finish_reason == "length" and len(c.tokens) == 128 - len(ids)


def test_short_request_after_a_long_one_finishes_first(engine, tok):
    order: list[str] = []
    long = engine.submit(
        prompt(tok, "x"),
        RequestParams(max_tokens=120, temperature=0, ignore_eos=True),
        lambda ev: ev.finish_reason and order.append("long"),
    )
    wait_until(lambda: long.completion_tokens >= 2, 5, "the long request did not start")
    engine.submit(
        prompt(tok, "y"),
        RequestParams(max_tokens=3, temperature=0, ignore_eos=True),
        lambda ev: ev.finish_reason and order.append("short"),
    )
    wait_until(lambda: len(order) == 2, 20, "the requests did not finish")
    assert order == ["short", "long"]


def test_kv_budget_sizes_the_pool(model, tok):
    per_block = BlockPool.bytes_per_block(
        model.cfg, 16, torch.float32
    )  # 2 layers x 2 x 16 x 2 heads x 8 x 4 B
    e = Engine(model, tok, EngineConfig(max_batch=16, kv_cache_mb=24 * per_block / 2**20))
    assert e.pool.blocks == 24 and e.pool.nbytes == 24 * per_block
    with pytest.raises(StratusError, match="holds no block"):
        Engine(model, tok, EngineConfig(kv_cache_mb=per_block / 2**21))


def test_prefix_cache_hits_give_the_same_output_as_misses(model, tok):
    e = Engine(model, tok, EngineConfig(max_batch=4, prefill_chunk=64, block_size=4)).start()
    try:
        ids = prompt(tok, "def alpha_1(beta):\n    return beta + alpha_1 * 3")  # several blocks
        miss = e.generate(ids, GREEDY)
        before = e.pool.hits
        hit = e.generate(ids, GREEDY)
        assert e.pool.hits - before == (len(ids) - 1) // 4  # every full block before the last token
        assert hit.tokens == miss.tokens == plain_greedy(model, ids, 20, e.eos)
        # the n choices of one request: the later ones wait for the first's blocks, then share them
        before = e.pool.hits
        other = prompt(tok, "value = count + total * 3 - alpha_1(beta)")
        reqs = e.submit_many([(other, GREEDY, lambda ev: None)] * 3)
        wait_until(lambda: all(r.done.is_set() for r in reqs), 30, "the choices did not finish")
        assert e.pool.hits - before == 2 * ((len(other) - 1) // 4)
        assert all(r.out == plain_greedy(model, other, 20, e.eos) for r in reqs)
    finally:
        e.stop()
    # with prefix caching off (--no-prefix-caching) nothing is shared, and the text is the same
    off = Engine(model, tok, EngineConfig(max_batch=4, block_size=4, prefix_caching=False)).start()
    try:
        assert off.generate(ids, GREEDY).tokens == off.generate(ids, GREEDY).tokens == miss.tokens
        assert off.pool.hits == 0 and not off.pool.cached
    finally:
        off.stop()


def test_preemption_under_a_small_pool_finishes_every_request_with_the_same_text(model, tok):
    # 12 blocks of 4 positions: room for about two of these sequences at once, and four run
    e = Engine(
        model,
        tok,
        EngineConfig(
            max_batch=4,
            prefill_chunk=64,
            block_size=4,
            kv_cache_mb=12 * BlockPool.bytes_per_block(model.cfg, 4, torch.float32) / 2**20,
        ),
    ).start()
    try:
        texts = ["def alpha_1(beta):", "x", "value = count", "return beta"]
        params = RequestParams(max_tokens=16, temperature=0, ignore_eos=True)
        reqs = e.submit_many([(prompt(tok, t), params, lambda ev: None) for t in texts])
        wait_until(lambda: all(r.done.is_set() for r in reqs), 60, "the requests did not finish")
        assert e.preemptions > 0
        for t, r in zip(texts, reqs, strict=True):
            ids = prompt(tok, t)
            assert r.finish_reason == "length" and r.out == _plain_ignoring_eos(model, ids, 16)
        assert e.pool.available() == e.pool.blocks
    finally:
        e.stop()


def _plain_ignoring_eos(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1, :320].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_a_failing_model_fails_every_request_and_the_engine(model, tok, monkeypatch):
    e = Engine(model, tok, EngineConfig(max_batch=2)).start()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr("stratus.inference.engine.execute", broken)
    events = list(e.stream(prompt(tok, "x"), GREEDY))
    assert events[-1].finish_reason == "error" and "device lost" in events[-1].error
    wait_until(lambda: not e.alive, 5, "the engine still claims to be alive")
    assert isinstance(e.error, RuntimeError)


def test_prompt_logprobs_over_chunks_equal_one_forward(model, tok):
    """Echo's prompt scoring: chunked prefill (5 tokens a step, beside another request) and a
    prompt whose prefix the pool already holds give the model's own log probabilities."""
    ids = prompt(tok, "def beta(y):\n    return y * 2")
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    e = Engine(model, tok, EngineConfig(max_batch=2, prefill_chunk=5)).start()
    try:
        e.generate(ids, GREEDY)  # the prompt's blocks are now cached
        got = []
        e.submit(ids[:9], GREEDY, lambda ev: None)
        for ev in e.stream(ids, RequestParams(max_tokens=2, temperature=0, prompt_logprobs=3)):
            got += ev.prompt_logprobs or []
    finally:
        e.stop()
    assert [t for t, _, _ in got] == ids[1:]
    for j, (t, lp, top) in enumerate(got):
        assert lp == pytest.approx(float(want[j, t]), rel=1e-5, abs=1e-5)
        assert [a for a, _ in top] == want[j, :320].topk(3).indices.tolist()
