"""No single request can take the server down (DESIGN invariant 9), tried as a hostile
client would over real HTTP: extreme numbers in every field, bad Unicode in every text
field, bodies past the limit, clients that hang up or send their headers a byte at a time,
too many connections, requests that can never fit, and a request that fails inside the
engine. After each, /health is 200, a normal request is served and the server is the same
process with the same engine thread: nothing restarted."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from stratus.serve.server import Limits
from tests.serving import LiveServer, make_export, wait_until

KEY = "sk-hardening"


@pytest.fixture(scope="module")
def export(tiny_data: Path, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("hardening") / "tiny", tiny_data / "tokenizer.json")


@pytest.fixture(scope="module")
def server(export):
    s = LiveServer(export, api_key=KEY, max_body_bytes=2**20, limits=Limits(header_timeout_s=1.0))
    s.engine_thread = s.engine._thread
    yield s
    assert s.stop() == 0


def auth(**extra) -> dict:
    return {"Authorization": f"Bearer {KEY}", **extra}


def still_serving(s: LiveServer) -> None:
    """The checks that follow every attack: healthy, answering, not restarted."""
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    r = httpx.post(
        s.url + "/v1/completions",
        json={"model": s.model, "prompt": "def ", "max_tokens": 3},
        headers=auth(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert s.thread.is_alive() and s.engine.alive and s.engine._thread is s.engine_thread


def post(s: LiveServer, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = auth(**{"Content-Type": "application/json"})
    return httpx.post(s.url + path, content=content, headers=headers, timeout=60, **kw)


def chat(s: LiveServer, **fields) -> dict:
    return {"model": s.model, "messages": [{"role": "user", "content": "def "}], "max_tokens": 4, **fields}


def completion(s: LiveServer, **fields) -> dict:
    return {"model": s.model, "prompt": "def ", "max_tokens": 4, **fields}


# (field, value) pairs outside what the engine can represent, each a 400 naming the field
OUT_OF_RANGE = [
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 2**64 + 5),
    ("temperature", 1e-40),
    ("temperature", -0.5),
    ("temperature", 2.5),
    ("top_p", 1e-300),
    ("top_p", 1.5),
    ("top_p", -1e-9),
    ("logit_bias", {"320": 1}),  # the tiny model's vocabulary is 320
    ("logit_bias", {"99999999999": 1}),
    ("logit_bias", {"²": 1}),  # passes str.isdigit, not int()
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {"1": 101}),
    ("logit_bias", {"1": -1e308}),
    ("max_tokens", 0),
    ("max_tokens", 10**30),
    ("max_tokens", 129),  # beyond the whole 128-token context
    ("n", 0),
    ("n", 17),
    ("top_k", -2),
    ("top_k", 2**40),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("stop", ["x"] * 17),
    ("stop", "s" * 2000),
    ("top_logprobs", 21),
]


@pytest.mark.parametrize("stream", [False, True])
def test_extreme_values_in_every_numeric_field_are_400s(server, stream):
    s = server
    for field, value in OUT_OF_RANGE:
        r = post(s, "/v1/chat/completions", chat(s, stream=stream, **{field: value}))
        assert r.status_code == 400, (field, value, r.text)
        err = r.json()["error"]
        assert err["param"] == field and err["type"] == "invalid_request_error", (field, value, err)
    for field, value in [("logprobs", 21), ("prompt", [-1]), ("prompt", [320]), ("prompt", [[5, 2**70]])]:
        r = post(s, "/v1/completions", completion(s, stream=stream, **{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
    # JSON's non-standard NaN and Infinity, which Python's parser accepts
    for raw in ('"temperature": NaN', '"top_p": Infinity', '"presence_penalty": -Infinity'):
        body = json.dumps(chat(s, stream=stream))[:-1] + ", " + raw + "}"
        assert post(s, "/v1/chat/completions", body).status_code == 400, raw
    still_serving(s)


def test_values_at_the_edges_of_the_ranges_are_served(server):
    """The floors and ceilings themselves are valid, and the engine survives them."""
    s = server
    edges = [
        {"temperature": 1e-5},
        {"temperature": 2, "top_p": 1e-6},
        {"seed": 2**63 - 1, "n": 2},  # the second choice's seed wraps around
        {"logit_bias": {"319": 100, "0": -100, "5": 100}},
        {"top_k": 2**31 - 1, "min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"top_p": 0},  # the limit of a shrinking nucleus: greedy
    ]
    for fields in edges:
        r = post(s, "/v1/chat/completions", chat(s, **fields))
        assert r.status_code == 200, (fields, r.text)
        assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    still_serving(s)


SURROGATE = "\ud800"


def test_bad_unicode_in_every_text_field_is_a_400_that_says_so(server):
    s = server
    m = [{"role": "user", "content": "x"}]
    cases = [
        ("/v1/chat/completions", {"model": s.model, "messages": [{"role": "user", "content": SURROGATE}]}),
        (
            "/v1/chat/completions",
            {
                "model": s.model,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}],
            },
        ),
        ("/v1/chat/completions", {"model": s.model + SURROGATE, "messages": m}),
        ("/v1/chat/completions", {"model": s.model, "messages": m, "stop": ["ok", SURROGATE]}),
        ("/v1/chat/completions", {"model": s.model, "messages": m, "logit_bias": {SURROGATE: 1}}),
        ("/v1/completions", {"model": s.model, "prompt": "def " + SURROGATE}),
        ("/v1/completions", {"model": s.model, "prompt": ["fine", SURROGATE]}),
        ("/v1/completions", {"model": s.model, "prompt": "x", "stop": SURROGATE}),
    ]
    for path, body in cases:
        raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the escape \ud800
        assert "\\ud" in raw
        r = post(s, path, raw)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"], body
    r = post(s, "/v1/completions", json.dumps({"model": s.model, "prompt": SURROGATE}))
    assert "Unicode" in r.json()["error"]["message"] and r.json()["error"]["param"] == "prompt"
    # invalid UTF-8 bytes in the body itself
    assert post(s, "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}').status_code == 400
    assert httpx.get(s.url + "/v1/models/%ED%A0%80", headers=auth()).status_code == 404
    still_serving(s)


def _raw_exchange(port: int, head: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    s = server
    # only the head is sent: the 413 comes back without waiting for 50 MB that never come
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    ).encode()
    reply = _raw_exchange(s.running.port, head)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"connection: close" in reply.lower()
    # a real client posting 5 MB against the 1 MiB limit, declared and chunked
    big = json.dumps({"model": s.model, "prompt": "x" * 5_000_000}).encode()
    r = httpx.post(s.url + "/v1/completions", content=big, headers=auth(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])  # no Content-Length
    r = httpx.post(s.url + "/v1/completions", content=chunks, headers=auth(), timeout=60)
    assert r.status_code == 413
    # the key is checked before the body: without it, even malformed JSON is a 401
    r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    still_serving(s)


def test_a_prompt_that_can_never_fit_is_refused_without_tokenizing(server):
    s = server
    r = post(s, "/v1/completions", completion(s, prompt="def alpha(x): " * 30_000))  # 420k characters
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    still_serving(s)


def test_slow_and_silent_clients_are_dropped_after_the_header_timeout(server):
    s = server
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", s.running.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed = False
        for _ in range(200):  # a byte every 0.1 s: uvicorn's own keep-alive timer never fires
            try:
                sock.sendall(b"X")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:  # reset by the server
                closed = True
                break
            time.sleep(0.1)
    assert closed, "a client trickling its headers kept its connection for 20 s"
    assert time.monotonic() - t0 < 15
    with socket.create_connection(("127.0.0.1", s.running.port), timeout=30) as sock:  # says nothing at all
        assert sock.recv(1) == b""  # closed by the server, not by the 30 s client timeout
    still_serving(s)


def test_connections_past_the_limit_get_503_and_the_server_goes_on(export):
    s = LiveServer(export, limits=Limits(header_timeout_s=60, max_connections=4))
    s.engine_thread = s.engine._thread
    try:
        idle = [socket.create_connection(("127.0.0.1", s.running.port)) for _ in range(4)]
        wait_until(lambda: len(s.running.server.server_state.connections) == 4, 10, "connections not seen")
        reply = _raw_exchange(s.running.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        for sock in idle:
            sock.close()
        wait_until(lambda: not s.running.server.server_state.connections, 10, "connections not released")
        still_serving(s)
    finally:
        assert s.stop() == 0


def test_keep_alive_requests_are_as_fast_as_fresh_connections(server):
    """The listening socket is TCP, so asyncio sets TCP_NODELAY on every accepted
    connection; without it each keep-alive request waited ~40 ms for a delayed ACK."""
    s = server
    with httpx.Client(base_url=s.url) as keep:
        keep.get("/health")
        for proto in list(s.running.server.server_state.connections):
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

        def timed(get) -> float:
            t0 = time.perf_counter()
            assert get().status_code == 200
            return time.perf_counter() - t0

        kept = [timed(lambda: keep.get("/health")) for _ in range(30)]
        fresh = [timed(lambda: httpx.get(s.url + "/health")) for _ in range(30)]
    # A fresh connection pays its handshake; a kept one must not pay a ~40 ms Nagle stall
    # instead. The stall hits every request, so it shows in the fastest of 30, which a busy
    # machine's scheduling noise does not.
    assert min(kept) < min(fresh) + 0.010, (sorted(kept)[:5], sorted(fresh)[:5])


@pytest.fixture
def slow_server(export, monkeypatch):
    """Every forward pass slowed to 30 ms, so that a step is long next to the time the
    event loop takes to see a hang-up."""
    from stratus.inference import engine as engine_module

    real = engine_module.execute

    def slow(*args, **kwargs):
        time.sleep(0.03)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "execute", slow)
    s = LiveServer(export, max_batch=2, max_queue=1)
    s.engine_thread = s.engine._thread
    yield s
    assert s.stop() == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_slot_within_a_step(slow_server, stream):
    s = slow_server
    body = completion(s, max_tokens=100, ignore_eos=True, stream=stream)
    with socket.create_connection(("127.0.0.1", s.running.port)) as sock:
        data = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(lambda: s.engine.running() == 1 and s.engine._running[0].out, 30, "never started")
        req = s.engine._running[0]
        sock.shutdown(socket.SHUT_RDWR)
        at_hangup = s.engine.iterations
    wait_until(lambda: req.finish_reason is not None, 30, "a gone client kept its slot")
    assert req.finish_reason == "cancelled"
    assert s.engine.iterations - at_hangup <= 3  # the step running at the hang-up, and the next
    assert len(req.out) < 100
    wait_until(s.engine.idle, 10, "the slot was not freed")
    still_serving(s)


def test_a_request_that_can_never_fit_is_400_and_a_full_queue_429_with_a_computed_retry(slow_server):
    s = slow_server  # 2 slots and 1 queue place: 3 sequences at most
    r = httpx.post(s.url + "/v1/completions", json=completion(s, n=4), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # the schema's bound on n
    r = httpx.post(s.url + "/v1/completions", json=completion(s, prompt=["a", "b"], n=2), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"  # 2 x 2 > 3
    assert r.json()["error"]["param"] == "n"
    busy = [
        threading.Thread(
            target=httpx.post,
            args=(s.url + "/v1/completions",),
            kwargs={"json": completion(s, max_tokens=30, ignore_eos=True), "timeout": 60},
        )
        for _ in range(3)
    ]
    for t in busy:
        t.start()
    wait_until(lambda: s.engine.running() == 2 and s.engine.queue_depth() == 1, 30, "the engine did not fill")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=s.model, prompt="y", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) == s.engine.retry_after() >= 1
    for t in busy:
        t.join(60)
    still_serving(s)


def test_a_request_that_fails_in_the_engine_fails_alone(export, monkeypatch):
    """A fault in one request's own work (here its sampler) is a 500 for that request only:
    no internals in the body, its request id in the log; the engine serves the others."""
    from stratus.inference import engine as engine_module

    real = engine_module.draw

    def picky(logits, req):
        if req.params.seed == 666:
            raise RuntimeError("secret internals")
        return real(logits, req)

    monkeypatch.setattr(engine_module, "draw", picky)
    s = LiveServer(export)
    s.engine_thread = s.engine._thread
    try:
        before = _finished(s)
        good: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: good.append(
                httpx.post(
                    s.url + "/v1/completions", json=completion(s, max_tokens=20, ignore_eos=True), timeout=60
                )
            )
        )
        t.start()
        r = httpx.post(s.url + "/v1/completions", json=completion(s, seed=666), timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert "secret" not in r.text and r.headers["x-request-id"] in err["message"]
        assert err["type"] == "server_error"
        streamed = httpx.post(
            s.url + "/v1/completions", json=completion(s, seed=666, stream=True), timeout=60
        )
        assert (
            streamed.status_code == 200
            and '"server_error"' in streamed.text
            and "secret" not in streamed.text
        )
        t.join(60)
        assert good[0].status_code == 200 and good[0].json()["choices"][0]["finish_reason"] == "length"
        still_serving(s)
        after = _finished(s)
        assert after["error"] - before["error"] == 2
    finally:
        assert s.stop() == 0


def _finished(s: LiveServer) -> dict[str, float]:
    text = httpx.get(s.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("stratus_request_finish_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_every_request_ends_in_exactly_one_finish_reason(slow_server):
    s = slow_server
    before = _finished(s)
    assert set(before) == {"stop", "length", "cancelled", "error", "timeout", "rejected"}
    ok = httpx.post(s.url + "/v1/completions", json=completion(s, max_tokens=3, ignore_eos=True, n=2))
    assert ok.status_code == 200
    assert httpx.post(s.url + "/v1/completions", json=completion(s, temperature=9)).status_code == 400
    assert httpx.post(s.url + "/v1/completions", json=completion(s, n=5)).status_code == 400
    with pytest.raises(httpx.ReadTimeout):  # gives up waiting: cancelled
        httpx.post(
            s.url + "/v1/completions", json=completion(s, max_tokens=100, ignore_eos=True), timeout=0.5
        )
    wait_until(s.engine.idle, 30, "the cancelled request kept its slot")
    wait_until(lambda: _finished(s)["cancelled"] > before["cancelled"], 10, "cancellation not counted")
    after = _finished(s)
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"stop": 0, "length": 2, "cancelled": 1, "error": 0, "timeout": 0, "rejected": 2}, delta


@pytest.mark.parametrize("vocab", [1, 2, 9, 10, 11, 99, 100, 101, 320, 4096, 10_000, 32_000, 128_256])
def test_the_logit_bias_key_pattern_is_exactly_the_vocabulary(vocab):
    """The regular expression the OpenAPI document gives for logit_bias keys accepts the
    decimal ids 0 .. vocab-1 and nothing else."""
    import re

    from stratus.serve.protocol import below_pattern

    ids = re.compile(below_pattern(vocab))
    for k in [*range(min(vocab + 50, 20_000)), vocab - 1, vocab, vocab + 1, 10 * vocab]:
        assert bool(ids.match(str(k))) == (k < vocab), k
    for bad in ("00", "01", "-1", "", "1a", "²", " 1", "1 "):
        assert not ids.match(bad), bad
