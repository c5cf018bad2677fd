"""What every HTTP request passes before a route sees it (a plain ASGI wrapper, so that
streams are not buffered and disconnects stay visible):

- a request id, in the `x-request-id` response header and in every log line about it;
- the API key, checked before a byte of the body is read, so that a stranger's body is
  never parsed (and malformed JSON without a key is a 401, not a 400);
- the body limit: a declared Content-Length above it is a 413 at once, without reading;
  a chunked body is read only up to the limit. What passes is handed on whole.
"""

from __future__ import annotations

import hmac
import json
import uuid

from stratus.serve import errors

OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc")


def api_key_matches(header: str, api_key: str) -> bool:
    scheme, _, key = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), api_key.encode())


class Gate:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = "req-" + uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        keyed = self.api_key is not None and not scope["path"].startswith(OPEN_PATHS)
        if keyed and not api_key_matches(headers.get("authorization", ""), self.api_key):
            body = errors.body(401, "Incorrect API key provided.", code="invalid_api_key")
            return await _reply(send_with_id, 401, body)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > self.max_body:
                return await _reply(send_with_id, 413, self._too_large(int(declared)), close=True)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None  # the client left while sending; nobody to answer
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body:
                    return await _reply(send_with_id, 413, self._too_large(None), close=True)
            receive = _replay(b"".join(chunks), receive)
        return await self.app(scope, receive, send_with_id)

    def _too_large(self, declared: int | None) -> dict:
        size = f" ({declared / 2**20:.1f} MiB)" if declared is not None else ""
        return errors.body(
            413,
            f"the request body{size} exceeds this server's limit of {self.max_body / 2**20:g} MiB "
            "(stratus serve --max-body-mb): send a smaller request",
            code="request_too_large",
        )


def _replay(body: bytes, receive):
    """A receive that hands the app the body already read, then the real channel (which
    later brings http.disconnect, the signal that frees a gone client's slot)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the unread body is still on the wire: this connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
