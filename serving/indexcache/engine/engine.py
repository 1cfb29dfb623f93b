"""Continuous batching engine: many requests share one preallocated slot KV cache and advance together.

Roles as in `ray.serve.llm`: this is the engine. It sees token ids only; `generate()` is an async
generator of `TokenChunk`s. The server deployment (serving/server.py) owns one engine per replica.

A scheduler step (run by one background thread, or by hand with `step()` in tests):
  1. drop aborted requests (client gone, stop string hit): their slots are free again at once;
  2. admit waiting requests into free slots (FIFO);
  3. prefill: up to `chunk_size` prompt tokens in total, one request after another (chunked prefill:
     a long prompt spreads over several steps, so running requests keep decoding between its chunks);
     a prompt's last chunk yields its first token. Who gets the budget (`_prefill_order`): requests with
     at most `long_prefill_token_threshold` prompt tokens left to prefill ("short", default 4 chunks) go
     first, FIFO among them; long ones get the rest, FIFO, except that the oldest long one goes first
     when it got less than a full chunk in each of the last `long_prefill_max_wait` steps. So a short
     prompt does not wait for a long one's whole prefill, and a stream of short prompts cannot starve a
     long one: the oldest gets a full chunk at least once every long_prefill_max_wait + 1 steps.
     `long_prefill_token_threshold=0`: plain FIFO (one request after another in admission order);
  4. decode: every running request with a token waiting to enter the cache advances one position,
     one batched forward per distinct IndexCache pattern among them.

Faults stay with the request that caused them: a forward or sampling error fails that request alone
(finish_reason "error"); a failed batched decode is re-run request by request to find it, so the rest of
the batch continues with the same tokens as if nothing happened.

KV memory: the contiguous slot cache (max_batch_size x max_model_len rows, the default) or, with
`kv_cache_tokens` / `gpu_memory_utilization`, a paged pool (block_pool.py, model/paged.py). Paged, step 2
admits the head of the queue only when its prompt's blocks are free (less the longest cached prefix it
can reuse, and keeping one block per running request for its next decode position), step 4 first gives
each decoding request the block its next position needs, preempting the youngest running request when
none is free (its blocks are freed, it goes back to the head of the queue, and its prompt plus the tokens
it generated are recomputed on re-admission: the tokens it emits do not change), and every block that
fills up is entered in the prefix table for later requests.

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
from ..model.paged import PagedKVCache, kv_bytes_per_token
from ..serving.metrics import FlopModel, ServingMetrics
from .block_pool import BlockPool, chain_hash
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
    # paged KV cache: the request's blocks (its block table), the prefix hashes of its full blocks so far
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    n_registered: int = 0                # leading blocks already entered in the prefix table
    preemptions: int = 0
    prefill_skips: int = 0               # steps in a row that gave this prefilling request less than a full chunk

    @property
    def prefill_len(self) -> int:
        """Tokens to put in the cache before decoding: the prompt, and after a preemption (recompute)
        every generated token but the last, which the next decode step feeds."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prefill_len

    def tokens(self, a: int, b: int) -> list[int]:
        """Tokens a..b-1 of prompt + output (without copying the whole sequence)."""
        n = len(self.prompt)
        return self.prompt[a:b] + self.output[max(a - n, 0):max(b - n, 0)]


class Engine:
    def __init__(self, model: DSAForCausalLM, *, pattern: str | None = None, pattern_version: int = 0,
                 max_batch_size: int = 8, max_model_len: int | None = None, chunk_size: int = 256,
                 metrics: ServingMetrics | None = None, enforce_eager: bool = False,
                 indexer_fp8: bool | None = None, warm_up: bool | None = None,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float | None = None,
                 block_size: int = 64, prefix_caching: bool = True, cpu_fast_path: bool | None = None,
                 long_prefill_token_threshold: int | None = None, long_prefill_max_wait: int = 4,
                 quantization: str = "none", cpu_decode_kernels: bool | None = None):
        """cpu_fast_path: run forwards through model/cpu_forward.py (CPU, GQA, dense MLPs, the contiguous
        slot cache); None = whenever it can, False = always the readable reference forward of dsa.py.
        long_prefill_token_threshold: a request with more prompt tokens than this left to prefill is "long"
        and yields the step's prefill budget to short ones (None: 4 x chunk_size; 0: off, FIFO);
        long_prefill_max_wait: steps the oldest long request can be given less than a full chunk before
        it goes first (its guaranteed share: one full chunk in every long_prefill_max_wait + 1 steps).
        quantization: "int8" = weight-only int8 in the CPU fast forward (model/int8.py; it needs that path).
        cpu_gemv: the CPU fast forward's bf16 decode projections through the streaming GEMV kernel
        (kernels/cpu_gemv.py); None = whenever it runs, False = F.linear (the slow twin)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if long_prefill_token_threshold is None:
            # a prompt that needs at most 4 steps is short: among short ones (FIFO) a request waits at most
            # 4 steps for each one ahead of it; only prompts that would hold the budget longer yield
            long_prefill_token_threshold = 4 * chunk_size
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0 (0 turns short-first prefill off), "
                             f"got {long_prefill_token_threshold}")
        if long_prefill_max_wait < 1:
            raise ValueError(f"long_prefill_max_wait must be >= 1 (steps), got {long_prefill_max_wait}")
        self.model = model
        self.args = model.args
        self.max_model_len = min(max_model_len or self.args.max_seq_len, self.args.max_seq_len)
        self.max_batch_size, self.chunk_size = max_batch_size, chunk_size
        self.long_prefill_token_threshold, self.long_prefill_max_wait = long_prefill_token_threshold, long_prefill_max_wait
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
        dtype = model.lm_head.weight.dtype
        make_cache = getattr(model, "make_cache", None)   # a distributed model: its workers hold the caches
        # paged KV pool (a token budget, or a share of GPU memory) or the contiguous slot cache
        self.pool: BlockPool | None = None
        if kv_cache_tokens is not None or gpu_memory_utilization is not None:
            if make_cache is not None:
                raise ValueError("kv_cache_tokens / gpu_memory_utilization (the paged KV cache) do not work with "
                                 "tensor_parallel_size > 1 yet: leave them unset for a sharded model")
            n_blocks = self._pool_blocks(kv_cache_tokens, gpu_memory_utilization, block_size, dtype)
            self.pool = BlockPool(n_blocks, block_size, prefix_caching)
            self.cache = PagedKVCache(self.args, n_blocks, block_size, self.pattern, dtype=dtype,
                                      device=self.device, indexer_fp8=self.indexer_fp8)
            self.max_blocks = -(-self.max_model_len // block_size)   # block-table width
            log.info("paged KV cache: %d blocks of %d tokens (%d tokens, %.2f GB), prefix caching %s",
                     n_blocks - 1, block_size, (n_blocks - 1) * block_size, self.cache.nbytes() / 1e9,
                     "on" if prefix_caching else "off")
        elif make_cache is not None:
            self.cache = make_cache(n_slots, self.max_model_len, self.pattern)
        else:
            self.cache = KVCache(self.args, n_slots, self.max_model_len, self.pattern,
                                 dtype=dtype, device=self.device, indexer_fp8=self.indexer_fp8)
        self.graphs = (DecodeGraphs(model, self.cache, max_batch_size, self.max_model_len,
                                    pad_slot=max_batch_size if padded else 0,
                                    max_blocks=self.max_blocks if self.pool is not None else None)
                       if self.cuda_graphs else None)
        self.cpu_fast = self._cpu_fast_forward(model, cpu_fast_path, quantization, cpu_decode_kernels)
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
        self._patterns_in_use: set[str] | None = None   # paged: patterns whose indexer-key pools are kept
        self.warm_up_s = self.warm_up() if (on_cuda if warm_up is None else warm_up) else 0.0

    def _cpu_fast_forward(self, model: DSAForCausalLM, wanted: bool | None, quantization: str, decode_kernels: bool | None):
        from ..model.cpu_forward import QUANTIZATIONS, CPUFastForward, supports
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if quantization != "none":   # only the fast forward quantises: without it, say so rather than ignore it
            wanted = True if wanted is None else wanted
            if not wanted:
                raise ValueError(f"quantization={quantization!r} runs in the CPU fast forward; "
                                 "cpu_fast_path=False turns that off: use quantization='none'")
            if self.device.type != "cpu":
                raise ValueError(f"quantization={quantization!r} is for CPU replicas (the CPU fast forward); "
                                 f"this model is on {self.device}")
        if wanted is False or self.device.type != "cpu" or self.indexer_fp8:
            return None
        if type(self.cache) is not KVCache:   # the paged pool or a sharded model's caches: the reference
            if wanted:
                raise ValueError("cpu_fast_path=True (or quantization='int8') needs the contiguous slot KV cache "
                                 "(no kv_cache_tokens / gpu_memory_utilization, tensor_parallel_size 1)")
            return None
        why = supports(model)
        if why is not None and wanted:
            raise ValueError(f"the CPU fast forward (cpu_fast_path=True or quantization='int8') cannot run this "
                             f"model: {why}")
        return None if why is not None else CPUFastForward(model, quantization, decode_kernels=decode_kernels)

    @torch.no_grad()
    def _pool_blocks(self, tokens: int | None, utilization: float | None, block_size: int, dtype) -> int:
        """Blocks in the paged pool (the null block included): from a token budget, or, on CUDA, from the
        memory left after the weights and one profiled prefill chunk's activations (vLLM's
        --gpu-memory-utilization: the share of the whole GPU this replica may fill)."""
        if tokens is not None:
            if tokens < block_size:
                raise ValueError(f"kv_cache_tokens={tokens} is less than one block ({block_size} tokens): "
                                 f"give at least max_model_len ({self.max_model_len})")
            return 1 + -(-tokens // block_size)
        if not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        if self.device.type != "cuda":
            raise ValueError("gpu_memory_utilization sizes the KV pool from GPU memory: on the CPU give "
                             "kv_cache_tokens (a token budget) instead")
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = min(self.chunk_size, self.max_model_len)
        self.model(torch.zeros(1, n, dtype=torch.long, device=self.device), pattern=self.pattern,
                   logits_at=torch.tensor([n - 1], device=self.device))
        activations = torch.cuda.max_memory_allocated(self.device) - base
        free, total = torch.cuda.mem_get_info(self.device)
        budget = utilization * total - (total - free) - activations
        per_block = block_size * kv_bytes_per_token(self.args, self.pattern, dtype, self.indexer_fp8)
        n_blocks = int(budget // per_block)
        if n_blocks < 2:
            raise ValueError(f"gpu_memory_utilization={utilization} leaves {budget / 1e9:.2f} GB for the KV cache "
                             f"after the weights and activations, less than two blocks: raise it")
        return n_blocks

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
        blocks = []
        if self.pool is not None:   # borrow blocks for the warm-up rows, give them back after
            need = self.pool.blocks_for(first + 18)
            if need > self.pool.num_free:
                return 0.0
            blocks = self.pool.allocate(need)
        for start, n in ((0, first), (first, 17), (first + 17, 1)):
            tokens = torch.zeros(1, n, dtype=torch.long, device=self.device)
            where = ({"block_tables": torch.tensor([blocks], device=self.device)} if self.pool is not None
                     else {"slots": [0]})
            self.model(tokens, start_pos=[start], cache=self.cache, pattern=self.pattern,
                       logits_at=torch.tensor([n - 1], device=self.device), **where)
        if self.pool is not None:
            self.pool.release(blocks)
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
    @property
    def context_len(self) -> int:
        """The longest sequence one request can hold: max_model_len, or the paged pool if it is smaller."""
        if self.pool is None:
            return self.max_model_len
        return min(self.max_model_len, self.pool.usable * self.pool.block_size)

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context is {self.max_model_len} tokens "
                f"(max_model_len, prompt + at least one generated token): shorten the prompt")
        if len(prompt) >= self.context_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but this replica's KV cache holds {self.context_len} "
                f"tokens (prompt + at least one generated token): shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.args.vocab_size - 1})")

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[TokenChunk], None]) -> EngineRequest:
        """Queue a request; `emit` receives its chunks on the engine thread. Raises on bad input."""
        self.check_prompt(prompt)
        room = self.context_len - len(prompt)
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
                if self.pool is not None and not self._take_blocks(self.waiting[0]):
                    break   # FIFO: the head waits for blocks (requests finishing free theirs)
                req = self.waiting.popleft()
                req.slot = self.free_slots.pop(0)
                req.admitted_at = time.monotonic()
                self.running.append(req)
                if req.params.max_new_tokens == 0:
                    self._finish(req, "length")
            running = list(self.running)
            drop, self._graph_patterns_in_use = self._graph_patterns_in_use, None
            in_use = ({self.pattern} | {r.pattern for r in running} | {r.pattern for r in self.waiting}
                      if self.pool is not None else None)
        if drop is not None and self.graphs is not None:
            self.graphs.drop_patterns(drop | {r.pattern for r in running})
        if self.pool is not None:
            self._release_indexer_pools(in_use)
        self._update_gauges()
        if not running:
            return False
        busy_start = time.monotonic()

        budget = self.chunk_size
        chunks: list[tuple[EngineRequest, list[int]]] = []    # this step's prefill chunks, in budget order
        for req in self._prefill_order([r for r in running if r.prefilling]):
            full = min(self.chunk_size, req.prefill_len - req.cached)   # what the request could use this step
            req.prefill_skips = 0 if budget >= full else req.prefill_skips + 1
            if budget <= 0:
                continue
            chunk = req.tokens(req.cached, min(req.cached + budget, req.prefill_len))
            budget -= len(chunk)
            chunks.append((req, chunk))
        for group in self._prefill_groups(chunks):
            if len(group) > 1 and self._prefill_packed(group):
                continue
            for req, chunk in group:
                self._prefill(req, chunk)

        decoding = [r for r in running if not r.prefilling and not r.finished and r.output]
        if self.pool is not None:
            decoding = self._grow(decoding)
        for pattern in dict.fromkeys(r.pattern for r in decoding):
            self._decode([r for r in decoding if r.pattern == pattern], pattern)
        if self.metrics is not None:
            self._update_gauges()
        log.debug("step: %d running, %.1f ms", len(running), 1000 * (time.monotonic() - busy_start))
        return True

    def _prefill_groups(self, chunks: list[tuple[EngineRequest, list[int]]]) -> list[list[tuple[EngineRequest, list[int]]]]:
        """This step's prefill chunks as forwards: with the CPU fast forward's C kernels, the chunks within top-k
        (short prompts) of one pattern together, one forward each group (`_prefill_packed`); every other chunk
        alone, in order."""
        fast = self.cpu_fast
        if fast is None or not fast.decode_kernels:
            return [[c] for c in chunks]
        packed: dict[str, list] = {}
        alone = []
        for req, chunk in chunks:
            if fast.can_pack(req.cached, len(chunk)):
                packed.setdefault(req.pattern, []).append((req, chunk))
            else:
                alone.append([(req, chunk)])
        return list(packed.values()) + alone

    def _prefill(self, req: EngineRequest, chunk: list[int]) -> None:
        """One request's prefill chunk in its own forward; a failure fails this request alone."""
        start = req.cached
        tokens = torch.tensor([chunk], device=self.device)                         # (1, C)
        try:
            logits = self._forward(tokens, [start], [req.slot], req.pattern,
                                   logits_at=torch.tensor([len(chunk) - 1], device=self.device))
            logits = logits.cpu() if self.device.type != "cpu" else logits           # one sync, then sampling on the host
            self._prefilled(req, len(chunk), logits[0])
        except Exception as exc:   # this request's prefill alone: fail it, keep the others running
            self._fail(req, exc)

    def _prefill_packed(self, group: list[tuple[EngineRequest, list[int]]]) -> bool:
        """Several requests' chunks (within top-k, one pattern) in one CPU forward. False when that forward
        fails: nothing was accepted, and the caller runs the chunks one by one, so that a request that fails
        fails alone (each chunk's forward rewrites what the packed one wrote in its slot)."""
        t0 = time.monotonic()
        pattern = group[0][0].pattern
        try:
            logits = self.cpu_fast.prefill_packed([(chunk, req.cached, req.slot) for req, chunk in group], pattern,
                                                  self.cache)                               # (n, V)
        except Exception as exc:
            log.warning("a packed prefill of %d requests failed (%s: %s); running them one by one", len(group),
                        type(exc).__name__, exc)
            return False
        self._observe_forward(t0, [(req.cached, len(chunk)) for req, chunk in group], pattern)
        for (req, chunk), row in zip(group, logits):
            try:
                self._prefilled(req, len(chunk), row)
            except Exception as exc:
                self._fail(req, exc)
        return True

    def _prefilled(self, req: EngineRequest, n: int, logits: torch.Tensor) -> None:
        """After a prefill chunk of n tokens: the cache holds them; at the prompt's end, the first token from
        the last position's logits (V,)."""
        req.cached += n
        self._register_blocks(req)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(n)
        if not req.prefilling and not req.output:   # a recomputed request resumes decoding instead
            self._accept(req, logits)

    def _prefill_order(self, prefilling: list[EngineRequest]) -> list[EngineRequest]:
        """The order in which prefilling requests (admission order) take this step's prefill budget: short
        ones (at most long_prefill_token_threshold tokens left) first, then long ones; the oldest long one
        first of all when it has been short of a full chunk for long_prefill_max_wait steps in a row.
        Bounds: the oldest long request gets a full chunk in at least one of every long_prefill_max_wait + 1
        steps (so it finishes); it is the only one that can jump the queue, and after a jump (a full chunk)
        it waits long_prefill_max_wait steps before the next, so short requests lose at most one step in
        long_prefill_max_wait + 1 to it (plus one when the next long request becomes the oldest)."""
        threshold = self.long_prefill_token_threshold
        if not threshold:
            return prefilling
        short = [r for r in prefilling if r.prefill_len - r.cached <= threshold]
        long = [r for r in prefilling if r.prefill_len - r.cached > threshold]
        if long and long[0].prefill_skips >= self.long_prefill_max_wait:
            return long[:1] + short + long[1:]
        return short + long

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
            self._register_blocks(r)
            try:
                self._accept(r, row)
            except Exception as exc:
                self._fail(r, exc)

    # -------------------------------------------------------------------------------- paged KV blocks
    def _hashes(self, req: EngineRequest, n_blocks: int) -> list[bytes]:
        """Prefix hashes of req's first n_blocks full blocks (prompt + output), extended incrementally."""
        bs = self.pool.block_size
        while len(req.block_hashes) < n_blocks:
            i = len(req.block_hashes)
            prev = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(chain_hash(prev, req.tokens(i * bs, (i + 1) * bs), req.pattern))
        return req.block_hashes[:n_blocks]

    def _take_blocks(self, req: EngineRequest) -> bool:
        """Give the head of the queue its blocks: the longest cached prefix of what it must prefill (whole
        blocks before its last token: that token's logits are needed, and every block it writes is its
        own), plus fresh blocks for the rest. Keeps one free block per running request for its next
        decode position, so admitting does not force an immediate preemption. Caller holds the lock."""
        pool, n = self.pool, req.prefill_len
        hit = pool.lookup(self._hashes(req, (n - 1) // pool.block_size))
        need = pool.blocks_for(n) - len(hit)
        if need > pool.num_free - len(self.running):
            pool.release(hit)
            return False
        req.blocks = hit + pool.allocate(need)
        req.cached = req.n_registered = len(hit)
        req.cached *= pool.block_size
        if self.metrics is not None:
            self.metrics.prefix_queries.inc(n)
            self.metrics.prefix_hits.inc(req.cached)
        return True

    def _release_indexer_pools(self, in_use: set[str]) -> None:
        """After a pattern switch, once no request runs or waits on the old pattern: free the indexer-key
        pools of layers F in no pattern in use (the pool was sized for the pattern's F layers), forget
        the prefixes cached under patterns not in use (their indexer keys are gone), and drop those
        patterns' CUDA graphs (they read the freed pools)."""
        if in_use == self._patterns_in_use:
            return
        self._patterns_in_use = in_use
        freed = self.cache.release_indexer_layers(in_use)
        if freed:
            forgotten = self.pool.drop_prefixes(in_use)
            if self.graphs is not None:
                self.graphs.drop_patterns(in_use)
            log.info("pattern switch: freed the indexer-key pools of layers %s, forgot %d cached prefix blocks",
                     freed, forgotten)

    def _register_blocks(self, req: EngineRequest) -> None:
        """Enter req's newly full blocks in the prefix table (their tokens are all in the cache now)."""
        if self.pool is None or not self.pool.prefix_caching:
            return
        full = req.cached // self.pool.block_size
        if full > req.n_registered:
            for i, h in enumerate(self._hashes(req, full)[req.n_registered:], start=req.n_registered):
                self.pool.register(req.blocks[i], h, req.pattern)
            req.n_registered = full

    def _grow(self, decoding: list[EngineRequest]) -> list[EngineRequest]:
        """A block for each decoding request whose next position starts one. Out of blocks: preempt the
        youngest running request (latest arrival; it frees its blocks and is recomputed from the queue
        later, its generated tokens kept). Returns the requests that decode this step."""
        preempted: set[int] = set()
        for r in sorted(decoding, key=lambda r: r.arrival):
            if id(r) in preempted:
                continue
            need = r.cached // self.pool.block_size + 1 - len(r.blocks)
            while need > self.pool.num_free:
                with self._lock:
                    victim = max((v for v in self.running if not v.finished), key=lambda v: v.arrival)
                    self._preempt(victim)
                preempted.add(id(victim))
                if victim is r:
                    break
            if id(r) not in preempted and need > 0:
                r.blocks += self.pool.allocate(need)
        return [r for r in decoding if id(r) not in preempted]

    def _preempt(self, req: EngineRequest) -> None:
        """Free req's blocks and slot, queue it first in line to be recomputed (caller holds the lock)."""
        log.info("KV pool out of blocks: preempting request %s (%d tokens cached) for recompute", req.id, req.cached)
        self.running.remove(req)
        self.free_slots.append(req.slot)
        self.free_slots.sort()
        req.slot = None
        self.pool.release(req.blocks)
        req.blocks, req.cached, req.n_registered, req.prefill_skips = [], 0, 0, 0
        req.preemptions += 1
        self.waiting.appendleft(req)
        if self.metrics is not None:
            self.metrics.preemptions.inc()

    def _fail(self, req: EngineRequest, exc: BaseException) -> None:
        """End one request with finish_reason "error"; its slot is freed, the others keep running."""
        log.error("request %s failed in the engine", req.id, exc_info=exc)
        with self._lock:
            self._finish(req, "error", error=f"generation failed inside the engine ({type(exc).__name__}); "
                                            f"request {req.id}, see the replica log")

    def _block_table(self, batch: list[EngineRequest], width: int) -> torch.Tensor:
        """(B, width) int32 block ids, unused entries the null block 0."""
        table = torch.zeros(len(batch), width, dtype=torch.int32)
        for i, r in enumerate(batch):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        return table.to(self.device)

    def _forward(self, tokens: torch.Tensor, starts: list[int], slots: list[int], pattern: str,
                 logits_at: torch.Tensor) -> torch.Tensor:
        """One eager forward; starts and slots go in as host lists (no device sync inside the model). Paged:
        the block tables of the requests in those slots."""
        t0 = time.monotonic()
        if self.cpu_fast is not None:
            logits = self.cpu_fast(tokens, starts, slots, pattern, self.cache, logits_at)
            self._observe_forward(t0, [(st, tokens.shape[1]) for st in starts], pattern)
            return logits
        if self.pool is not None:
            by_slot = {r.slot: r for r in self.running}
            batch = [by_slot[s] for s in slots]
            where = {"block_tables": self._block_table(batch, max(len(r.blocks) for r in batch))}
        else:
            where = {"slots": slots}
        logits = self.model(tokens, start_pos=starts, cache=self.cache, pattern=pattern, logits_at=logits_at,
                            **where)
        self._observe_forward(t0, [(st, tokens.shape[1]) for st in starts], pattern)
        return logits

    def _replay(self, batch: list[EngineRequest], pattern: str) -> torch.Tensor:
        """One decode position for `batch` through its CUDA graph (captured on first use)."""
        t0 = time.monotonic()
        starts = [r.cached for r in batch]
        logits = self.graphs.run([r.output[-1] for r in batch], starts, [r.slot for r in batch], pattern,
                                 tables=[r.blocks for r in batch] if self.pool is not None else None)
        self._observe_forward(t0, [(st, 1) for st in starts], pattern)
        return logits

    def _observe_forward(self, t0: float, rows: list[tuple[int, int]], pattern: str) -> None:
        """rows: (start, tokens) of each sequence in the forward."""
        # On CUDA the forward returns before the device finishes: the time is launch time until the caller
        # syncs; the step's sampling sync follows at once, so per-step sums stay right within one step.
        seconds = time.monotonic() - t0
        self.forwards += 1
        if self.metrics is not None:
            computed, skipped, total = self.flops.forward(rows, pattern.count("F"), len(rows))
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
        if self.pool is not None:
            self.pool.release(req.blocks)
            req.blocks = []
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
            usage = self.pool.usage() if self.pool is not None else used / (self.max_batch_size * self.max_model_len)
        self.metrics.kv_usage.set(usage)
