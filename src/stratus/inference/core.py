"""The engine in a process of its own (vLLM's EngineCore), so that the HTTP layer and the
engine's loop do not share one interpreter lock.

The HTTP process keeps everything that answers a client before the engine is involved:
tokenizing, the chat template, and the checks of `engine.check` and `engine.admit` against
the engine's `Capacity`, with the count of its own outstanding sequences, which is the
engine's count of waiting and running ones or an upper bound of it (a sequence is counted
out when its last event arrives). A request the server accepts is sent, never answered;
the core sends back each batch of events in one message with its `Load`.

The child owns the model, the KV pool and the loop. Messages are pickles over a pipe:
  to the core:   ("add", [(id, arrival, prompt, params), ...]) | ("cancel", id) | ("stop",)
  from the core: ("ready", Capacity, Source) | ("failed", message)
                 ("events", [(id, Event), ...], Load) | ("ended", error or None)
Arrival times cross the boundary as they are: time.monotonic() is the system's clock.

If the core dies (a failed forward, or killed), every outstanding request ends with an
"engine failed" error and `alive` turns false: the server exits as it does when the
engine's thread dies. If the HTTP process dies, the pipe's end tells the core to stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable
from functools import cached_property
from multiprocessing import util as mp_util

import torch

from stratus.errors import StratusError
from stratus.inference.engine import Capacity, EngineConfig, Load, admit, check
from stratus.inference.grammar import Grammars
from stratus.inference.open import Source, load_engine
from stratus.inference.request import EngineDead, Event, Request, RequestParams

log = logging.getLogger("stratus.engine")


def _core(conn, path: str, config: EngineConfig, device: str, dtype: str, threads: int) -> None:
    """The child process: load the engine, then relay requests in and events out."""
    # Ctrl-C, or a TERM sent to the whole process group (systemd does), reaches this process
    # too: the server stops it in order, its requests ending "cancelled" rather than failed;
    # if the server is killed, the pipe's end stops it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    try:
        engine, source = load_engine(path, config, device, dtype)
    except Exception as e:
        conn.send(("failed", str(e) if isinstance(e, StratusError) else repr(e)))
        return
    send_lock = threading.Lock()
    outbox: queue.SimpleQueue[tuple[int, Event] | None] = queue.SimpleQueue()
    requests: dict[int, Request] = {}
    engine.on_finish = lambda req: requests.pop(req.id, None)

    def send_events() -> None:
        # Everything ready goes in one message: one pickle and one wake-up of the HTTP
        # process a step, not one a token.
        while (item := outbox.get()) is not None:
            batch = [item]
            while True:
                try:
                    more = outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    outbox.put(None)
                    break
                batch.append(more)
            with send_lock:
                _post(conn, ("events", batch, engine.load()))

    sender = threading.Thread(target=send_events, name="stratus-core-sender", daemon=True)
    sender.start()
    with send_lock:
        _post(conn, ("ready", engine.capacity, source))
    engine.start()
    try:
        while engine.alive:
            if not conn.poll(0.1):
                continue
            msg = conn.recv()
            if msg[0] == "add":
                _add(engine, requests, outbox, msg[1])
            elif msg[0] == "cancel" and (req := requests.get(msg[1])) is not None:
                engine.cancel(req)
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):  # the HTTP process is gone
        pass
    finally:
        engine.stop()  # what is left ends "cancelled", through the outbox
        outbox.put(None)
        sender.join(10)
        with send_lock:
            _post(conn, ("ended", None if engine.error is None else repr(engine.error)))


def _add(engine, requests: dict[int, Request], outbox: queue.SimpleQueue, items: list) -> None:
    reqs = [
        Request(prompt, params, lambda ev, rid=rid: outbox.put((rid, ev)), id=rid, arrival=arrival)
        for rid, arrival, prompt, params in items
    ]
    for r in reqs:
        requests[r.id] = r
    try:
        engine.enqueue(reqs)
    except Exception as e:  # cannot happen while the server's count is an upper bound; if it does, say so
        for r in reqs:
            requests.pop(r.id, None)
            outbox.put((r.id, Event(finish_reason="error", error=f"the engine refused it: {e}")))


class EngineProcess:
    """What the HTTP process sees of an engine that runs in a child process: the calls the
    server makes of an `Engine` (submit_many, cancel, alive, load, retry_after, ...)."""

    def __init__(
        self,
        path: str,
        config: EngineConfig,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        start_timeout_s: float | None = None,
    ):
        ctx = mp.get_context("spawn")  # never fork a process that may hold torch's threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_core,
            args=(child, str(path), config, device, dtype, threads),
            name="stratus-engine-core",
            daemon=True,
        )
        self._proc.start()
        child.close()
        # The core ignores SIGTERM (the server stops it in order), so multiprocessing's own
        # exit handler, which terminates and joins daemonic children, would wait for ever on
        # a core nobody stopped (an error before the server started): this runs first.
        self._shutdown = mp_util.Finalize(self, _shutdown, args=(self._conn, self._proc), exitpriority=100)
        msg = self._wait_ready(start_timeout_s)
        if msg[0] == "failed":
            self._shutdown()
            raise StratusError(msg[1])
        self.capacity: Capacity = msg[1]
        self.source: Source = msg[2]
        self.tokenizer = self.source.tokenizer()
        self.error: str | None = None
        self.on_finish: Callable[[Request], None] | None = None
        self._requests: dict[int, Request] = {}
        self._load = Load(free_blocks=self.capacity.blocks)
        self._lock = threading.RLock()  # submit_many sends while holding it
        self._ended = threading.Event()
        self._receiver: threading.Thread | None = None

    def _wait_ready(self, timeout: float | None):
        """The core's first message; a core that died while loading closes its end of the
        pipe, which wakes the poll as a message would."""
        if not self._conn.poll(timeout):
            self._shutdown()
            raise StratusError(f"the engine process did not load the model in {timeout:g} s")
        try:
            return self._conn.recv()
        except EOFError:
            self._shutdown()
            code = self._proc.exitcode
            raise StratusError(
                f"the engine process exited while loading the model (exit code {code})"
            ) from None

    @cached_property
    def grammars(self) -> Grammars:
        return Grammars.of(self.tokenizer)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> EngineProcess:
        self._receiver = threading.Thread(target=self._receive, name="stratus-core-receiver", daemon=True)
        self._receiver.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._send(("stop",))
        if self._receiver is not None:  # the last events come in: the unfinished requests' "cancelled"
            self._ended.wait(timeout)
        self._shutdown()

    @property
    def alive(self) -> bool:
        return not self._ended.is_set() and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # ---- requests --------------------------------------------------------------------

    def check(self, prompt: list[int], params: RequestParams) -> RequestParams:
        return check(self.capacity, self.grammars, prompt, params)

    def submit_many(
        self, items: list[tuple[list[int], RequestParams, Callable[[Event], None]]]
    ) -> list[Request]:
        """As Engine.submit_many: checked and admitted here, then sent."""
        reqs = [Request(list(prompt), self.check(prompt, params), cb) for prompt, params, cb in items]
        with self._lock:
            if not self.alive:
                raise EngineDead("the engine is not running")
            admit(self.capacity, len(self._requests), len(reqs))
            for r in reqs:
                self._requests[r.id] = r
            self._send(("add", [(r.id, r.arrival, r.prompt, r.params) for r in reqs]))
        return reqs

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self._send(("cancel", req.id))

    def load(self) -> Load:
        return self._load

    def queue_depth(self) -> int:
        return self._load.waiting

    def running(self) -> int:
        return self._load.running

    def idle(self) -> bool:
        return not self._requests

    def retry_after(self) -> int:
        return self._load.retry_after(self.capacity.slots)

    def _send(self, msg: tuple) -> None:
        with self._lock:
            _post(self._conn, msg)

    # ---- events ----------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "events":
                    self._load = msg[2]
                    for rid, ev in msg[1]:
                        self._deliver(rid, ev)
                elif msg[0] == "ended":
                    self.error = msg[1]
                    break
        except (EOFError, OSError):
            self.error = self.error or f"the engine process exited (exit code {self._proc.exitcode})"
        finally:
            self._ended.set()
            with self._lock:
                doomed = list(self._requests)
            why = f"engine failed: {self.error}" if self.error else None
            for rid in doomed:
                reason = "error" if why else "cancelled"
                self._deliver(rid, Event(finish_reason=reason, error=why))

    def _deliver(self, rid: int, ev: Event) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        if ev.finish_reason is not None:
            req.finish_reason = ev.finish_reason
            with self._lock:
                self._requests.pop(rid, None)
            if self.on_finish is not None:
                try:
                    self.on_finish(req)
                except Exception:  # bookkeeping must never take a request down
                    log.exception("on_finish failed for request %d", rid)
        try:
            req.on_event(ev)
        except Exception:  # the consumer has gone away
            log.debug("request %d: event callback failed; cancelling", rid, exc_info=True)
            if req.finish_reason is None:
                self.cancel(req)
        if ev.finish_reason is not None:
            req.done.set()


def _shutdown(conn, proc, timeout: float = 10.0) -> None:
    """Ask the core to stop, and kill it if it has not within timeout."""
    _post(conn, ("stop",))
    proc.join(timeout)
    if proc.is_alive():
        log.warning("the engine process did not stop in %g s: killing it", timeout)
        proc.kill()
        proc.join(timeout)
    conn.close()


def _post(conn, msg: tuple) -> None:
    """Send to the other side, if it is still there (the core's end tells the server's
    receiver, which fails what was outstanding; the server's end stops the core)."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(msg)
