"""The OpenAI-compatible server over real HTTP on 127.0.0.1, with the official `openai`
client (and httpx where a client must misbehave): the wire format, sampling options,
errors and their status codes, concurrency, disconnects, the queue bound, continuous
batching, metrics, health, and the exit code when the engine dies."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from stratus.data.chat_template import TRANSCRIPT_STOP as DEFAULT_STOP
from stratus.data.chat_template import find_template
from stratus.inference.engine import wait_idle
from stratus.inference.request import RequestParams
from tests.serving import ENGINE_DIED, LiveServer, make_export, wait_until

KEY = "sk-test"


@pytest.fixture(scope="module")
def export(tiny_data: Path, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("serve") / "tiny", tiny_data / "tokenizer.json")


@pytest.fixture(scope="module")
def server(export):
    s = LiveServer(export, api_key=KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def n_tokens(server, text: str) -> int:
    return len(server.tokenizer.encode(text, add_special_tokens=False).ids)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def alpha():"}]


def test_chat_completion_object_and_usage(server, client):
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server.model
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    rendered = find_template().render(CHAT)
    assert r.usage.prompt_tokens == 1 + n_tokens(server, rendered)  # end-of-text opens the document
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12


def test_completion_max_tokens_gives_length_and_counts(server, client):
    r = client.completions.create(
        model=server.model, prompt="def ", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    # end-of-text first, and the last token healed (the first generated token re-types it)
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == 1 + n_tokens(server, "def ") - 1


def test_streaming_equals_non_streaming_and_ends_with_usage_and_done(server, client):
    kw = dict(model=server.model, messages=CHAT, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # the raw bytes: `data: {json}` events and a final `data: [DONE]`
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": server.model, "prompt": "x", "max_tokens": 4, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_sequences(server, client):
    kw = dict(
        model=server.model, prompt="def ", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    free = client.completions.create(**kw).choices[0].text
    stop = next(free[i : i + 2] for i in range(4, len(free)) if "\ufffd" not in free[i : i + 2])
    r = client.completions.create(**kw, stop=[stop, "never-seen"])
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_n_choices_and_seed(server, client):
    kw = dict(model=server.model, messages=CHAT, max_tokens=20, temperature=1.0, seed=42, n=2, logprobs=True)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # each choice its own seed
    # usage counts the tokens of both choices (one logprob entry per token)
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    streamed = list(client.chat.completions.create(**kw, stream=True))
    for i in (0, 1):
        text = "".join(
            c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i
        )
        assert text == a.choices[i].message.content


def test_logprobs_chat_and_completions(server, client):
    r = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.logprob <= 0 and isinstance(item.bytes, list)
    assert (
        b"".join(bytes(i.bytes) for i in content)
        .decode(errors="replace")
        .startswith(r.choices[0].message.content[:1])
    )
    c = client.completions.create(model=server.model, prompt="x", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server, client):
    import torch

    prompt = "def alpha(x):\n    return x"
    kw = dict(model=server.model, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    r = client.completions.create(**kw)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    ids = server.tokenizer.encode(prompt, add_special_tokens=False).ids
    k = len(ids)  # every prompt token is scored: end-of-text comes before the first
    assert text.startswith(prompt) and "".join(lp.tokens[:k]) == prompt
    assert len(lp.tokens) == k + r.usage.completion_tokens and lp.text_offset[k] == len(prompt)
    with torch.no_grad():
        model = server.engine.model
        want = torch.log_softmax(model(torch.tensor([[server.state.eos, *ids]]))[0].float(), -1)
    for j, tid in enumerate(ids):
        assert lp.token_logprobs[j] == pytest.approx(float(want[j, tid]), abs=1e-5)
        # (a dict by token text: two tokens that print alike are one key)
        assert (
            1 <= len(lp.top_logprobs[j]) <= 2
            and max(lp.top_logprobs[j].values()) >= lp.token_logprobs[j] - 1e-6
        )
    # a second time the prompt's blocks are cached; a scored prompt is computed all the same
    again = client.completions.create(**kw)
    assert again.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)
    streamed = []
    for c in client.completions.create(**kw, stream=True):
        if c.choices and c.choices[0].logprobs:
            streamed += c.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    # token ids are echoed from the first, which nothing predicts
    t = client.completions.create(**{**kw, "prompt": ids}).choices[0].logprobs
    assert t.token_logprobs[0] is None and t.top_logprobs[0] is None
    with torch.no_grad():
        bare = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    assert t.token_logprobs[1:k] == pytest.approx([float(bare[j - 1, ids[j]]) for j in range(1, k)], abs=1e-5)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "stratus_requests_total",
        "stratus_prompt_tokens_total",
        "stratus_generation_tokens_total",
        "stratus_queue_depth",
        "stratus_time_to_first_token_seconds_bucket",
        "stratus_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'stratus_requests_total{path="/v1/chat/completions",status="200"}' in text


BAD = [
    ("{not json", 400, None),
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": "hello"}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "x " * 200}]}, 400, "messages"),
    # more than the whole context: out of the field's documented range
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, 400, "max_tokens"),
    # within it, but not beside this prompt
    (
        {"model": "M", "messages": [{"role": "user", "content": "x " * 40}], "max_tokens": 100},
        400,
        "messages",
    ),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_errors_have_status_and_body_and_the_server_goes_on(server, client, stream):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status, param in BAD:
        if isinstance(body, dict):
            body = json.dumps({**body, "model": body["model"].replace("M", server.model), "stream": stream})
        r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]  # checked before a stream starts: a JSON error, not an event stream
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (body, err)
    too_long = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "x " * 200}]})
    assert (
        httpx.post(server.url + "/v1/chat/completions", content=too_long, headers=headers).json()["error"][
            "code"
        ]
        == "context_length_exceeded"
    )
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=BAD[1][0] and "{}",
        headers={"Authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", temperature=5, stream=stream)
    # vLLM's extensions and `user` are served; a field the server does not implement is a 400
    # that names it, never accepted and ignored (a JSON request must not get free text)
    r = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=3, user="u-1", extra_body={"min_p": 0.05, "top_k": 5}
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    for field, value in (("modalities", ["text"]), ("whatever", 1)):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.model, messages=CHAT, extra_body={field: value})
        assert e.value.body["param"] == field and "does not implement" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=server.model, prompt="x", best_of=2)
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=2)  # still up
    assert r.choices[0].finish_reason in ("stop", "length")


def _stream_text(url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    out = []
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(out)


def test_32_concurrent_streams_give_the_sequential_greedy_texts(server, client):
    prompts = [f"def f{i}(x):\n    return x + {i}" for i in range(32)]
    # greedy choices well apart: the comparison tests batching, not rounding
    for p in prompts:
        ids = [server.state.eos, *server.tokenizer.encode(p, add_special_tokens=False).ids]
        c = server.engine.generate(ids, RequestParams(max_tokens=16, temperature=0, logprobs=2))
        assert min(top[0][1] - top[1][1] for _, _, top in c.logprobs) > 1e-5
    sequential = [_stream_text(server.url, p, 16) for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = _stream_text(server.url, prompts[i], 16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(32)] == sequential
    assert wait_idle(server.engine, 5)


@pytest.fixture
def slow_server(export, monkeypatch):
    """One slot, one queue place, and every forward pass slowed to 10 ms, so that timing
    (who finishes first, who is still running when a client leaves) does not hang on the
    speed of this machine."""
    from stratus.inference import engine as engine_module

    real = engine_module.execute

    def slow(*args, **kwargs):
        time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "execute", slow)
    s = LiveServer(export, max_batch=2, max_queue=1)
    yield s
    s.stop()


def test_disconnecting_clients_free_their_slots(slow_server):
    s = slow_server
    body = {"model": s.model, "prompt": "x", "max_tokens": 100, "temperature": 0, "stream": True}
    for _ in range(2):  # streaming: read the first token, then hang up
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "ignore_eos": True}) as r:
            next(r.iter_lines())
    wait_until(s.engine.idle, 5, "a disconnected stream kept its slot")
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "ignore_eos": True}, timeout=0.3)
    wait_until(s.engine.idle, 5, "a disconnected request kept its slot")
    assert s.engine.pool.available() == s.engine.pool.blocks


def test_full_queue_answers_429_with_retry_after(slow_server):
    s = slow_server
    body = {"model": s.model, "prompt": "x", "max_tokens": 100, "ignore_eos": True}
    started = []
    busy = [
        threading.Thread(
            target=lambda: started.append(httpx.post(s.url + "/v1/completions", json=body, timeout=30))
        )
        for _ in range(3)
    ]
    for t in busy:  # two take the slots, one waits
        t.start()
    wait_until(lambda: s.engine.running() == 2 and s.engine.queue_depth() == 1, 5, "the engine did not fill")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=s.model, prompt="y", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "queue_full"
    for t in busy:
        t.join(30)
    assert [r.status_code for r in started] == [200, 200, 200]


def test_a_short_request_after_a_long_one_finishes_first(slow_server):
    s = slow_server
    finished: list[str] = []

    def ask(name: str, max_tokens: int) -> None:
        body = {"model": s.model, "prompt": name, "max_tokens": max_tokens, "ignore_eos": True}
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=30).status_code == 200
        finished.append(name)

    long = threading.Thread(target=ask, args=("long", 60))
    long.start()
    wait_until(lambda: s.engine.running() == 1, 5, "the long request did not start")
    time.sleep(0.05)
    ask("short", 3)
    long.join(30)
    assert finished == ["short", "long"]


def test_engine_death_makes_health_503_and_the_server_exit_non_zero(export, monkeypatch):
    s = LiveServer(export)
    try:

        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr("stratus.inference.engine.execute", broken)
        r = httpx.post(s.url + "/v1/completions", json={"model": s.model, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        wait_until(lambda: not s.thread.is_alive(), 10, "the server kept running without its engine")
    finally:
        code = s.stop()
    assert code == ENGINE_DIED
    assert DEFAULT_STOP  # the template's turn markers are what ends a chat reply


@pytest.mark.parametrize("prompt", ["def ", "value = alpha_1(beta"])
def test_generate_and_completions_give_the_same_text_for_a_prompt_and_seed(server, client, export, prompt):
    """`stratus generate` and /v1/completions share the prompt's encoding (end-of-text first,
    token healing) and the choice of each token: the same prompt and seed, the same text."""
    from stratus.checkpoint.load import load_trained
    from stratus.data.tokenizer import load_tokenizer
    from stratus.inference.generate import generate
    from stratus.inference.sampling import SamplingParams

    trained = load_trained(export)
    tok = load_tokenizer(trained.tokenizer_path)
    for temperature, seed in ((0.0, None), (0.9, 17)):
        local = generate(trained.model, tok, prompt, 12, SamplingParams(temperature, 0, 1.0, seed))
        r = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=12, temperature=temperature, seed=seed
        )
        assert r.choices[0].text == local.text and r.choices[0].finish_reason == local.finish_reason
        assert r.usage.completion_tokens == local.completion_tokens


def test_a_request_that_waits_past_the_queue_timeout_gets_503(export, monkeypatch):
    """One sequence runs at a time, every step slowed to 10 ms: a 120-token request holds the
    engine for at least 1.2 s, and requests behind it wait past a 0.3 s queue timeout (the
    margin only grows on a slower machine)."""
    from stratus.inference import engine as engine_module

    real = engine_module.execute

    def slow(*args, **kwargs):
        time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "execute", slow)
    s = LiveServer(export, max_batch=1, max_queue=4, queue_timeout_s=0.3)
    try:
        long = {"model": s.model, "prompt": "x", "max_tokens": 120, "ignore_eos": True}
        first = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=long, timeout=60))
        first.start()
        wait_until(lambda: s.engine.running() == 1, 10, "the long request did not start")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=s.model, prompt="y", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_timeout"
        assert int(e.value.response.headers["retry-after"]) >= 1 and "overloaded" in e.value.body["message"]
        # streaming: the status line went out with the stream; the timeout is its error event
        with pytest.raises(openai.APIError, match="overloaded"):
            for _ in client.completions.create(model=s.model, prompt="y", max_tokens=2, stream=True):
                pass
        first.join(60)
        assert 'stratus_request_finish_total{reason="timeout"} 2.0' in httpx.get(s.url + "/metrics").text
        r = client.completions.create(model=s.model, prompt="y", max_tokens=2)  # served again
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()


def test_serving_dtype_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    import torch

    from stratus.inference.open import serving_dtype

    assert serving_dtype("auto", "cuda:1") == torch.bfloat16 and serving_dtype("auto", "cpu") == torch.float32
    assert (
        serving_dtype("float16", "cuda") == torch.float16
        and serving_dtype("float32", "cuda") == torch.float32
    )
