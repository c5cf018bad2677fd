"""Fuzzing the live server: Schemathesis drives every operation of /openapi.json with
requests generated from the document itself (valid and invalid), and checks that no answer
is a 5xx, that every status, body and media type is the one the document states, and that
valid requests are accepted; a hypothesis property test sends random requests that are
valid by the schema and checks for a 2xx or a 4xx. Bounded in examples; the server must be
the same healthy process at the end."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.serving import LiveServer, make_export

KEY = "sk-fuzz"
CONTEXT = 512  # room for what the generators write: a prompt of a few hundred tokens


@pytest.fixture(scope="module")
def server(tiny_data: Path, tmp_path_factory):
    export = make_export(
        tmp_path_factory.mktemp("fuzz") / "tiny", tiny_data / "tokenizer.json", max_seq_len=CONTEXT
    )
    s = LiveServer(export, api_key=KEY, max_batch=4, max_queue=8)
    s.engine_thread = s.engine._thread
    yield s
    assert httpx.get(s.url + "/health").status_code == 200
    assert s.engine.alive and s.engine._thread is s.engine_thread
    assert s.stop() == 0


def _short(message):
    """A generated message cut to a size whose rendering fits the context."""
    if not isinstance(message, dict):
        return message
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = calls[:1]
        for call in calls[:1]:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                fn["arguments"] = fn["arguments"][:30]
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content[:60]
    elif isinstance(content, list):
        message["content"] = [
            {**part, "text": part["text"][:30]}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content[:2]
        ]
    return message


def _tools_within_rules(body: dict) -> None:
    """Rules about tools and formats that no JSON schema states: an embedded JSON schema (a
    tool's parameters, a response format's) must compile, a named tool_choice names one of
    the tools, tool names are distinct, and a forced tool choice comes without a
    response_format. Embedded schemas are dropped (any object is one to the document), one
    short tool is kept (the template renders it into the prompt), and tool_choice is auto."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        fmt["json_schema"].pop("schema", None)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        body["tools"] = tools[:1]
        fn = tools[0].get("function") if isinstance(tools[0], dict) else None
        if isinstance(fn, dict):
            fn.pop("parameters", None)
            if isinstance(fn.get("description"), str):
                fn["description"] = fn["description"][:30]
        if "tool_choice" in body:
            body["tool_choice"] = "auto"
    else:
        body.pop("tool_choice", None)


def test_schemathesis_finds_no_failure(server):
    positive = schemathesis.openapi.from_url(server.url + "/openapi.json")

    @positive.hook
    def map_body(context, body):
        # Valid requests: the model name is pinned to the served one, so that POSTs get
        # past the 404 and reach the engine. A prompt's tokens plus max_tokens must fit the
        # context and a batch of prompts times n the queue: rules across fields that no
        # JSON schema can state, so the generated sizes are kept within them.
        if isinstance(body, dict):
            body["model"] = server.model
            for key, most in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
                if isinstance(body.get(key), (int, float)) and not isinstance(body[key], bool):
                    body[key] = min(body[key], most)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                body["prompt"] = prompt[:2]
            if isinstance(body.get("messages"), list):  # a few short messages, as for prompts
                body["messages"] = [_short(m) for m in body["messages"][:3]]
            _tools_within_rules(body)
        return body

    # invalid requests go as generated: each breaks the schema somewhere, the model included
    negative = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in positive.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/health"}
    for schema, mode in ((positive, GenerationMode.POSITIVE), (negative, GenerationMode.NEGATIVE)):

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=schema.as_strategy(generation_mode=mode))
        def call(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

        call()


text = st.text(st.characters(codec="utf-8"), max_size=40)
numbers = {
    "temperature": st.one_of(st.just(0), st.floats(1e-5, 2)),
    "top_p": st.one_of(st.just(0), st.floats(1e-6, 1)),
    "top_k": st.integers(-1, 2**31 - 1),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 6),
    "logit_bias": st.dictionaries(st.integers(0, 319).map(str), st.floats(-100, 100), max_size=4),
    "stop": st.one_of(text, st.lists(text, max_size=4)),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}
chat_body = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                    "content": text,
                }
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional={**numbers, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)},
)
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(text.filter(bool), st.lists(st.integers(0, 319), min_size=1, max_size=20))},
    optional={**numbers, "logprobs": st.integers(0, 20), "echo": st.booleans()},
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        chat_body.map(lambda b: ("/v1/chat/completions", b)),
        completion_body.map(lambda b: ("/v1/completions", b)),
    )
)
def test_random_valid_requests_get_2xx_or_4xx(server, call):  # fmt: skip
    path, body = call
    r = httpx.post(
        server.url + path,
        json={"model": server.model, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert 200 <= r.status_code < 500, (body, r.status_code, r.text)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
