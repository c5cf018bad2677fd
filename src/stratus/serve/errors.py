"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
status that says what the client should do: 400 fix the request, 401 fix the key, 404 fix
the model name, 413 send less, 429 retry after Retry-After seconds, 500 this request failed
(the server goes on), 503 go elsewhere. A 500 never carries the exception's text: that goes
to the log, under the request id that the body and the x-request-id header give."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("stratus.serve")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            # a message may quote the client's own text (a field name, a key), which may hold a
            # lone surrogate that no UTF-8 response can carry: escape it, never fail on it
            "message": message.encode("utf-8", "backslashreplace").decode("utf-8"),
            "type": TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def response(e: APIError) -> JSONResponse:
    return JSONResponse(body(e.status, e.message, e.param, e.code), e.status, headers=e.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic reports a union's failure once per member; the field's name is what matters
    param = next((p for p in loc if not p.isdigit() and "[" not in p and p not in ("str", "list")), None)
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":  # never accepted and ignored
        return f"{where}: this server does not implement this field (see /openapi.json); remove it", param
    return f"{where}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(body(400, message, param, None), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = request.scope.get("state", {}).get("request_id", "?")
        log.error("request %s failed", rid, exc_info=exc)
        message = f"the server could not complete this request (request id {rid})"
        return JSONResponse(body(500, message, code="server_error"), 500)
