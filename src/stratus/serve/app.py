"""The OpenAI-compatible HTTP API on the engine (FastAPI).

Every check that can fail (key, model, body, context, queue, engine health) runs before a
response starts, so a streaming client gets a proper status and error body rather than a
broken stream. Tokens travel from the engine's thread to the event loop through one
asyncio queue per API call.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tokenizers import Tokenizer

from stratus.data.tokenizer import eos_id
from stratus.inference.engine import Engine
from stratus.inference.request import ContextOverflow, EngineDead, Event, QueueFull, RequestParams
from stratus.serve import errors, wire
from stratus.serve.chat_template import ChatTemplate, find_template
from stratus.serve.errors import APIError
from stratus.serve.metrics import CountRequests, Metrics, Tracker
from stratus.serve.protocol import ChatCompletionRequest, CompletionRequest, _Sampling


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    template: ChatTemplate = field(default_factory=find_template)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics | None = None

    def __post_init__(self):
        self.metrics = self.metrics or Metrics(self.engine)
        self.eos = eos_id(self.tokenizer)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="stratus", summary="OpenAI-compatible API for a stratus model")
    errors.install(app)
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.state.stratus = state

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), state.api_key.encode()
        ):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse(errors.body(503, "the engine is not running", code="engine_dead"), 503)
        return {"status": "ok", "running": state.engine.running(), "waiting": state.engine.queue_depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorize)])
    async def model(name: str):
        _check_model(state, name)
        return _model_card(state)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = state.template.render(messages)
        except Exception as e:  # a model's own template may reject a conversation (roles out of order)
            raise APIError(
                400, f"the chat template could not render these messages: {e}", "messages"
            ) from None
        params = _params(body, body.max_completion_tokens or body.max_tokens, state.template.stop)
        if body.logprobs:
            params = replace(params, logprobs=body.top_logprobs or 0)
        return await _serve(state, request, body, [_encode(state, text)], params, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as token ids
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        ids = [_encode(state, p) if isinstance(p, str) else list(p) for p in prompts]
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, ())
        if body.logprobs is not None:
            params = replace(params, logprobs=body.logprobs)
        echo = (
            [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts] if body.echo else None
        )
        return await _serve(state, request, body, ids, params, chat=False, echo=echo)

    return app


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


def _encode(state: ServerState, text: str) -> list[int]:
    """Documents began after end-of-text in training, so a prompt starts with one (as
    Llama's tokenizer puts BOS first); it counts as a prompt token in usage."""
    ids = state.tokenizer.encode(text, add_special_tokens=False).ids
    return ids if ids[:1] == [state.eos] else [state.eos, *ids]


def _params(body: _Sampling, max_tokens: int | None, implicit_stop: tuple[str, ...]) -> RequestParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16:
        raise APIError(400, "stop: at most 16 stop sequences", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:
        temperature = 0.0  # the limit of an ever smaller nucleus: the likeliest token
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or not -100 <= value <= 100:
            raise APIError(400, "logit_bias: keys are token ids, values lie in [-100, 100]", "logit_bias")
        bias.append((int(key), float(value)))
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
    prompts: list[list[int]],
    params: RequestParams,
    chat: bool,
    echo: list[str] | None = None,
):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def deliver(index: int):
        return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

    items, k = [], 0
    for ids in prompts:
        for j in range(body.n):
            seeded = replace(params, seed=None if params.seed is None else params.seed + j)
            items.append((ids, seeded, deliver(k)))
            k += 1
    try:
        reqs = state.engine.submit_many(items)
    except ContextOverflow as e:
        raise APIError(400, str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except QueueFull as e:
        raise APIError(
            429, f"the server is busy ({e}): retry later", None, "queue_full", {"Retry-After": "1"}
        ) from None
    except EngineDead as e:
        raise APIError(503, str(e), None, "engine_dead") from None
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
        }
        gen = _stream(state, events, reqs, trackers, call)
        return StreamingResponse(
            _guarded(gen, cancel_unfinished),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    choices = [wire.Choice() for _ in reqs]
    try:
        remaining = len(reqs)
        while remaining:
            try:
                i, ev = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(errors.body(400, "client disconnected"), 499)
                continue
            trackers[i].see(ev)
            if ev.finish_reason in ("error", "cancelled"):
                raise APIError(503, ev.error or "the engine stopped", None, "engine_dead")
            choices[i].add(ev)
            remaining -= ev.finish_reason is not None
    finally:
        cancel_unfinished()
    if echo:
        for i, c in enumerate(choices):
            c.text.insert(0, echo[i // body.n])
    use = wire.usage(prompt_tokens, sum(len(c.tokens) for c in choices))
    build = wire.chat_response if chat else wire.completion_response
    return build(rid, created, state.model_name, choices, want_logprobs, state.tokenizer, use)


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

    def chunk(i: int, text: str | None, lp_items: list | None, finish: str | None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
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
        elif echo:
            yield chunk(i, echo[i // n], None, None)
            offsets[i] = len(echo[i // n])
    completion_tokens, remaining = 0, len(reqs)
    while remaining:
        batch = [await events.get()]
        while not events.empty():  # events that queued up meanwhile go out in one write
            batch.append(events.get_nowait())
        out: list[str] = []
        for i, ev in batch:
            trackers[i].see(ev)
            if ev.finish_reason in ("error", "cancelled"):
                # the status line is long gone: a late failure travels as an error event, as OpenAI's do
                out.append(wire.sse(errors.body(503, ev.error or "the engine stopped", None, "engine_dead")))
                yield "".join(out)
                return
            want_lp = call["logprobs"] and ev.token is not None
            lp = [(ev.token, ev.logprob, ev.top_logprobs or [])] if want_lp else None
            if ev.text or lp:
                out.append(chunk(i, ev.text, lp, None))
                offsets[i] += len(ev.text)
            completion_tokens += ev.token is not None
            if ev.finish_reason is not None:
                remaining -= 1
                out.append(chunk(i, None if chat else "", None, ev.finish_reason))
        if out:
            yield "".join(out)
    if include_usage:
        final = make(call["rid"], call["created"], name, [], False)
        final["usage"] = wire.usage(call["prompt_tokens"], completion_tokens)
        yield wire.sse(final)
    yield wire.sse("[DONE]")
