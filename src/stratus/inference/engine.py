"""The continuous-batching engine: one thread that owns the model and a paged KV pool.

Each iteration is vLLM's: schedule, execute, update.
- schedule: drop cancelled requests; every running request that has a token to feed gets
  one (decodes first); then prompt chunks of running and newly admitted requests, up to
  `prefill_chunk` prompt tokens a step. A request is admitted when a batch row and the KV
  blocks of its prompt are free; a prompt prefix already in the pool is shared, not computed.
  When a decode needs a block and none is free, the most recently admitted request is
  preempted: its blocks go back and it waits at the head of the queue, to be computed again.
- execute: one forward of the model over the whole mixed batch, flattened to one row
  (`execute`, the only call into the model), with logits only at the tokens sampled.
- update: sample each row that finished its tokens, detokenize, stop, finish; a finished
  request's blocks go back at once.

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
from dataclasses import dataclass, field, replace
from functools import cached_property
from math import ceil

import torch
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor

from stratus.data.tokenizer import eos_id
from stratus.errors import StratusError
from stratus.inference.choose import Draw, draw, resolve
from stratus.inference.detok import Detokenizer
from stratus.inference.grammar import Grammars
from stratus.inference.paged import BlockPool, PagedStep, block_hash
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
    max_batch: int = 16  # sequences running together (rows of a step)
    kv_cache_mb: float | None = None  # KV pool in MiB; None = max_batch whole contexts
    max_queue: int = 64  # requests waiting to run; one more is refused (HTTP 429)
    # prompt tokens a step, over all prefilling requests (vLLM's max_num_batched_tokens): 512 gave
    # 1.13x the tokens/s and a quarter of the TTFT of 64 at concurrency 64 (README)
    prefill_chunk: int = 512
    block_size: int = 16  # positions a KV block holds
    queue_timeout_s: float | None = 60.0  # a request waiting longer to start ends with "timeout" (503)
    prefix_caching: bool = True  # share full blocks of a prompt prefix the pool already holds


@dataclass(frozen=True)
class Capacity:
    """What a client may ask of an engine, fixed when it starts: the HTTP process validates
    requests against it, whether the engine runs beside it or in a process of its own
    (inference/core.py)."""

    context: int  # the model's context, positions
    vocab_size: int  # token ids in [0, vocab_size) may be fed
    block_size: int
    blocks: int  # KV blocks in the pool
    kv_bytes: int  # the pool's memory
    slots: int  # sequences running together
    max_queue: int  # sequences waiting to run


@dataclass(frozen=True)
class Load:
    """How busy an engine is now (health, metrics, Retry-After)."""

    waiting: int = 0
    running: int = 0
    free_blocks: int = 0  # held by no sequence (free or cached)
    hits: int = 0  # prompt blocks found in the prefix cache
    lookups: int = 0  # prompt blocks looked up
    preemptions: int = 0
    mean_latency: float = 1.0  # seconds from arrival to finish, a moving average

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def retry_after(self, slots: int) -> int:
        """Seconds until a place in the queue is likely to free up: the waiting requests
        drain `slots` at a time, each taking about the recent mean latency."""
        return max(1, ceil((self.waiting + 1) / slots * self.mean_latency))


def check(cap: Capacity, grammars: Grammars, prompt: list[int], params: RequestParams) -> RequestParams:
    """Validate a request before anything is queued; returns params with max_tokens resolved.
    Raises ContextOverflow, GrammarError or ValueError (bad token ids): the client's 400."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if min(prompt) < 0 or max(prompt) >= cap.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cap.vocab_size})")
    if params.grammar is not None:
        grammars.check(params.grammar)  # GrammarError, a ValueError: the client's 400
    room = cap.context - len(prompt)
    if params.max_tokens is None:
        if room < 1:
            raise ContextOverflow(
                f"this model's maximum context length is {cap.context} tokens; the prompt has "
                f"{len(prompt)} tokens and leaves no room for a completion: shorten it"
            )
        return replace(params, max_tokens=room)
    if params.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if params.max_tokens > room:
        raise ContextOverflow(
            f"this model's maximum context length is {cap.context} tokens; you requested "
            f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, "
            f"{params.max_tokens} for the completion): reduce the prompt or max_tokens"
        )
    need = ceil((len(prompt) + params.max_tokens) / cap.block_size)
    if need > cap.blocks:
        raise ContextOverflow(
            f"this request needs {need} KV blocks of {cap.block_size} positions; the server's "
            f"pool holds {cap.blocks}: reduce the prompt or max_tokens"
        )
    return params


def admit(cap: Capacity, outstanding: int, new: int) -> None:
    """Raise NeverFits or QueueFull unless `new` sequences may join the `outstanding` ones
    (waiting or running): those that will run at the next step are not really waiting, so
    the bound is the queue plus the rows."""
    if new > cap.max_queue + cap.slots:
        raise NeverFits(
            f"{new} sequences in one request can never be queued together: this server "
            f"holds {cap.slots} running and {cap.max_queue} waiting; lower n"
        )
    if outstanding + new > cap.max_queue + cap.slots:
        raise QueueFull(
            f"{outstanding} sequences are running or waiting; the server holds {cap.slots} running "
            f"and {cap.max_queue} waiting"
        )


@dataclass
class Batch:
    """What one step runs, from the schedule to the update: each row's request and how many
    of its tokens are fed, in the order of the flattened batch."""

    rows: list[Request]
    counts: list[int]
    tokens: list[int]
    positions: list[int]
    sampled: list[int]  # rows whose last token's logits are sampled (their tokens are all in)
    # prompt positions whose logits score the next prompt token (echo with logprobs): (row,
    # index in the flattened batch of the first, how many, the first's position)
    scored: list[tuple[int, int, int, int]] = field(default_factory=list)

    def plan(self) -> StepPlan:
        return StepPlan(
            [(r.blocks, r.pos, n) for r, n in zip(self.rows, self.counts, strict=True)],  # type: ignore[misc]
            self.tokens,
            self.positions,
            self.sampled,
            self.scored,
        )


@dataclass
class StepPlan:
    """What the forward needs of a Batch, in plain lists: under tensor parallelism rank 0
    sends it to the other ranks, which run the same forward on their shards."""

    tables: list[tuple[list[int], int, int]]  # per row: block table, first new position, tokens
    tokens: list[int]
    positions: list[int]
    sampled: list[int]
    scored: list[tuple[int, int, int, int]]


@torch.inference_mode()
def execute(model: Transformer, pool: BlockPool, batch: StepPlan, device) -> torch.Tensor:
    """One forward over the flattened batch: logits (len(batch.sampled) + scored positions, vocab),
    the sampled rows' first."""
    step = PagedStep(pool, batch.tables, device)
    ends = torch.tensor([n for _, _, n in batch.tables], device=device).cumsum(0) - 1
    select = ends[torch.tensor(batch.sampled, device=device, dtype=torch.long)]
    if batch.scored:
        extra = [start + j for _, start, n, _ in batch.scored for j in range(n)]
        select = torch.cat([select, torch.tensor(extra, device=device)])
    tokens = torch.tensor([batch.tokens], device=device)
    positions = torch.tensor([batch.positions], device=device)
    return model(tokens, positions, step, select=select)[0]


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
        # a tensor-parallel model's projections are sharded by output: each rank's q, k and v
        # are its own heads, and fusing them would interleave the shards
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self.model = model.eval() if sharded else model.eval().fuse_projections()
        self.tokenizer = tokenizer
        self.eos = eos_id(tokenizer)
        # The model's vocabulary is rounded up to a multiple of 64; ids past the tokenizer's
        # are never targets in training and are never sampled here.
        self.vocab = min(tokenizer.get_vocab_size(), model.cfg.vocab_size)
        self.context = model.cfg.max_seq_len
        weight = model.output.weight
        self.device = weight.device
        bs = self.config.block_size
        wk = model.layers["0"].attention.wk.weight
        kv_heads = (wk.to_local() if isinstance(wk, DTensor) else wk).shape[0] // model.cfg.head_dim
        per_block = BlockPool.bytes_per_block(model.cfg, bs, weight.dtype, kv_heads)
        blocks = self.config.max_batch * ceil(self.context / bs)
        if self.config.kv_cache_mb is not None:
            blocks = int(self.config.kv_cache_mb * 2**20 // per_block)
            if blocks < 1:
                raise StratusError(
                    f"a KV cache of {self.config.kv_cache_mb} MiB holds no block of {bs} positions "
                    f"({per_block / 2**20:.3f} MiB each): raise the budget"
                )
        self.pool = BlockPool(model.cfg, blocks, bs, self.device, weight.dtype, kv_heads)
        self.capacity = Capacity(
            self.context,
            model.cfg.vocab_size,
            bs,
            blocks,
            self.pool.nbytes,
            self.config.max_batch,
            self.config.max_queue,
        )
        # tensor-parallel serving (inference/tensor_parallel.py): each step's plan goes to the
        # other ranks before the forward, and None when the loop ends
        self.broadcast: Callable[[StepPlan | None], None] | None = None
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.iterations = 0
        self.preemptions = 0
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
        """Sequences that may run at once (rows of a step); the KV blocks they hold are
        counted when each is admitted and as it grows."""
        return self.config.max_batch

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        return not self._waiting and not self._running

    def load(self) -> Load:
        pool = self.pool
        return Load(
            len(self._waiting),
            len(self._running),
            pool.available(),
            pool.hits,
            pool.lookups,
            self.preemptions,
            self._mean_latency,
        )

    def retry_after(self) -> int:
        return self.load().retry_after(self.slots)

    @cached_property
    def grammars(self) -> Grammars:
        """The tokenizer as the grammar library sees it, built on first use (it walks the vocabulary)."""
        return Grammars.of(self.tokenizer)

    # ---- requests --------------------------------------------------------------------

    def check(self, prompt: list[int], params: RequestParams) -> RequestParams:
        return check(self.capacity, self.grammars, prompt, params)

    def submit_many(
        self, items: list[tuple[list[int], RequestParams, Callable[[Event], None]]]
    ) -> list[Request]:
        """Queue several requests at once (the `n` choices of one API call): all of them or
        none. Raises ContextOverflow/ValueError, NeverFits, QueueFull or EngineDead before queuing."""
        reqs = [Request(list(prompt), self.check(prompt, params), cb) for prompt, params, cb in items]
        self.enqueue(reqs)
        return reqs

    def enqueue(self, reqs: list[Request]) -> None:
        """Queue checked requests, all or none (NeverFits, QueueFull, EngineDead)."""
        with self._lock:
            if not self.alive:
                raise EngineDead("the engine is not running")
            admit(self.capacity, len(self._waiting) + len(self._running), len(reqs))
            self._waiting.extend(reqs)
        self._wake.set()

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
            if self.broadcast is not None:
                self.broadcast(None)  # the other ranks' loops end too

    def _iterate(self) -> bool:
        self._drop_cancelled()
        batch = self._schedule()
        if batch is None:
            return False
        plan = batch.plan()
        if self.broadcast is not None:
            self.broadcast(plan)
        logits = execute(self.model, self.pool, plan, self.device)
        self._update(batch, logits)
        self.iterations += 1
        return True

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave; so does one that has waited past the queue timeout
        without starting (one that was preempted has started: it is never timed out)."""
        limit = self.config.queue_timeout_s
        now = time.monotonic()
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            late = [
                r
                for r in self._waiting
                if limit and not r.cancelled and r.generator is None and now - r.arrival > limit
            ]
            for r in gone + late:
                self._waiting.remove(r)
        for r in gone + [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled", Event(finish_reason="cancelled"))
        for r in late:
            waited = f"the server is overloaded: waited {now - r.arrival:.1f} s to start (limit {limit:g} s)"
            self._finish(r, "timeout", Event(finish_reason="timeout", error=waited))

    # ---- schedule --------------------------------------------------------------------

    @staticmethod
    def _left(req: Request) -> int:
        """Tokens of the request still to feed: its prompt's rest, or the token just sampled."""
        return len(req.prompt) + len(req.out) - req.pos

    def _schedule(self) -> Batch | None:
        rows: list[Request] = []
        counts: list[int] = []
        for req in [r for r in self._running if self._left(r) == 1]:  # decodes first
            if req in self._running and self._grow(req):
                rows.append(req)
                counts.append(1)
        budget = self.config.prefill_chunk
        for req in self._running:  # prompts in chunks (and preempted requests, computed again)
            if budget and req not in rows and self._left(req) > 1:
                n = min(self._left(req), budget)
                rows.append(req)
                counts.append(n)
                budget -= n
        while budget and self._waiting and len(self._running) < self.slots:
            req = self._waiting[0]
            if not self._admit(req):
                break
            n = min(self._left(req), budget)
            rows.append(req)
            counts.append(n)
            budget -= n
        if not rows:
            return None
        tokens, positions, sampled, scored = [], [], [], []
        for i, (req, n) in enumerate(zip(rows, counts, strict=True)):
            last = len(req.prompt) - 1  # positions before it predict a prompt token
            if req.params.prompt_logprobs is not None and req.pos < last:
                scored.append((i, len(tokens), min(req.pos + n, last) - req.pos, req.pos))
            tokens += self._feed(req, n)
            positions += range(req.pos, req.pos + n)
            if n == self._left(req):
                sampled.append(i)
        return Batch(rows, counts, tokens, positions, sampled, scored)

    @staticmethod
    def _feed(req: Request, n: int) -> list[int]:
        p = len(req.prompt)
        if req.pos + n <= p:
            return req.prompt[req.pos : req.pos + n]
        return (req.prompt[req.pos :] if req.pos < p else []) + req.out[max(0, req.pos - p) : req.pos + n - p]

    def _hashes(self, req: Request) -> list[bytes]:
        """Hashes of the full blocks before the request's last token (that one is always
        computed, for the logits it is sampled from)."""
        bs, tokens = self.pool.block_size, req.tokens
        out, parent = [], b""
        for j in range((len(tokens) - 1) // bs):
            parent = block_hash(parent, tokens[j * bs : (j + 1) * bs])
            out.append(parent)
        return out

    def _admit(self, req: Request) -> bool:
        """Give the head of the queue a batch row and the KV blocks of everything it has to
        compute, sharing what the pool already holds of its prefix; False when it must wait."""
        hashes = self._hashes(req)
        bs = self.pool.block_size
        computing = {h for r in self._running for h in r.hashes[r.pos // bs :]}
        # a request that scores its prompt computes all of it: a shared block has no logits
        sharing = self.config.prefix_caching and req.params.prompt_logprobs is None
        shared = self.pool.share(hashes) if sharing else []
        if sharing and len(shared) < len(hashes) and hashes[len(shared)] in computing:
            self.pool.release(shared)  # a running request is computing the next block: wait for it
            return False
        need = ceil(len(req.tokens) / bs) - len(shared)
        new = self.pool.take(need)
        if new is None:
            self.pool.release(shared)
            return False
        with self._lock:
            self._waiting.popleft()
            self._running.append(req)
        req.blocks, req.pos, req.hashes = shared + new, len(shared) * bs, hashes
        if req.generator is None:  # not when it comes back after a preemption
            self._isolated(req, self._prepare, req)
        return True

    def _grow(self, req: Request) -> bool:
        """A block for the decode's position if it needs one, preempting the most recently
        admitted requests until one is free; False when the request itself was preempted."""
        assert req.blocks is not None
        while len(req.blocks) * self.pool.block_size <= req.pos:
            new = self.pool.take(1)
            if new is not None:
                req.blocks += new
                continue
            victim = self._running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Give back the request's blocks and put it at the head of the queue: it will be
        computed again from its prompt and output (vLLM's preemption by recompute)."""
        self.pool.release(req.blocks or [])
        req.blocks, req.pos, req.hashes = None, 0, []
        self.preemptions += 1
        with self._lock:
            self._running.remove(req)
            self._waiting.appendleft(req)

    def _prepare(self, req: Request) -> None:
        p = req.params
        seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        if p.presence_penalty or p.frequency_penalty:
            req.counts = torch.zeros(self.vocab, device=self.device)
        req.detok = Detokenizer(self.tokenizer, p.stop, p.heal_text)
        if p.grammar is not None:
            req.matcher = self.grammars.matcher(p.grammar)

    # ---- update ----------------------------------------------------------------------

    def _update(self, batch: Batch, logits: torch.Tensor) -> None:
        bs = self.pool.block_size
        for req, n in zip(batch.rows, batch.counts, strict=True):
            # blocks that filled in this step: later requests with the same prefix share them
            if self.config.prefix_caching:
                for j in range(req.pos // bs, min((req.pos + n) // bs, len(req.hashes))):
                    self.pool.publish(req.blocks[j], req.hashes[j])  # type: ignore[index]
            req.pos += n
        rest, at = logits[len(batch.sampled) :], 0
        for i, _, n, first in batch.scored:  # before sampling: the first event carries them
            self._isolated(batch.rows[i], self._score_prompt, batch.rows[i], rest[at : at + n], first)
            at += n
        # Every row's token is chosen on the device and read to the host with the others (a
        # GPU syncs at most twice a step, not once a row): the rows that only take the
        # likeliest token in one argmax, the others (sampling, penalties, logprobs, healing,
        # grammar) drawn each and resolved together.
        live = [(k, batch.rows[i]) for k, i in enumerate(batch.sampled)]
        live = [(k, r) for k, r in live if r.finish_reason is None and not r.cancelled]
        greedy = [k for k, r in live if self._plain_greedy(r)]
        plain = set(greedy)
        draws: dict[int, Draw] = {}
        for k, req in live:
            if k not in plain and (d := self._isolated(req, self._draw, req, logits[k])) is not None:
                draws[k] = d
        chosen = {}
        if greedy:
            best = logits[greedy, : self.vocab].argmax(-1).tolist()
            chosen = {k: (t, None, None) for k, t in zip(greedy, best, strict=True)}
        chosen.update(zip(draws, resolve(list(draws.values())), strict=True))
        for k, req in live:
            if k in chosen:  # a request whose draw failed has finished with an error
                self._isolated(req, self._take, req, *chosen[k])

    def _score_prompt(self, req: Request, logits: torch.Tensor, first: int) -> None:
        """Log probabilities of prompt tokens first+1 .. from the logits before each (a
        request computed again after a preemption has them already)."""
        lps = torch.log_softmax(logits[:, : self.vocab].float(), dim=-1)
        k = req.params.prompt_logprobs or 0
        top = torch.topk(lps, k, dim=-1) if k else None
        for j in range(len(lps)):
            p = first + j
            if p < len(req.prompt_lps):
                continue
            nxt = req.prompt[p + 1]
            alts = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top else []
            req.prompt_lps.append((nxt, float(lps[j, nxt]), alts))

    @staticmethod
    def _plain_greedy(req: Request) -> bool:
        p = req.params
        healing = p.heal_ids and not req.out
        return p.temperature == 0 and not (
            p.logit_bias or req.counts is not None or p.logprobs is not None or healing or req.matcher
        )

    def _isolated(self, req: Request, work: Callable, *args):
        """Run one request's own work and return what it returns; if it raises, that request
        alone fails (and None is returned)."""
        try:
            return work(*args)
        except Exception:
            log.exception("request %d failed; the engine goes on with the others", req.id)
            self._finish(req, "error", Event(finish_reason="error", error="the request failed in the engine"))
            return None

    def _draw(self, req: Request, logits: torch.Tensor) -> Draw:
        """The request's next token, drawn on the device from logits (vocab,)."""
        logits = logits[: self.vocab]
        if req.matcher is not None:  # the grammar's tokens only; the end of turn once it is complete
            allowed = req.matcher.allowed(req.params.stop_token_ids)[: self.vocab].to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        return draw(logits, req)

    def _take(self, req: Request, token: int, lp: float | None, top: list | None) -> None:
        """Take the request's next token and tell the client."""
        matcher = req.matcher
        detok: Detokenizer = req.detok  # type: ignore[assignment]
        scored = req.prompt_lps if req.params.prompt_logprobs is not None and not req.out else None
        if (token == self.eos or token in req.params.stop_token_ids) and not req.params.ignore_eos:
            self._finish(req, "stop", Event(text=detok.flush(), finish_reason="stop", prompt_logprobs=scored))
            return
        if matcher is not None:
            matcher.accept(token)
        req.out.append(token)
        text, stopped = detok.add(token)
        ev = Event(text=text, token=token, logprob=lp, top_logprobs=top, prompt_logprobs=scored)
        if stopped:
            ev.finish_reason = "stop"
        elif matcher is not None and matcher.done:  # nothing may follow: the grammar ends the output
            ev.text += detok.flush()
            ev.finish_reason = "stop"
        elif len(req.out) >= (req.params.max_tokens or 0):
            ev.text += detok.flush()
            ev.finish_reason = "length"
        if ev.finish_reason:
            self._finish(req, ev.finish_reason, ev)
        else:
            self._send(req, ev)

    def _finish(self, req: Request, reason: str, ev: Event) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        with self._lock:
            if req in self._running:
                self._running.remove(req)
        if req.blocks is not None:
            self.pool.release(req.blocks)
            req.blocks = None
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
