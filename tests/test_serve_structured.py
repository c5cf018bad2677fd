"""Structured outputs and tools through the official openai client over real HTTP:
`response_format` (json_object, json_schema) and forced tool calls are held to their grammar,
a tool call round-trips (the call, then the tool's answer) streaming and not, and every
misuse is a 400 that names the field. The parser that tells content from calls is checked
on its own, piece by piece."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from stratus.serve.tools import ToolParser, parse
from tests.serving import LiveServer, make_export

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "city", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(tiny_data: Path, tmp_path_factory):
    # a context long enough for the tools the template renders into the prompt
    export = make_export(
        tmp_path_factory.mktemp("structured") / "tiny", tiny_data / "tokenizer.json", max_seq_len=1024
    )
    s = LiveServer(export)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_json_schema_output_validates_against_its_schema(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    greedy = client.chat.completions.create(
        model=server.model, messages=ASK, max_tokens=80, temperature=0, response_format=fmt
    )
    sampled = client.chat.completions.create(
        model=server.model, messages=ASK, max_tokens=80, temperature=1.0, seed=7, n=4, response_format=fmt
    )
    for choice in greedy.choices + sampled.choices:
        # the grammar ends the output where the document ends: a stop, never a cut
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    # the same request streamed gives the same document
    chunks = client.chat.completions.create(
        model=server.model, messages=ASK, max_tokens=80, temperature=0, response_format=fmt, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == greedy.choices[0].message.content
    )


def test_json_object_is_an_object_and_text_is_free(server, client):
    kw = dict(model=server.model, messages=ASK, max_tokens=60, temperature=1.0, seed=3)
    free = client.chat.completions.create(**kw, response_format={"type": "text"})
    plain = client.chat.completions.create(**kw)
    assert free.choices[0].message.content == plain.choices[0].message.content
    r = client.chat.completions.create(**kw, n=3, response_format={"type": "json_object"})
    for choice in r.choices:
        if choice.finish_reason == "stop":  # an object may be cut by max_tokens; a finished one parses
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_named_tool_call_round_trips_streaming_and_not(server, client):
    kw = dict(
        model=server.model,
        messages=ASK,
        max_tokens=150,  # the tiny tokenizer spells JSON nearly a byte a token
        temperature=0,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,  # the grammar then ends the output after the call
    )
    r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # streamed: the first delta of a call carries its id and name, the arguments follow
    calls: dict[int, dict] = {}
    finish = []
    for c in client.chat.completions.create(**kw, stream=True):
        for d in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
        assert not c.choices[0].delta.content
        finish += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
    assert finish == ["tool_calls"]
    assert [(v["name"], v["arguments"]) for v in calls.values()] == [("get_weather", call.function.arguments)]

    # the call and the tool's answer go back in: the conversation renders and is served
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    more = client.chat.completions.create(model=server.model, messages=history, tools=[WEATHER], max_tokens=5)
    rendered = server.state.template.render(
        [
            ASK[0],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)},
                    }
                ],
            },
            {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": call.id},
        ],
        tools=[WEATHER],
    )
    assert call.function.arguments in rendered and '{"sky": "clear"}' in rendered
    expected = 1 + len(server.tokenizer.encode(rendered, add_special_tokens=False).ids)
    assert more.usage.prompt_tokens == expected


def test_required_tool_choice_calls_one_of_the_tools(server, client):
    kw = dict(
        model=server.model, messages=ASK, temperature=1.0, tools=[WEATHER, TIME], tool_choice="required"
    )
    r = client.chat.completions.create(**kw, max_tokens=150, seed=11, n=3, parallel_tool_calls=False)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    # parallel calls (the default): one or more, each valid; max_tokens may cut a later one,
    # and a cut call is never given out as a call
    r = client.chat.completions.create(**kw, max_tokens=300, seed=5, n=2)
    for choice in r.choices:
        assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]}, "messages"),
    ],
)
def test_misuse_is_a_400_that_names_the_field(server, client, extra, param):
    body = {"model": server.model, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    if param is not None:
        assert e.value.body["param"] == param, e.value.body
    assert client.chat.completions.create(model=server.model, messages=ASK, max_tokens=2).choices  # still up


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, content, names",
    [
        (CALL, None, ["get_weather"]),
        ("Let me look. " + CALL + "\n" + CALL, "Let me look. ", ["get_weather", "get_weather"]),
        ("no call here <tool_ but text", "no call here <tool_ but text", []),
        (
            '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
            '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
            [],
        ),
        ("<tool_call>\n{not json\n</tool_call> after", "<tool_call>\n{not json\n</tool_call> after", []),
        ('cut <tool_call>\n{"name": "get_we', 'cut <tool_call>\n{"name": "get_we', []),
    ],
)
def test_parser_in_pieces_equals_parser_whole(text, content, names):
    whole_content, calls = parse(text, {"get_weather"})
    assert whole_content == content and [c["function"]["name"] for c in calls] == names
    if calls:
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    for cut in range(1, len(text)):  # every split point of a stream
        p = ToolParser({"get_weather"})
        deltas = p.feed(text[:cut]) + p.feed(text[cut:]) + p.flush()
        streamed = "".join(d.get("content", "") for d in deltas)
        assert (streamed or None if names else streamed) == content
        heads = [
            d["tool_calls"][0]["function"]["name"]
            for d in deltas
            if "tool_calls" in d and "id" in d["tool_calls"][0]
        ]
        assert heads == names
