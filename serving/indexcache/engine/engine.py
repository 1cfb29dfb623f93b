"""Continuous batching engine: many requests share one preallocated slot KV cache and advance together.

Roles as in `ray.serve.llm`: this is the engine. It sees token ids only; `generate()` is an async
generator of `TokenChunk`s. The server deployment (serving/server.py) owns one engine per replica.

A scheduler step (run by one background thread, or by hand with `step()` in tests):
  1. drop aborted requests (client gone, stop string hit): their slots are free again at once;
  2. admit waiting requests into free slots (FIFO);
  3. prefill: up to `chunk_size` prompt tokens in total, one request after another (chunked prefill:
     a long prompt spreads over several steps, so running requests keep decoding between its chunks);
     a prompt's last chunk yields its first token;
  4. decode: every running request with a token waiting to enter the cache advances one position,
     one batched forward per distinct IndexCache pattern among them.

Faults stay with the request that caused them: a forward or sampling error fails that request alone
(finish_reason "error"); a failed batched decode is re-run request by request to find it, so the rest of
the batch continues with the same tokens as if nothing happened.

Live pattern switch: `set_pattern()` only changes what *new* requests get. Each request keeps the pattern
it was admitted with until it finishes, so its output equals the same request run alone on that pattern
(the slow twin: `engine.generate.generate` / `naive_generate`). The cache holds indexer keys for the union of
the patterns' F layers (KVCache.ensure_pattern); each request reads and writes only its own slot.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from .. import kernels
from ..model.dsa import DSAForCausalLM, KVCache
from ..serving.metrics import FlopModel, ServingMetrics
from .cuda_graphs import DecodeGraphs
from .sampling import SamplingParams, make_generator, sample_token, token_logprobs

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt does not fit the engine's context (max_model_len)."""


@dataclass
class TokenChunk:
    token_id: int | None            # None only on a final chunk that carries no token (abort, error, max_tokens=0)
    finish_reason: str | None       # None while running; then "stop", "length", "abort" or "error"
    pattern: str
    pattern_version: int
    error: str | None = None
    # when the request asked for logprobs (SamplingParams.logprobs): the token's, and the top (id, logprob)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class EngineRequest:
    id: str
    prompt: list[int]
    params: SamplingParams
    pattern: str
    pattern_version: int
    emit: Callable[[TokenChunk], None]   # called on the engine thread
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    admitted_at: float | None = None     # when it got a slot (queue time = admitted_at - arrival)
    cached: int = 0                      # tokens of this sequence already in the KV cache
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    abort_reason: str | None = None      # set from any thread; the engine frees the slot on its next step
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)


class Engine:
    def __init__(self, model: DSAForCausalLM, *, pattern: str | None = None, pattern_version: int = 0,
                 max_batch_size: int = 8, max_model_len: int | None = None, chunk_size: int = 256,
                 metrics: ServingMetrics | None = None, enforce_eager: bool = False,
                 indexer_fp8: bool | None = None, warm_up: bool | None = None,
                 cpu_fast_path: bool | None = None):
        """cpu_fast_path: run forwards through model/cpu_forward.py (CPU, GQA, dense MLPs); None = whenever
        the model is one it supports, False = always the readable reference forward of dsa.py."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.args = model.args
        self.max_model_len = min(max_model_len or self.args.max_seq_len, self.args.max_seq_len)
        self.max_batch_size, self.chunk_size = max_batch_size, chunk_size
        self.device = model.lm_head.weight.device
        self.pattern = model.check_pattern(pattern or model.default_pattern)
        self.pattern_version = pattern_version
        on_cuda = self.device.type == "cuda"
        # CUDA graphs for decode unless asked for eager (debugging), like vLLM's --enforce-eager
        self.cuda_graphs = on_cuda and not enforce_eager
        # the FP8 lightning indexer (e4m3 keys, half the bytes) on CUDA by default; bf16 on request
        if indexer_fp8 is None:
            indexer_fp8 = on_cuda and kernels.backend(self.device) == "triton"
        self.indexer_fp8 = indexer_fp8
        # one extra slot when graphs pad a batch up to its bucket: padding rows write there (a one-request
        # engine never pads: its only bucket is 1)
        padded = self.cuda_graphs and max_batch_size > 1
        n_slots = max_batch_size + (1 if padded else 0)
        self.cache = KVCache(self.args, n_slots, self.max_model_len, self.pattern,
                             dtype=model.lm_head.weight.dtype, device=self.device, indexer_fp8=self.indexer_fp8)
        self.graphs = (DecodeGraphs(model, self.cache, max_batch_size, self.max_model_len,
                                    pad_slot=max_batch_size if padded else 0) if self.cuda_graphs else None)
        self.cpu_fast = self._cpu_fast_forward(model, cpu_fast_path)
        self.flops = FlopModel.of(self.args)
        self.metrics = metrics
        if metrics is not None:
            metrics.set_pattern(self.pattern, pattern_version)
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.free_slots = list(range(max_batch_size))
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.forwards = 0   # forwards run (a test counts them to see batching happen)
        self._graph_patterns_in_use: set[str] | None = None
        self.warm_up_s = self.warm_up() if (on_cuda if warm_up is None else warm_up) else 0.0

    def _cpu_fast_forward(self, model: DSAForCausalLM, wanted: bool | None):
        if wanted is False or self.device.type != "cpu" or self.indexer_fp8:
            return None
        from ..model.cpu_forward import CPUFastForward, supports
        why = supports(model)
        if why is not None and wanted:
            raise ValueError(f"cpu_fast_path=True but the CPU fast forward cannot run this model: {why}")
        return None if why is not None else CPUFastForward(model)

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile the GPU kernels before the first request, as vLLM's start-up dummy run does: Triton
        specialises each kernel on whether its integer arguments are multiples of 16, so a prefill of one
        full chunk and one of 17 tokens (then one eager decode position) reaches every variant a request can.
        The first user request no longer pays seconds of JIT (seen as +2-3 s on H200 prefill steps).
        Writes only slot 0's rows, which any later request overwrites before it reads them. Returns seconds."""
        t0 = time.monotonic()
        first = min(self.chunk_size, self.max_model_len - 19)
        if first < 1:
            return 0.0
        for start, n in ((0, first), (first, 17), (first + 17, 1)):
            tokens = torch.zeros(1, n, dtype=torch.long, device=self.device)
            self.model(tokens, start_pos=[start], cache=self.cache, slots=[0], pattern=self.pattern,
                       logits_at=torch.tensor([n - 1], device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.monotonic() - t0
        log.info("warm-up: %.2f s (kernels compiled before the first request)", seconds)
        return seconds

    # -------------------------------------------------------------------------------- configuration
    def set_pattern(self, pattern: str, version: int) -> None:
        """New requests get `pattern`; requests already admitted or queued keep theirs."""
        pattern = self.model.check_pattern(pattern)
        with self._lock:
            self.pattern, self.pattern_version = pattern, version
            in_use = {r.pattern for r in self.running} | {r.pattern for r in self.waiting} | {pattern}
            # graphs of patterns nobody uses any more are freed by the engine thread (never during a capture);
            # the new pattern's graphs are captured there on first use
            self._graph_patterns_in_use = in_use
        if self.metrics is not None:
            self.metrics.set_pattern(pattern, version)

    # -------------------------------------------------------------------------------- submission
    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context is {self.max_model_len} tokens "
                f"(max_model_len, prompt + at least one generated token): shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.args.vocab_size - 1})")

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[TokenChunk], None]) -> EngineRequest:
        """Queue a request; `emit` receives its chunks on the engine thread. Raises on bad input."""
        self.check_prompt(prompt)
        room = self.max_model_len - len(prompt)
        if params.max_new_tokens > room:   # the context caps generation; finish_reason will be "length"
            params = dataclasses.replace(params, max_new_tokens=room)
        with self._lock:
            req = EngineRequest(id=f"req-{next(self._ids)}", prompt=list(prompt), params=params,
                                pattern=self.pattern, pattern_version=self.pattern_version, emit=emit,
                                generator=make_generator(params.seed))
            self.waiting.append(req)
            self._wake.notify()
        return req

    def abort(self, req: EngineRequest, reason: str = "abort") -> None:
        """Stop a request (thread-safe); its slot is freed on the engine's next step."""
        with self._lock:
            if not req.finished and req.abort_reason is None:
                req.abort_reason = reason
                self._wake.notify()

    async def generate(self, prompt: list[int], params: SamplingParams,
                       on_submit: Callable[[EngineRequest], None] | None = None) -> AsyncIterator[TokenChunk]:
        """Async generator of chunks. Closing it early (client gone) aborts the request and frees its slot.
        `on_submit` receives the request (to abort it with another reason, e.g. a stop string)."""
        batches = self.generate_batches(prompt, params, on_submit)
        try:
            async for batch in batches:
                for chunk in batch:
                    yield chunk
        finally:
            await batches.aclose()

    async def generate_batches(self, prompt: list[int], params: SamplingParams,
                               on_submit: Callable[[EngineRequest], None] | None = None
                               ) -> AsyncIterator[list[TokenChunk]]:
        """As generate(), but each item is every chunk that is already waiting (at least one; it never waits
        for more): a consumer that lags behind the engine (one message per token through Ray costs
        milliseconds on a CPU) catches up with one message for several tokens, and the first token still
        goes out alone the moment it exists."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenChunk] = asyncio.Queue()
        req = self.submit(prompt, params, lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk))
        if on_submit is not None:
            on_submit(req)
        try:
            while True:
                batch = [await queue.get()]
                while batch[-1].finish_reason is None and not queue.empty():
                    batch.append(queue.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    return
        finally:
            self.abort(req)   # no-op when it already finished

    # -------------------------------------------------------------------------------- the loop
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="indexcache-engine", daemon=True)
            self._thread.start()
        return self

    def is_alive(self) -> bool:
        """Whether the scheduler thread is running (a replica whose engine died must be restarted)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self.waiting or self.running or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:   # a bug must not take the replica down: fail the batch, keep serving
                log.exception("engine step failed; failing the running requests")
                with self._lock:
                    for req in list(self.running):
                        self._finish(req, "error", error="internal engine error (see the replica log)")

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler step. Returns whether anything was left to do."""
        with self._lock:
            for req in [r for r in self.running if r.abort_reason]:
                self._finish(req, req.abort_reason)
            for req in [r for r in self.waiting if r.abort_reason]:
                self.waiting.remove(req)
                self._finish(req, req.abort_reason)
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                req.slot = self.free_slots.pop(0)
                req.admitted_at = time.monotonic()
                self.running.append(req)
                if req.params.max_new_tokens == 0:
                    self._finish(req, "length")
            running = list(self.running)
            drop, self._graph_patterns_in_use = self._graph_patterns_in_use, None
        if drop is not None and self.graphs is not None:
            self.graphs.drop_patterns(drop | {r.pattern for r in running})
        self._update_gauges()
        if not running:
            return False
        busy_start = time.monotonic()

        budget = self.chunk_size
        for req in [r for r in running if r.prefilling]:
            if budget <= 0:
                break
            start = req.cached
            chunk = req.prompt[start:start + budget]
            budget -= len(chunk)
            tokens = torch.tensor([chunk], device=self.device)                     # (1, C)
            try:
                logits = self._forward(tokens, [start], [req.slot], req.pattern,
                                       logits_at=torch.tensor([len(chunk) - 1], device=self.device))
                logits = logits.cpu() if self.device.type != "cpu" else logits       # one sync, then sampling on the host
                req.cached += len(chunk)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(chunk))
                if not req.prefilling:
                    self._accept(req, logits[0])
            except Exception as exc:   # this request's prefill alone: fail it, keep the others running
                self._fail(req, exc)

        decoding = [r for r in running if not r.prefilling and not r.finished and r.output]
        for pattern in dict.fromkeys(r.pattern for r in decoding):
            self._decode([r for r in decoding if r.pattern == pattern], pattern)
        if self.metrics is not None:
            self._update_gauges()
        log.debug("step: %d running, %.1f ms", len(running), 1000 * (time.monotonic() - busy_start))
        return True

    def _decode(self, batch: list[EngineRequest], pattern: str) -> None:
        """One decode position for `batch` (one pattern) in one forward. If the batched forward raises, run
        its requests one by one so that only the request that fails alone is failed: one bad request never
        takes the others down. Re-running is safe: a forward writes the cache at each request's current
        position only, and the retry overwrites what the failed one wrote there."""
        try:
            if self.graphs is not None:
                logits = self._replay(batch, pattern)
            else:
                tokens = torch.tensor([[r.output[-1]] for r in batch], device=self.device)    # (B, 1)
                logits = self._forward(tokens, [r.cached for r in batch], [r.slot for r in batch], pattern,
                                       logits_at=torch.zeros(len(batch), dtype=torch.long, device=self.device))
            if self.device.type != "cpu":
                logits = logits.cpu()   # one device sync per step; sampling runs on the host copy
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            log.warning("a batched decode of %d requests failed (%s: %s); retrying them one by one",
                        len(batch), type(exc).__name__, exc)
            for r in batch:
                self._decode([r], pattern)
            return
        for r, row in zip(batch, logits):
            r.cached += 1
            try:
                self._accept(r, row)
            except Exception as exc:
                self._fail(r, exc)

    def _fail(self, req: EngineRequest, exc: BaseException) -> None:
        """End one request with finish_reason "error"; its slot is freed, the others keep running."""
        log.error("request %s failed in the engine", req.id, exc_info=exc)
        with self._lock:
            self._finish(req, "error", error=f"generation failed inside the engine ({type(exc).__name__}); "
                                            f"request {req.id}, see the replica log")

    def _forward(self, tokens: torch.Tensor, starts: list[int], slots: list[int], pattern: str,
                 logits_at: torch.Tensor) -> torch.Tensor:
        """One eager forward; starts and slots go in as host lists (no device sync inside the model)."""
        t0 = time.monotonic()
        if self.cpu_fast is not None:
            logits = self.cpu_fast(tokens, starts, slots, pattern, self.cache, logits_at)
        else:
            logits = self.model(tokens, start_pos=starts, cache=self.cache, slots=slots, pattern=pattern,
                                logits_at=logits_at)
        self._observe_forward(t0, starts, tokens.shape[1], pattern)
        return logits

    def _replay(self, batch: list[EngineRequest], pattern: str) -> torch.Tensor:
        """One decode position for `batch` through its CUDA graph (captured on first use)."""
        t0 = time.monotonic()
        starts = [r.cached for r in batch]
        logits = self.graphs.run([r.output[-1] for r in batch], starts, [r.slot for r in batch], pattern)
        self._observe_forward(t0, starts, 1, pattern)
        return logits

    def _observe_forward(self, t0: float, starts: list[int], n: int, pattern: str) -> None:
        # On CUDA the forward returns before the device finishes: the time is launch time until the caller
        # syncs; the step's sampling sync follows at once, so per-step sums stay right within one step.
        seconds = time.monotonic() - t0
        self.forwards += 1
        if self.metrics is not None:
            computed, skipped, total = self.flops.forward([(s, n) for s in starts], pattern.count("F"), len(starts))
            self.metrics.observe_forward(seconds, computed, skipped, total)

    def _accept(self, req: EngineRequest, logits: torch.Tensor) -> None:
        """Sample the next token of `req` from its logits (V,), emit it, finish when due."""
        token = sample_token(logits, req.params.temperature, req.params.top_p, req.generator)
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.output.append(token)
        # generated tokens are counted by the server, as the response's usage counts them
        logprob = top = None
        if req.params.logprobs is not None:   # off unless asked: a log_softmax over the vocabulary per token
            logprob, top = token_logprobs(logits, token, req.params.logprobs)
        reason = None
        if token in req.params.stop_token_ids:
            reason = "stop"
        elif len(req.output) >= req.params.max_new_tokens:
            reason = "length"
        req.emit(TokenChunk(token, reason, req.pattern, req.pattern_version, logprob=logprob, top_logprobs=top))
        if reason is not None:
            with self._lock:
                self._finish(req, reason, emitted=True)

    def _finish(self, req: EngineRequest, reason: str, error: str | None = None, emitted: bool = False) -> None:
        """Release the slot and record the request (caller holds the lock, or is the engine thread)."""
        if req.finished:
            return
        req.finished = True
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.free_slots.append(req.slot)
            self.free_slots.sort()
        if not emitted:
            try:
                req.emit(TokenChunk(None, reason, req.pattern, req.pattern_version, error=error))
            except RuntimeError:   # the client's event loop is gone; nobody is listening
                pass
        if self.metrics is not None:
            now = time.monotonic()
            ttft = None if req.first_token_at is None else req.first_token_at - req.arrival
            tpot = ((now - req.first_token_at) / (len(req.output) - 1)
                    if req.first_token_at is not None and len(req.output) > 1 else None)
            admitted = req.admitted_at
            self.metrics.observe_finished(
                reason, ttft, tpot, now - req.arrival,
                queue=(admitted if admitted is not None else now) - req.arrival,
                prefill=None if admitted is None or req.first_token_at is None else req.first_token_at - admitted,
                decode=None if req.first_token_at is None else now - req.first_token_at)

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))
            used = sum(r.cached for r in self.running)
        self.metrics.kv_usage.set(used / (self.max_batch_size * self.max_model_len))
