"""The engine in a process of its own (`stratus serve --engine process`, inference/core.py),
over real HTTP with the official openai client: the same outputs as the engine in a thread,
the checks made in the HTTP process while the engine is stopped (SIGSTOP), a client that
leaves, and the server's exit when the engine's process is killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import ENGINE_DIED, LiveServer, make_export, wait_until

PROMPTS = ["def ", "value = alpha_1(beta", "class Gamma:\n    "]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "size": {"type": "integer"}},
    "required": ["name", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def export(tiny_data: Path, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("core") / "tiny", tiny_data / "tokenizer.json")


def _outputs(server: LiveServer) -> dict:
    """Greedy completions (n=2 each, with logprobs), a streamed chat reply and a JSON-schema
    reply: everything that crosses the process boundary."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    out: dict = {}
    r = c.completions.create(
        model=server.model, prompt=PROMPTS, max_tokens=10, temperature=0, n=2, logprobs=2
    )
    out["completions"] = [(ch.index, ch.text, ch.finish_reason, ch.logprobs.top_logprobs) for ch in r.choices]
    chat = [{"role": "user", "content": "def alpha():"}]
    stream = c.chat.completions.create(
        model=server.model, messages=chat, max_tokens=12, temperature=0, stream=True
    )
    out["stream"] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    r = c.chat.completions.create(
        model=server.model,
        messages=chat,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}},
    )
    out["json"] = (r.choices[0].message.content, r.choices[0].finish_reason)
    return out


def test_engine_process_serves_what_the_thread_serves(export):
    outputs, reads = {}, {}
    for process in (False, True):
        s = LiveServer(export, process=process)
        try:
            outputs[process] = _outputs(s)
            wait_until(lambda s=s: s.engine.load().running == 0, 30, "requests still running")
            health = httpx.get(s.url + "/health").json()
            metrics = httpx.get(s.url + "/metrics").text
            reads[process] = (
                health,
                [ln for ln in metrics.splitlines() if ln.startswith("stratus_kv_blocks ")],
            )
        finally:
            assert s.stop() == 0
    assert outputs[True] == outputs[False]
    text, reason = outputs[True]["json"]
    if reason == "stop":  # the grammar ended it: a whole document of the schema
        doc = json.loads(text)
        assert set(doc) == {"name", "size"} and isinstance(doc["size"], int)
    assert reads[True] == reads[False]  # /health and the pool's size on /metrics, as the thread's
    health, blocks = reads[True]
    assert health == {"status": "ok", "running": 0, "waiting": 0}
    assert blocks and float(blocks[0].split()[-1]) > 0


@pytest.fixture
def stoppable(export):
    """A process engine with one running row and one queue place; the test stops and
    continues the engine's process with SIGSTOP and SIGCONT."""
    s = LiveServer(export, process=True, max_batch=1, max_queue=1)
    yield s
    with contextlib.suppress(ProcessLookupError):
        os.kill(s.engine.pid, signal.SIGCONT)
    s.stop()


def _stream(url: str, body: dict, got: list) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        got.append((r.status_code, "".join(r.iter_lines())))


def test_the_http_process_answers_and_bounds_the_queue_while_the_engine_is_stopped(stoppable):
    """The server's count of outstanding sequences bounds the queue without asking the
    engine, and /health answers while the engine's process is stopped."""
    s = stoppable
    body = {"model": s.model, "prompt": "def ", "max_tokens": 8, "temperature": 0, "stream": True}
    os.kill(s.engine.pid, signal.SIGSTOP)
    got: list = []
    clients = [threading.Thread(target=_stream, args=(s.url, body, got)) for _ in range(2)]
    for t in clients:
        t.start()
    wait_until(lambda: len(s.engine._requests) == 2, 30, "the two requests were not accepted")
    r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
    assert (
        r.status_code == 429
        and r.json()["error"]["code"] == "queue_full"
        and int(r.headers["retry-after"]) >= 1
    )
    too_many = httpx.post(s.url + "/v1/completions", json={**body, "n": 3}, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    bad = httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 10**6}, timeout=30)
    assert bad.status_code == 400
    assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    os.kill(s.engine.pid, signal.SIGCONT)
    for t in clients:
        t.join(120)
    assert [code for code, _ in got] == [200, 200] and all(text.endswith("data: [DONE]") for _, text in got)
    wait_until(s.engine.idle, 30, "the engine kept a finished request")


def test_a_client_that_leaves_frees_its_row_in_the_engine_process(stoppable):
    s = stoppable
    body = {
        "model": s.model,
        "prompt": "x",
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first token: it runs; then hang up
    wait_until(s.engine.idle, 30, "a disconnected stream kept its row")
    wait_until(lambda: s.engine.load().running == 0, 30, "the engine still runs the request")
    assert (
        httpx.get(s.url + "/metrics").text.count('stratus_request_finish_total{reason="cancelled"} 1.0') == 1
    )


def test_a_killed_engine_process_fails_its_requests_and_ends_the_server(export):
    s = LiveServer(export, process=True, max_batch=1)
    try:
        body = {"model": s.model, "prompt": "x", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        os.kill(
            s.engine.pid, signal.SIGSTOP
        )  # so that the request is surely outstanding when the engine dies
        got: list = []
        t = threading.Thread(
            target=lambda: got.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60))
        )
        t.start()
        wait_until(lambda: len(s.engine._requests) == 1, 30, "the request was not accepted")
        os.kill(s.engine.pid, signal.SIGKILL)
        t.join(60)
        assert got[0].status_code == 503 and got[0].json()["error"]["code"] == "engine_dead"
        wait_until(lambda: not s.thread.is_alive(), 30, "the server kept running without its engine")
    finally:
        code = s.stop()
    assert code == ENGINE_DIED


def test_a_model_the_engine_process_cannot_load_is_one_error_line(tmp_path):
    from stratus.errors import StratusError
    from stratus.inference.core import EngineProcess
    from stratus.inference.engine import EngineConfig

    with pytest.raises(StratusError, match="not found"):
        EngineProcess(str(tmp_path / "missing"), EngineConfig(), "cpu", start_timeout_s=120)
