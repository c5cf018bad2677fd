"""Run the API under uvicorn. The listening socket is bound here, before anything starts,
so a port in use is a one-line error; a watchdog stops the server when the engine dies,
and the exit code says so (a supervisor such as systemd or Kubernetes restarts it)."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from stratus.checkpoint.load import load_trained
from stratus.data.tokenizer import load_tokenizer
from stratus.errors import StratusError
from stratus.inference.engine import Engine, EngineConfig
from stratus.serve.app import ServerState, create_app
from stratus.serve.chat_template import find_template

log = logging.getLogger("stratus.serve")
ENGINE_DIED = 3  # exit code when the engine's loop failed


def open_engine(path: str | Path, config: EngineConfig, device: str = "auto", dtype: str = "float32"):
    """(engine, tokenizer, template, name): a run, checkpoint or export, ready to serve."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained(path, device)
    trained.model.to(getattr(torch, dtype))
    tokenizer = load_tokenizer(trained.tokenizer_path)
    template = find_template(Path(path), trained.source, trained.run_dir)
    engine = Engine(trained.model, tokenizer, config)
    name = (trained.run_dir or trained.source).resolve().name
    return engine, tokenizer, template, name


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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

    server: uvicorn.Server
    sock: socket.socket
    state: ServerState
    engine_died: bool = False

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve(self) -> int:
        """Serve until stopped; the exit code: 0, or ENGINE_DIED."""
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
        return ENGINE_DIED if self.engine_died else 0


def prepare_server(state: ServerState, host: str, port: int, log_level: str = "info") -> Running:
    sock = bind(host, port)
    config = uvicorn.Config(
        create_app(state), log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug"
    )
    return Running(uvicorn.Server(config), sock, state)
