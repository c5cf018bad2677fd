"""The continuous-batching engine: one thread that owns the model and a fixed KV cache.

Each iteration (as in Orca, vLLM, TGI): drop cancelled requests, give free cache slots to
waiting requests, prefill at most `prefill_chunk` prompt tokens (long prompts take several
iterations, so running streams are never stalled for a whole prompt), then decode one token
for every running request in a single batched forward. A request that finishes leaves its
slot at once; one that arrives joins at the next iteration.

Requests talk to the engine through `submit` (any thread) and receive `Event`s through
their callback on the engine's thread.

A fault in one request's own work (its sampler, its detokenizer, its callback) ends that
request with finish reason "error" and nothing else; only a failed forward pass, which
every running request shares, stops the engine.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from math import ceil

import torch
from tokenizers import Tokenizer

from stratus.data.tokenizer import eos_id
from stratus.errors import StratusError
from stratus.inference.batched import Fused, SlotCache, forward_rows
from stratus.inference.choose import choose
from stratus.inference.detok import Detokenizer
from stratus.inference.request import (
    ContextOverflow,
    EngineDead,
    Event,
    NeverFits,
    QueueFull,
    Request,
    RequestParams,
)
from stratus.model import Transformer

log = logging.getLogger("stratus.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # sequences decoded together (cache slots), before the memory cap
    kv_cache_mb: float | None = None  # KV cache budget in MiB; caps the slots; None = max_batch slots
    max_queue: int = 64  # requests waiting for a slot; one more is refused (HTTP 429)
    prefill_chunk: int = 64  # prompt tokens processed per iteration, over all prefilling requests


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]]


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 0 or self.config.prefill_chunk < 1:
            raise StratusError("engine: need max_batch >= 1, max_queue >= 0 and prefill_chunk >= 1")
        self.model = model.eval()
        self.fused = Fused(model)
        self.tokenizer = tokenizer
        self.eos = eos_id(tokenizer)
        # The model's vocabulary is rounded up to a multiple of 64; ids past the tokenizer's
        # are never targets in training and are never sampled here.
        self.vocab = min(tokenizer.get_vocab_size(), model.cfg.vocab_size)
        self.context = model.cfg.max_seq_len
        weight = model.output.weight
        self.device = weight.device
        per_slot = SlotCache.bytes_per_slot(model.cfg, self.context, weight.dtype)
        slots = self.config.max_batch
        if self.config.kv_cache_mb is not None:
            slots = min(slots, int(self.config.kv_cache_mb * 2**20 // per_slot))
            if slots < 1:
                raise StratusError(
                    f"a KV cache of {self.config.kv_cache_mb} MiB holds no sequence of {self.context} "
                    f"tokens ({per_slot / 2**20:.2f} MiB each): raise the budget"
                )
        self.cache = SlotCache(model.cfg, slots, self.context, self.device, weight.dtype)
        self._free = list(range(slots - 1, -1, -1))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.iterations = 0
        # Called on the engine's thread with every request that ends, whatever ended it
        # (the server counts finish reasons here, so a cancelled request is counted too).
        self.on_finish: Callable[[Request], None] | None = None
        self._mean_latency = 1.0  # seconds from arrival to finish, a moving average

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="stratus-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def slots(self) -> int:
        return self.cache.slots

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        return not self._waiting and not self._running

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to free up: the waiting requests
        drain `slots` at a time, each taking about the recent mean latency."""
        rounds = (len(self._waiting) + 1) / max(1, self.cache.slots)
        return max(1, ceil(rounds * self._mean_latency))

    # ---- requests --------------------------------------------------------------------

    def check(self, prompt: list[int], params: RequestParams) -> RequestParams:
        """Validate a request before anything is queued; returns params with max_tokens
        resolved. Raises ContextOverflow (or ValueError for bad token ids)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.model.cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.model.cfg.vocab_size})")
        room = self.context - len(prompt)
        if params.max_tokens is None:
            if room < 1:
                raise ContextOverflow(
                    f"this model's maximum context length is {self.context} tokens; the prompt has "
                    f"{len(prompt)} tokens and leaves no room for a completion: shorten it"
                )
            return replace(params, max_tokens=room)
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if params.max_tokens > room:
            raise ContextOverflow(
                f"this model's maximum context length is {self.context} tokens; you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, "
                f"{params.max_tokens} for the completion): reduce the prompt or max_tokens"
            )
        return params

    def submit_many(
        self, items: list[tuple[list[int], RequestParams, Callable[[Event], None]]]
    ) -> list[Request]:
        """Queue several requests at once (the `n` choices of one API call): all of them or
        none. Raises ContextOverflow/ValueError, QueueFull or EngineDead before queuing."""
        reqs = [Request(list(prompt), self.check(prompt, params), cb) for prompt, params, cb in items]
        if len(reqs) > self.config.max_queue + self.cache.slots:
            raise NeverFits(
                f"{len(reqs)} sequences in one request can never be queued together: this server "
                f"holds {self.cache.slots} running and {self.config.max_queue} waiting; lower n"
            )
        with self._lock:
            if not self.alive:
                raise EngineDead("the engine is not running")
            # requests that will take a free slot at the next iteration are not really waiting
            if len(self._waiting) + len(reqs) > self.config.max_queue + len(self._free):
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting; the queue holds {self.config.max_queue}"
                )
            self._waiting.extend(reqs)
        self._wake.set()
        return reqs

    def submit(self, prompt: list[int], params: RequestParams, on_event: Callable[[Event], None]) -> Request:
        return self.submit_many([(prompt, params, on_event)])[0]

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone); its slot is free by the next iteration."""
        req.cancelled = True
        self._wake.set()

    def stream(self, prompt: list[int], params: RequestParams) -> Iterator[Event]:
        """Events of one request as an iterator for synchronous callers (chat REPL, tests);
        closing the iterator early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt, params, events.put)
        try:
            while True:
                ev = events.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:
                self.cancel(req)

    def generate(self, prompt: list[int], params: RequestParams) -> Completion:
        text, tokens, lps, reason = [], [], [], "error"
        for ev in self.stream(prompt, params):
            text.append(ev.text)
            if ev.token is not None:
                tokens.append(ev.token)
                if ev.logprob is not None:
                    lps.append((ev.token, ev.logprob, ev.top_logprobs))
            if ev.finish_reason is not None:
                reason = ev.finish_reason
                if ev.error:
                    raise RuntimeError(ev.error)
        return Completion("".join(text), tokens, reason, len(prompt), lps)

    # ---- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._wake.clear()
                if not self._iterate():
                    self._wake.wait(0.1)
        except BaseException as e:  # the server watches `alive` and exits non-zero
            self.error = e
            log.exception("the engine failed; failing every request")
            with self._lock:
                doomed = list(self._waiting) + self._running
                self._waiting.clear()
                self._running = []
            for req in doomed:
                self._finish(req, "error", Event(finish_reason="error", error=f"engine failed: {e!r}"))
        finally:
            with self._lock:
                doomed = list(self._waiting)
                self._waiting.clear()
            for req in doomed + self._running:
                self._finish(req, "cancelled", Event(finish_reason="cancelled"))

    def _iterate(self) -> bool:
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        self._prefill()
        self._decode()
        self.iterations += 1
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone + [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled", Event(finish_reason="cancelled"))

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            while self._free and self._waiting:
                req = self._waiting.popleft()
                req.slot = self._free.pop()
                self._running.append(req)
                admitted.append(req)
        for req in admitted:
            self._isolated(req, self._prepare, req)

    def _prepare(self, req: Request) -> None:
        p = req.params
        seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        if p.presence_penalty or p.frequency_penalty:
            req.counts = torch.zeros(self.vocab, device=self.device)
        req.detok = Detokenizer(self.tokenizer, p.stop)

    def _prefill(self) -> None:
        budget = self.config.prefill_chunk
        for req in [r for r in self._running if r.pos < len(r.prompt) and not r.cancelled]:
            n = min(budget, len(req.prompt) - req.pos)
            tokens = torch.tensor([req.prompt[req.pos : req.pos + n]], device=self.device)
            slots = torch.tensor([req.slot], device=self.device)
            starts = torch.tensor([req.pos], device=self.device)
            logits = forward_rows(self.model, self.cache, slots, tokens, starts, fused=self.fused)
            req.pos += n
            if req.pos == len(req.prompt):
                self._isolated(req, self._advance, req, logits[0])
            budget -= n
            if budget == 0:
                break

    def _decode(self) -> None:
        rows = [r for r in self._running if r.next_token is not None]
        if not rows:
            return
        tokens = torch.tensor([[r.next_token] for r in rows], device=self.device)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        starts = torch.tensor([r.pos for r in rows], device=self.device)
        logits = forward_rows(self.model, self.cache, slots, tokens, starts, fused=self.fused)
        for i, req in enumerate(rows):
            req.pos += 1
            self._isolated(req, self._advance, req, logits[i])

    def _isolated(self, req: Request, work: Callable, *args) -> None:
        """Run one request's own work; if it raises, that request alone fails."""
        try:
            work(*args)
        except Exception:
            log.exception("request %d failed; the engine goes on with the others", req.id)
            self._finish(req, "error", Event(finish_reason="error", error="the request failed in the engine"))

    def _advance(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from logits (vocab,) and tell the client."""
        req.next_token = None
        if req.cancelled:
            return  # dropped at the next iteration; nothing more is sent
        token, lp, top = choose(logits[: self.vocab], req)
        detok: Detokenizer = req.detok  # type: ignore[assignment]
        if (token == self.eos or token in req.params.stop_token_ids) and not req.params.ignore_eos:
            self._finish(req, "stop", Event(text=detok.flush(), finish_reason="stop"))
            return
        req.out.append(token)
        text, stopped = detok.add(token)
        ev = Event(text=text, token=token, logprob=lp, top_logprobs=top)
        if stopped:
            ev.finish_reason = "stop"
        elif len(req.out) >= (req.params.max_tokens or 0):
            ev.text += detok.flush()
            ev.finish_reason = "length"
        if ev.finish_reason:
            self._finish(req, ev.finish_reason, ev)
        else:
            req.next_token = token
            self._send(req, ev)

    def _finish(self, req: Request, reason: str, ev: Event) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        if req.slot is not None:
            with self._lock:
                if req in self._running:
                    self._running.remove(req)
                self._free.append(req.slot)
            req.slot = None
        self._mean_latency += 0.1 * (ev.time - req.arrival - self._mean_latency)
        if self.on_finish is not None:
            try:
                self.on_finish(req)
            except Exception:  # bookkeeping must never take a request or the engine down
                log.exception("on_finish failed for request %d", req.id)
        self._send(req, ev)
        req.done.set()

    def _send(self, req: Request, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # a consumer that cannot take events (its loop closed) has gone away
            log.debug("request %d: event callback failed; cancelling", req.id, exc_info=True)
            req.cancelled = True


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once the engine has no waiting or running request (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.idle():
            return True
        time.sleep(0.01)
    return engine.idle()
