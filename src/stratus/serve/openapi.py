"""/openapi.json as the server really behaves: every status a route can send, each with
the OpenAI-shaped error body, and the real media types (event streams, Prometheus text).

FastAPI documents a 422 for every body it validates; this server sends those as 400 (what
OpenAI's clients expect), so the 422s are replaced, not added to."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from stratus.serve.protocol import ErrorResponse

WHY = {
    "400": "The request is malformed or out of range; the message names the field.",
    "401": "The API key is missing or wrong.",
    "404": "No such model on this server.",
    "413": "The request body is larger than --max-body-mb.",
    "429": "The queue is full; retry after Retry-After seconds.",
    "500": "This request failed; the server goes on. The message gives the request id.",
    "503": "The engine is not running, or the connection limit is reached.",
}
GENERATION = ("/v1/chat/completions", "/v1/completions")
# One server-sent event of a stream: a JSON chunk (or an error) in `data`, and last `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "a chunk or an error object as JSON, or [DONE]"},
    },
}


def _statuses(path: str, method: str, keyed: bool) -> list[str]:
    out = ["500", "503"]
    if keyed and path.startswith("/v1/"):
        out.append("401")
    if path.startswith("/v1/models/"):
        out += ["400", "404"]
    if method == "post":
        out += ["400", "404", "413", "429"]
    return sorted(set(out))


def install(app: FastAPI, keyed: bool) -> None:
    def build() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        schemas["ErrorResponse"].pop("$defs", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for status in _statuses(path, method, keyed):
                    entry = {"description": WHY[status], "content": error}
                    if status == "429":
                        entry["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
                    responses[status] = entry
                if path in GENERATION:
                    ok = responses["200"]
                    ok["description"] = (
                        "The completion; with stream=true, server-sent events ending in [DONE]."
                    )
                    ok["content"] = {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": SSE_EVENT},
                    }
                if keyed and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        if keyed:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
