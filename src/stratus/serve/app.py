"""The OpenAI-compatible HTTP API on the engine (FastAPI).

Every check that can fail (key, body size, fields, model, context, queue, engine health)
runs before a response starts, so a streaming client gets a proper status and error body
rather than a broken stream. Tokens travel from the engine's thread to the event loop
through one asyncio queue per API call. Tokenizing and rendering the chat template run in
worker threads: a long prompt never holds up the event loop, and so never /health.
"""

# No `from __future__ import annotations`: FastAPI must see the request classes that
# create_app builds for the served model, which string annotations would hide.
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from tokenizers import Tokenizer

from stratus.data.chat_template import ChatTemplate, find_template
from stratus.data.tokenizer import eos_id
from stratus.inference import grammar
from stratus.inference.core import EngineProcess
from stratus.inference.engine import Engine
from stratus.inference.prompt import Encoded, encode_prompt
from stratus.inference.request import (
    ContextOverflow,
    EngineDead,
    Event,
    NeverFits,
    QueueFull,
    RequestParams,
)
from stratus.serve import errors, openapi, wire
from stratus.serve.errors import APIError
from stratus.serve.gate import Gate
from stratus.serve.metrics import CountRequests, Metrics, Tracker
from stratus.serve.protocol import SEED_LIMIT, Limits, _Sampling, request_models
from stratus.serve.tools import ToolParser
from stratus.serve.tools import grammar as tool_grammar
from stratus.serve.tools import parse as parse_tools

log = logging.getLogger("stratus.serve")
MiB = 2**20


@dataclass
class ServerState:
    engine: Engine | EngineProcess  # in this process, or in its own (inference/core.py)
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    template: ChatTemplate = field(default_factory=find_template)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics | None = None
    max_body_bytes: int = 4 * MiB  # a larger body is a 413, refused before it is read

    def __post_init__(self):
        self.metrics = self.metrics or Metrics(self.engine)
        self.eos = eos_id(self.tokenizer)
        # No token decodes to more characters than the longest vocabulary entry (byte-level
        # BPE spells every byte as one character), so a text longer than context x that, with
        # a margin for normalizers that merge characters, can never fit: it is refused
        # without being tokenized, which bounds the tokenizer's work per request.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 4 * self.engine.capacity.context * longest


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="stratus", summary="OpenAI-compatible API for a stratus model")
    errors.install(app)
    # the last added is the outermost: every response is counted, the gate's 401s and 413s too
    app.add_middleware(Gate, api_key=state.api_key, max_body_bytes=state.max_body_bytes)
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.state.stratus = state
    ChatRequest, CompletionRequest = request_models(
        Limits(
            vocab=state.engine.capacity.vocab_size,
            context=state.engine.capacity.context,
            sequences=state.engine.capacity.slots + state.engine.capacity.max_queue,
        )
    )

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse(errors.body(503, "the engine is not running", code="engine_dead"), 503)
        load = state.engine.load()
        return {"status": "ok", "running": load.running, "waiting": load.waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        _check_model(state, name)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(state, body.model)
        messages = [_message(m) for m in body.messages]
        _check_length(state, sum(len(m["content"]) for m in messages), "messages")
        use = ToolUse.of(body)
        try:
            text = await run_in_threadpool(state.template.render, messages, True, use.tools)
        except Exception as e:  # a model's own template may reject a conversation (roles out of order)
            raise APIError(
                400, f"the chat template could not render these messages: {e}", "messages"
            ) from None
        params = _params(body, body.max_completion_tokens or body.max_tokens, state.template.stop)
        params = replace(
            params,
            stop_token_ids=state.template.stop_ids(state.tokenizer),
            grammar=use.grammar or _format_grammar(body),
        )
        if body.logprobs:
            params = replace(params, logprobs=body.top_logprobs or 0)
        ids = await run_in_threadpool(_encode_all, state, [text], False)
        # which field's grammar the engine may refuse (it compiles it against the vocabulary)
        source = "tools" if use.grammar else "response_format"
        return await _serve(
            state, request, body, ids, params, chat=True, tool_names=use.parse, grammar_of=source
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as token ids
        _check_length(state, sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
        # echo with logprobs scores the prompt as the model reads it: no token healing
        scored = body.echo and body.logprobs is not None
        ids = await run_in_threadpool(_encode_all, state, prompts, not scored)
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, ())
        # the model's end of turn ends a completion too, as its generation_config says
        params = replace(params, stop_token_ids=state.template.stop_ids(state.tokenizer))
        if body.logprobs is not None:
            params = replace(
                params, logprobs=body.logprobs, prompt_logprobs=body.logprobs if scored else None
            )
        echo = None
        if body.echo:
            # a text's first token is the end-of-text stratus puts first, not echoed; token ids
            # are echoed from the first, which has no logprob (nothing comes before it)
            echo = [
                Echo(p, []) if isinstance(p, str) else Echo(state.tokenizer.decode(p), [(p[0], None, None)])
                for p in prompts
            ]
        return await _serve(state, request, body, ids, params, chat=False, echo=echo)

    openapi.install(app, state.api_key is not None)
    return app


def _message(m) -> dict:
    """A message as chat templates take it (transformers' convention: a call's arguments as
    an object; text that is not JSON is rendered as the string it is)."""
    out: dict = {"role": m.role, "content": m.text()}
    if getattr(m, "tool_calls", None):
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": _args(c.function)},
            }
            for c in m.tool_calls
        ]
    if getattr(m, "tool_call_id", None):
        out["tool_call_id"] = m.tool_call_id
    return out


def _args(fn) -> object:
    try:
        return json.loads(fn.arguments)
    except json.JSONDecodeError:
        return fn.arguments


@dataclass
class Echo:
    """A prompt echoed before its completion, and the logprob entries that open it."""

    text: str
    head: list


@dataclass
class ToolUse:
    """What a request's tools ask of the server: the tools to render, the grammar that
    forces a call (tool_choice "required" or a named function), and the names whose calls
    are parsed out of the output (none when tool_choice is "none")."""

    tools: list[dict] | None = None
    grammar: str | None = None
    parse: set[str] | None = None

    @classmethod
    def of(cls, body) -> "ToolUse":
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none"):
                raise APIError(
                    400, "tool_choice needs tools: send the tools it may choose from", "tool_choice"
                )
            return cls()
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) < len(names):
            raise APIError(400, "two tools have the same name: give each function its own", "tools")
        if not isinstance(choice, str) and choice is not None:
            choice = choice.model_dump()
            if choice["function"]["name"] not in names:
                raise APIError(
                    400,
                    f"tool_choice names {choice['function']['name']!r}, which is not among the tools",
                    "tool_choice",
                )
        choice = choice or "auto"
        forced = tool_grammar(tools, choice, body.parallel_tool_calls)
        if forced and body.response_format and body.response_format.type != "text":
            raise APIError(
                400,
                "response_format and a forced tool_choice both decide the output: send one of them",
                "response_format",
            )
        return cls(tools, forced, None if choice == "none" else set(names))


def _format_grammar(body) -> str | None:
    """The grammar of the output `response_format` asks for, or None for free text."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar.json_schema({"type": "object"})
    try:
        return grammar.json_schema(fmt.json_schema.schema_ or {})
    except grammar.GrammarError as e:
        raise APIError(400, str(e), "response_format") from None


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "stratus"}


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
            "model",
            "model_not_found",
        )


def _check_length(state: ServerState, chars: int, param: str) -> None:
    if chars > state.max_prompt_chars:
        raise APIError(
            400,
            f"this model's maximum context length is {state.engine.capacity.context} tokens, and {chars} "
            "characters of text cannot fit in it: shorten the input",
            param,
            "context_length_exceeded",
        )


def _encode_all(state: ServerState, prompts: list, heal: bool) -> list[Encoded]:
    """Each prompt as the engine takes it (worker thread): a text by the rule `stratus
    generate` shares (inference/prompt.py: end-of-text first, token healing for a completion;
    a chat template's last token is its own, never healed), token ids as given."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            out.append(Encoded(list(p)))
            continue
        out.append(encode_prompt(state.tokenizer, p, state.eos, heal))
    return out


def _params(body: _Sampling, max_tokens: int | None, implicit_stop: tuple[str, ...]) -> RequestParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:
        temperature = 0.0  # the limit of an ever smaller nucleus: the likeliest token
    bias = [(int(key), float(value)) for key, value in (body.logit_bias or {}).items()]  # checked by protocol
    return RequestParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p,
        seed=body.seed,
        stop=tuple(s for s in stop if s) + implicit_stop,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple(bias),
        ignore_eos=body.ignore_eos,
    )


async def _serve(
    state: ServerState,
    request: Request,
    body: _Sampling,
    encoded: list[Encoded],
    params: RequestParams,
    chat: bool,
    echo: list[Echo] | None = None,
    tool_names: set[str] | None = None,
    grammar_of: str | None = None,
):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    def deliver(index: int):
        return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

    items, k = [], 0
    prompts = [e.ids for e in encoded]
    for e in encoded:
        healed = replace(params, heal_ids=e.heal_ids, heal_text=e.heal_text)
        for j in range(body.n):
            seeded = replace(healed, seed=None if params.seed is None else (params.seed + j) % SEED_LIMIT)
            items.append((e.ids, seeded, deliver(k)))
            k += 1
    try:
        reqs = state.engine.submit_many(items)
    except ContextOverflow as e:
        raise APIError(400, str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
    except NeverFits as e:
        raise APIError(400, str(e), "n", "too_many_sequences") from None
    except grammar.GrammarError as e:
        raise APIError(400, str(e), grammar_of) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except QueueFull as e:
        retry = str(state.engine.retry_after())
        raise APIError(
            429,
            f"the server is busy ({e}): retry after {retry} s",
            None,
            "queue_full",
            {"Retry-After": retry},
        ) from None
    except EngineDead as e:
        raise APIError(503, str(e), None, "engine_dead") from None
    request.state.submitted = True  # from here on the engine counts how each sequence ends
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    trackers = [Tracker(state.metrics, r) for r in reqs]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    want_logprobs = params.logprobs is not None
    prompt_tokens = sum(len(p) for p in prompts)

    def cancel_unfinished() -> None:
        for r in reqs:
            if r.finish_reason is None:
                state.engine.cancel(r)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = {
            "rid": rid,
            "created": created,
            "chat": chat,
            "n": body.n,
            "echo": echo,
            "logprobs": want_logprobs,
            "include_usage": include_usage,
            "prompt_tokens": prompt_tokens,
            "request": request,
            "tool_names": tool_names,
        }
        gen = _stream(state, events, reqs, trackers, call)
        return StreamingResponse(
            _guarded(gen, cancel_unfinished),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    choices = [wire.Choice() for _ in reqs]
    watcher = asyncio.ensure_future(_on_disconnect(request, lambda: events.put_nowait((-1, None))))
    try:
        remaining = len(reqs)
        while remaining:
            i, ev = await events.get()
            if ev is None:  # the client hung up: its sequences leave the engine at the next step
                return JSONResponse(errors.body(400, "client disconnected"), 499)
            trackers[i].see(ev)
            if ev.finish_reason == "error":
                raise _failed(request, ev)
            if ev.finish_reason == "cancelled":  # a live client's request: the engine is stopping
                raise APIError(503, "the engine stopped", None, "engine_dead")
            if ev.finish_reason == "timeout":
                raise _overloaded(state, ev)
            choices[i].add(ev)
            remaining -= ev.finish_reason is not None
    finally:
        watcher.cancel()
        cancel_unfinished()
    if echo:
        for i, c in enumerate(choices):
            e = echo[i // body.n]
            c.text.insert(0, e.text)
            if params.prompt_logprobs is not None:
                c.logprobs[:0] = e.head + (c.prompt_logprobs or [])
    if tool_names:
        for c in choices:
            content, c.tool_calls = parse_tools("".join(c.text), tool_names)
            c.text = [content] if content else []
            if c.tool_calls and c.finish_reason == "stop":
                c.finish_reason = "tool_calls"
    use = wire.usage(prompt_tokens, sum(len(c.tokens) for c in choices))
    build = wire.chat_response if chat else wire.completion_response
    return build(rid, created, state.model_name, choices, want_logprobs, state.tokenizer, use)


async def _on_disconnect(request: Request, then) -> None:
    """Call `then` when the client closes the connection. The body has been read, so the
    next ASGI message is http.disconnect, which the server sends as soon as the socket goes:
    no polling, and the client's sequences are cancelled before the engine's next step."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    then()


def _failed(request: Request, ev: Event) -> APIError:
    """One request failed in the engine (the engine itself goes on, or is stopping): a 500
    that names the request id the log has, and nothing of the internals."""
    rid = request.scope.get("state", {}).get("request_id", "?")
    if ev.error and ev.error.startswith("engine failed"):
        log.error("request %s: %s", rid, ev.error)
        return APIError(503, "the engine stopped", None, "engine_dead")
    log.error("request %s failed in the engine: %s", rid, ev.error)
    return APIError(
        500, f"the server could not complete this request (request id {rid})", None, "server_error"
    )


def _overloaded(state: ServerState, ev: Event) -> APIError:
    """A request that waited past --queue-timeout to start: 503, with when to retry."""
    retry = str(state.engine.retry_after())
    return APIError(503, f"{ev.error}: retry after {retry} s", None, "queue_timeout", {"Retry-After": retry})


async def _guarded(gen: AsyncIterator[str], on_exit) -> AsyncIterator[str]:
    """Whatever ends the stream (done, client gone and the task cancelled, server
    stopping), the requests still running are cancelled and their slots freed."""
    try:
        async for piece in gen:
            yield piece
    finally:
        on_exit()


async def _stream(state, events, reqs, trackers, call: dict) -> AsyncIterator[str]:
    tok, name, chat = state.tokenizer, state.model_name, call["chat"]
    make = wire.chat_chunk if chat else wire.completion_chunk
    echo, n, include_usage = call["echo"], call["n"], call["include_usage"]
    offsets = [0] * len(reqs)
    scored = echo is not None and call["logprobs"]
    opened = [False] * len(reqs)
    names = call["tool_names"]
    parsers = [ToolParser(names) for _ in reqs] if names else None

    def chunk(i: int, text: str | None, lp_items: list | None, finish: str | None, delta=None) -> str:
        if chat:
            delta = delta if delta is not None else {} if text is None else {"content": text}
            lp = wire.chat_logprobs(tok, lp_items) if lp_items else None
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = wire.completion_logprobs(tok, lp_items, offsets[i]) if lp_items else None
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return wire.sse(make(call["rid"], call["created"], name, [choice], include_usage))

    for i in range(len(reqs)):
        if chat:  # OpenAI opens every choice with the role
            yield wire.sse(
                make(
                    call["rid"],
                    call["created"],
                    name,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    include_usage,
                )
            )
        elif echo and not scored:  # with its logprobs, a prompt goes out with the first event
            yield chunk(i, echo[i // n].text, None, None)
            offsets[i] = len(echo[i // n].text)
    completion_tokens, remaining = 0, len(reqs)
    while remaining:
        batch = [await events.get()]
        while not events.empty():  # events that queued up meanwhile go out in one write
            batch.append(events.get_nowait())
        out: list[str] = []
        for i, ev in batch:
            trackers[i].see(ev)
            if ev.finish_reason in ("error", "cancelled", "timeout"):
                # the status line is long gone: a late failure travels as an error event, as OpenAI's do
                if ev.finish_reason == "error":
                    e = _failed(call["request"], ev)
                elif ev.finish_reason == "timeout":
                    e = _overloaded(state, ev)
                else:
                    e = APIError(503, "the engine stopped", None, "engine_dead")
                out.append(wire.sse(errors.body(e.status, e.message, None, e.code)))
                yield "".join(out)
                return
            if scored and not opened[i]:
                opened[i] = True
                e = echo[i // n]
                out.append(chunk(i, e.text, e.head + (ev.prompt_logprobs or []), None))
                offsets[i] = len(e.text)
            want_lp = call["logprobs"] and ev.token is not None
            lp = [(ev.token, ev.logprob, ev.top_logprobs or [])] if want_lp else None
            finish = ev.finish_reason
            if parsers:  # content and tool calls, as the parser tells them apart
                deltas = parsers[i].feed(ev.text) + (parsers[i].flush() if finish else [])
                for k, d in enumerate(deltas or ([{}] if lp else [])):
                    out.append(chunk(i, None, lp if k == 0 else None, None, d))
                if finish == "stop" and parsers[i].calls:
                    finish = "tool_calls"
            elif ev.text or lp:
                out.append(chunk(i, ev.text, lp, None))
                offsets[i] += len(ev.text)
            completion_tokens += ev.token is not None
            if finish is not None:
                remaining -= 1
                out.append(chunk(i, None if chat else "", None, finish))
        if out:
            yield "".join(out)
    if include_usage:
        final = make(call["rid"], call["created"], name, [], False)
        final["usage"] = wire.usage(call["prompt_tokens"], completion_tokens)
        yield wire.sse(final)
    yield wire.sse("[DONE]")
