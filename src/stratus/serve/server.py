"""Run the API under uvicorn. The listening socket is bound here, before anything starts,
so a port in use is a one-line error; a watchdog stops the server when the engine dies,
and the exit code says so (a supervisor such as systemd or Kubernetes restarts it).

Connections are bounded here, below HTTP: a client must finish a request's headers within
`header_timeout_s` of connecting (or of its previous response), an idle keep-alive
connection closes after `keep_alive_s`, and past `max_connections` open connections a new
one is answered 503 and closed."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from stratus.errors import StratusError
from stratus.reliability import EXIT_ENGINE_FAILED
from stratus.serve import errors
from stratus.serve.app import ServerState, create_app

log = logging.getLogger("stratus.serve")
ENGINE_DIED = EXIT_ENGINE_FAILED  # the engine's loop failed: a fault, which a supervisor restarts


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0  # from connecting (or the last response) to a whole request head
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; one more is answered 503 and closed


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP. Without it every keep-alive request waited ~40 ms for
    # Nagle's algorithm and the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StratusError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from None
    sock.listen(2048)
    return sock


@dataclass
class Running:
    """A server started in this process: `server.should_exit = True` stops it."""

    server: _Server
    sock: socket.socket
    state: ServerState
    engine_died: bool = False

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve(self) -> int:
        """Serve until stopped; the exit code: 0, 130 after Ctrl-C, or ENGINE_DIED."""
        self.state.engine.start()

        def watch() -> None:
            while not self.server.should_exit:
                if not self.state.engine.alive and self.server.started:
                    log.error("the engine stopped (%r): shutting the server down", self.state.engine.error)
                    self.engine_died = True
                    self.server.should_exit = True
                    return
                threading.Event().wait(0.2)

        threading.Thread(target=watch, name="stratus-engine-watchdog", daemon=True).start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.state.engine.stop()
            self.sock.close()
        if self.engine_died:
            return ENGINE_DIED
        # uvicorn re-raises the SIGINT it shut down for, but asyncio's runner may swallow it
        # when the serving task has already finished: the code must not depend on that race
        return 130 if signal.SIGINT in self.server.signals else 0


class _Server(uvicorn.Server):
    """uvicorn's server, remembering which signals asked it to stop."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame) -> None:
        self.signals.append(sig)
        super().handle_exit(sig, frame)


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for request heads and a connection cap.
    uvicorn has only a keep-alive timer, which any byte resets, so a client that sends a
    header a byte at a time, or nothing at all, would hold its connection for ever."""
    busy = errors.body(503, "too many open connections: retry later", code="connection_limit")
    refusal = _raw_response(503, json.dumps(busy).encode(), [("retry-after", "1")])

    class Guarded(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(refusal)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():  # waiting for the next request
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                log.info(
                    "closing a connection that sent no whole request head in %gs", limits.header_timeout_s
                )
                self.transport.close()

    return Guarded


def _raw_response(status: int, body: bytes, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers] + [f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def prepare_server(
    state: ServerState, host: str, port: int, log_level: str = "info", limits: Limits | None = None
) -> Running:
    limits = limits or Limits()
    sock = bind(host, port)
    config = uvicorn.Config(
        create_app(state),
        http=guarded_protocol(limits),
        log_level=log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=limits.keep_alive_s,
        access_log=log_level == "debug",
    )
    return Running(_Server(config), sock, state)
