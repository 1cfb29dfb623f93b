"""The server deployment: one per replica (one per GPU), owning the model, the engine, the metrics and
the traffic sampler. The ingress (ingress.py) calls `generate()` with a `GenerateRequest` and reads the
typed stream described in protocol.py.

Its runtime knobs come from `user_config` through `reconfigure()` (docs/contracts.md): `pattern`,
`pattern_version`, `sample_rate`, `gpu_hourly_usd`; the local admin route reaches `set_pattern()`. A
pattern change applies to new requests; in-flight ones finish on the pattern they started with.

With `metrics_port`, the replica serves `/metrics`, `/healthz` and `/readyz` on that port in its own pod
(ReplicaPort): up from the start of the constructor, ready (200) once the model is loaded and the engine
runs, so Kubernetes' readiness probe sees the replica, not the app. This module imports no Ray: `app.py`
wraps the class in a Serve deployment, and tests can build one in-process.
"""

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import AsyncIterator, Callable, Protocol

from indexcache_contracts.serve_app import check_user_config

from ..model.loading import load_model
from .detokenizer import TextStream
from .protocol import GenerateRequest, RequestRefused, StreamHead, TextDelta, TokenLogprob

log = logging.getLogger("indexcache.serve")


class ReplicaPort:
    """/metrics, /healthz (the process answers) and /readyz (200 once `ready()`, else 503 with Retry-After)
    on one port of the replica's pod, on a daemon thread."""

    def __init__(self, port: int, metrics: Callable[[], bytes | None], ready: Callable[[], str | None]):
        """metrics(): exposition text (None while loading); ready(): None when ready, else why not."""
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST
                    self._send(200, metrics() or b"", CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status": "ok"}')
                elif path == "/readyz":
                    why = ready()
                    body = json.dumps({"status": "ready" if why is None else "not ready", "reason": why}).encode()
                    self._send(200 if why is None else 503, body, retry=why is not None)
                else:
                    self._send(404, b'{"status": "not found"}')

            def _send(self, code, body, ctype="application/json", retry=False):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if retry:
                    self.send_header("Retry-After", "5")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # probes every few seconds: not worth a log line each
                pass

        self.server = ThreadingHTTPServer(("", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="indexcache-replica-port", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

def configure_cpu(threads: int | None) -> int:
    """The replica's CPU settings: torch intra-op threads = `threads` (default: the cores in this process's
    affinity mask), one inter-op thread (the engine runs one forward at a time), and normal priority: Ray
    starts workers at nice 15, which loses every core to anything else on the machine. Returns threads."""
    import torch

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:   # only settable before the first inter-op work; a second replica in-process
        pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError) as exc:   # lowering the niceness needs CAP_SYS_NICE
        log.warning("the replica runs at nice %d and cannot go back to 0 (%s)", os.getpriority(os.PRIO_PROCESS, 0), exc)
    return threads


def default_chunk_size() -> int:
    """Prefill tokens per engine step when the app does not say: 256 on a GPU; 1024 on a CPU, where a 1K-token
    prompt in chunks of 256 took 2.5x the wall time of one chunk (4.79 s vs 1.91 s, 1.85 vs 1.38 CPU-seconds;
    bench/cpu_prefill.py, bench/RESULTS.md) at the price of decode steps of other requests waiting for it."""
    import torch

    return 256 if torch.cuda.is_available() else 1024


def replica_dtype(dtype: str) -> str:
    """'auto' on a CPU machine -> the dtype the CPU probe picks (model/cpu_dtype.py), as a name, so that
    the in-process model and tensor-parallel workers load the same; anything else unchanged."""
    import torch

    if dtype != "auto" or torch.cuda.is_available():
        return dtype
    from ..model.cpu_dtype import resolve_cpu_dtype
    return str(resolve_cpu_dtype("auto")).removeprefix("torch.")


class ServingEngine(Protocol):
    """What the server needs from an engine (`indexcache.engine.Engine` is one)."""
    pattern: str
    pattern_version: int
    max_model_len: int

    def check_prompt(self, prompt: list[int]) -> None: ...                 # raises ValueError / ContextLengthError
    def set_pattern(self, pattern: str, version: int) -> None: ...
    def generate_batches(self, prompt: list[int], params, on_submit: Callable | None = None) -> AsyncIterator: ...
    def abort(self, request, reason: str = "abort") -> None: ...            # `request`: what on_submit received
    def is_alive(self) -> bool: ...
    def stop(self) -> None: ...


def paged_kv_args(kv_cache_tokens, gpu_memory_utilization, block_size, prefix_caching) -> dict:
    """Engine keyword arguments of the paged KV cache; none when it is off (an injected engine class
    without them keeps working)."""
    if kv_cache_tokens is None and gpu_memory_utilization is None:
        return {}
    return dict(kv_cache_tokens=kv_cache_tokens, gpu_memory_utilization=gpu_memory_utilization,
                block_size=block_size, prefix_caching=prefix_caching)


class IndexCacheServer:
    """Owns the model, engine, metrics and sampler of one replica."""

    def __init__(self, model: str = "smollm2", served_model_name: str | None = None, deployment: str = "local",
                 max_batch_size: int = 8, max_model_len: int | None = 2048, chunk_size: int | None = None,
                 samples_dir: str | None = None, sample_rate: float = 0.0, gpu_hourly_usd: float = 0.0,
                 metrics_port: int | None = None, dtype: str = "auto", engine_class: type | None = None,
                 model_cache: str | None = None, enforce_eager: bool = False, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float | None = None, block_size: int = 64, prefix_caching: bool = True,
                 tensor_parallel_size: int = 1, threads: int | None = None,
                 long_prefill_token_threshold: int | None = None, quantization: str = "none"):
        """engine_class: an Engine subclass (tests inject faults through it); default Engine.
        tensor_parallel_size > 1: the model is sharded over that many Ray worker actors (engine/distributed.py)
        in this replica's placement group (bundles 1..N; one is reserved when the replica has none).
        threads: torch CPU threads (default: every core this process may use; Ray would leave one per
        requested CPU).
        quantization: "int8" = weight-only int8 in the CPU fast forward (a CPU replica, one rank)."""
        from ..engine import Engine
        from .metrics import ServingMetrics
        from .sampler import SamplerConfig, TrafficSampler

        self.metrics = self.engine = self.sampler = self.port = None
        if metrics_port:   # first: the readiness probe answers "loading" while the model loads
            self.port = self._serve_replica_port(int(metrics_port))
        self.threads = configure_cpu(threads)
        chunk_size = chunk_size or default_chunk_size()
        dtype = replica_dtype(dtype)   # one concrete dtype for this replica and its tensor-parallel workers
        if tensor_parallel_size > 1:
            self.model, pattern, self.tokenizer, name = self._start_workers(
                model, tensor_parallel_size, dtype, model_cache, chunk_size=chunk_size, enforce_eager=enforce_eager)
        else:
            self.model, pattern, self.tokenizer, name = load_model(model, dtype, cache_dir=model_cache)
        self.served_model_name = served_model_name or name
        self.metrics = ServingMetrics(self.served_model_name, deployment, self.model.args.n_layers, gpu_hourly_usd)
        engine_class = engine_class or Engine
        # only when asked: an injected engine class without the argument keeps working
        quantized = {} if quantization == "none" else {"quantization": quantization}
        self.engine: ServingEngine = engine_class(self.model, pattern=pattern, max_batch_size=max_batch_size,
                                                  max_model_len=max_model_len, chunk_size=chunk_size,
                                                  long_prefill_token_threshold=long_prefill_token_threshold,
                                                  metrics=self.metrics, enforce_eager=enforce_eager, **quantized,
                                                  **paged_kv_args(kv_cache_tokens, gpu_memory_utilization,
                                                                  block_size, prefix_caching)).start()
        if sample_rate and not samples_dir:
            raise ValueError("sample_rate > 0 needs samples_dir (where the sample shards go)")
        self.sampler = TrafficSampler(SamplerConfig(samples_dir, rate=sample_rate)).start() if samples_dir else None
        self._token_text: dict[int, str] = {}

    @staticmethod
    def _start_workers(model: str, world: int, dtype: str, cache_dir: str | None, **engine_options):
        import ray

        from ..engine.distributed import start_ray_workers
        from ..model.loading import load_tokenizer_of
        group = ray.util.get_current_placement_group()   # Serve's placement_group_bundles (app.server_resources)
        distributed = start_ray_workers(model, world, dtype=dtype, cache_dir=cache_dir, engine_options=engine_options,
                                        placement_group=group, first_bundle=1)
        tokenizer, name = load_tokenizer_of(model, cache_dir)
        return distributed, distributed.loaded_pattern, tokenizer, name

    def _serve_replica_port(self, port: int) -> ReplicaPort | None:
        try:
            return ReplicaPort(port, lambda: self.metrics.exposition() if self.metrics else None, self.not_ready)
        except OSError as exc:   # two replicas on one node: the ingress route still shows this replica's metrics
            log.warning("metrics port %d unavailable (%s); metrics stay reachable through /metrics", port, exc)
            return None

    def not_ready(self) -> str | None:
        """None when this replica can serve; else why not."""
        if self.engine is None:
            return "the model is loading"
        if not self.engine.is_alive():
            return "the engine thread is not running"
        return None

    # ------------------------------------------------------------------ runtime knobs
    def reconfigure(self, user_config: dict) -> None:
        check_user_config(user_config)            # keys and kinds: the contract the operator writes to
        version = user_config.get("pattern_version", self.engine.pattern_version)
        rate = user_config.get("sample_rate")
        if rate is not None and rate > 0 and self.sampler is None:
            raise ValueError("user_config.sample_rate > 0 but the app has no samples_dir; set samples_dir")
        price = user_config.get("gpu_hourly_usd")
        pattern = user_config.get("pattern")
        if not pattern and user_config.get("freq") is not None:   # an explicit pattern wins over freq/offset
            from ..model.pattern import resolve_pattern
            try:
                pattern = resolve_pattern(self.model.args.n_layers, freq=user_config["freq"],
                                          offset=user_config.get("offset", 2))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"user_config.freq/offset: {exc}") from None
        pattern = pattern or self.engine.pattern
        try:
            self.engine.set_pattern(pattern, version)
        except ValueError as exc:
            raise ValueError(f"user_config.pattern: {exc}") from None
        self._apply_rest(rate, price)
        log.info("pattern v%d %s (%d/%d F layers)", version, pattern, pattern.count("F"), len(pattern))

    def set_pattern(self, pattern: str | None = None, freq: int | None = None, offset: int | None = None) -> dict:
        """The local admin route (POST /v1/admin/pattern): a new pattern, or freq/offset resolved with this
        model's layer count, as version current + 1. Returns the new state, or {"error", "param"} for a bad
        one (and the current pattern stays)."""
        from indexcache_contracts.pattern import pattern_problem

        from ..model.pattern import resolve_pattern

        n_layers = self.model.args.n_layers
        if pattern is not None and (freq is not None or offset is not None):
            return {"error": "give either pattern or freq/offset, not both", "param": "pattern"}
        if pattern is None and freq is None:
            return {"error": "give a pattern (one F or S per layer, e.g. FSSF...) or freq (and offset)",
                    "param": "pattern"}
        if pattern is not None:
            if (why := pattern_problem(pattern, n_layers, field="pattern")):
                return {"error": why, "param": "pattern"}
        else:
            try:
                pattern = resolve_pattern(n_layers, freq=freq, offset=2 if offset is None else offset)
            except (TypeError, ValueError) as exc:
                return {"error": str(exc), "param": "offset" if "offset" in str(exc) else "freq"}
        previous = {"pattern": self.engine.pattern, "pattern_version": self.engine.pattern_version}
        try:
            self.engine.set_pattern(pattern, self.engine.pattern_version + 1)
        except ValueError as exc:   # e.g. an S layer whose indexer the checkpoint dropped
            return {"error": str(exc), "param": "pattern"}
        log.info("pattern v%d %s (%d/%d F layers), set through the admin route", self.engine.pattern_version,
                 pattern, pattern.count("F"), n_layers)
        return {"pattern": self.engine.pattern, "pattern_version": self.engine.pattern_version,
                "full_layers": pattern.count("F"), "num_layers": n_layers, "previous": previous}

    def _apply_rest(self, rate, price) -> None:
        if rate is not None and self.sampler is not None:
            self.sampler.set_rate(float(rate))
        if self.sampler is not None:
            # samples kept so far reach the volume now rather than up to flush_interval_s later: a user
            # who turns sampling off (or changes anything) finds what was kept ready to calibrate on
            self.sampler.flush()
        if price is not None:
            self.metrics.set_price(price)

    # ------------------------------------------------------------------ requests
    def _tokenize(self, request: GenerateRequest) -> list[int]:
        """-> prompt ids. Raises ValueError for bad input."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        prompt = request.prompt
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def _token_logprob(self, chunk) -> TokenLogprob:
        """The engine's (token id, logprob, top ids) -> texts; single tokens decode the same every time, so
        their texts are cached (the vocabulary bounds the cache)."""
        def text(token_id: int) -> str:
            t = self._token_text.get(token_id)
            if t is None:
                t = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return t
        return TokenLogprob(text(chunk.token_id), chunk.logprob,
                            tuple((text(i), lp) for i, lp in chunk.top_logprobs or ()))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamHead | RequestRefused | TextDelta]:
        """The stream of protocol.py: a head (`StreamHead`, or `RequestRefused` and nothing more), then
        `TextDelta`s until one carries a finish reason. Generated tokens are counted here, token by token,
        exactly as the response's usage counts them (an end-of-text token is not; nothing after a stop
        string is)."""
        from ..engine import ContextLengthError, SamplingParams

        field = request.input_field
        try:
            params = SamplingParams(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                    top_p=request.top_p, seed=request.seed, logprobs=request.logprobs,
                                    stop_token_ids=tuple(self.tokenizer.stop_token_ids))
        except ValueError as exc:   # each message starts with the field it is about
            yield RequestRefused(str(exc), status=400, param=str(exc).split()[0])
            return
        try:
            ids = self._tokenize(request)
            self.engine.check_prompt(ids)
        except ContextLengthError as exc:
            yield RequestRefused(str(exc), status=400, param=field, code="context_length_exceeded")
            return
        except ValueError as exc:
            yield RequestRefused(str(exc), status=400, param=field)
            return
        except Exception as exc:
            if type(exc).__module__.startswith("jinja2"):   # the chat template refused the conversation
                yield RequestRefused(f"the model's chat template refused these messages: {exc}", status=400,
                                     param=field)
            else:
                log.exception("request failed before generation")
                self.metrics.observe_failed_before_engine()
                yield RequestRefused(f"the request failed inside the server ({type(exc).__name__}); "
                                     "see the replica log", status=500)
            return
        if self.sampler is not None:
            if isinstance(request.prompt, str):
                self.sampler.offer(prompt=request.prompt)
            elif request.messages is not None:
                self.sampler.offer(messages=request.messages)
        holder = []
        # lists of the chunks ready at once: a lagging stream (Ray's per-message cost) sends one delta for
        # several tokens instead of falling further behind
        agen = self.engine.generate_batches(ids, params, on_submit=holder.append)
        text = TextStream(self.tokenizer.decode, list(request.stop))
        want_logprobs = request.logprobs is not None
        pending: list[TokenLogprob] = []   # logprobs of tokens whose text has not been sent yet
        first = True
        try:
            async for batch in agen:
                if first:
                    yield StreamHead(prompt_tokens=len(ids), pattern=batch[0].pattern,
                                     pattern_version=batch[0].pattern_version)
                    first = False
                deltas, reason, error = [], None, None
                for chunk in batch:
                    token = chunk.token_id if chunk.token_id not in params.stop_token_ids else None
                    delta, stopped = text.push(token, final=chunk.finish_reason is not None)
                    deltas.append(delta)
                    if token is not None:
                        self.metrics.generation_tokens.inc()
                        if want_logprobs and chunk.logprob is not None:
                            pending.append(self._token_logprob(chunk))
                    reason, error = ("stop" if stopped else chunk.finish_reason), chunk.error
                    if stopped and chunk.finish_reason is None:
                        self.engine.abort(holder[0], "stop")
                    if reason:   # nothing after a stop string or the end counts
                        break
                delta = "".join(deltas)
                if delta or reason:
                    yield TextDelta(delta, finish_reason=reason, completion_tokens=len(text.ids), error=error,
                                    logprobs=tuple(pending) if want_logprobs else None)
                    pending = []
                if reason:
                    self.metrics.observe_usage(len(ids), len(text.ids))
                    return
        except Exception as exc:   # e.g. the tokenizer cannot decode: end this request as an error, not the replica
            log.exception("request failed while streaming its output")
            if holder:
                self.engine.abort(holder[0], "error")   # the engine counts it (finish_reason="error")
            else:
                self.metrics.observe_failed_before_engine()
            if first:
                yield StreamHead(prompt_tokens=len(ids), pattern=self.engine.pattern,
                                 pattern_version=self.engine.pattern_version)
            yield TextDelta("", finish_reason="error", completion_tokens=len(text.ids),
                            error=f"generation failed ({type(exc).__name__}); see the replica log",
                            logprobs=tuple(pending) if want_logprobs else None)
        finally:
            await agen.aclose()

    # ------------------------------------------------------------------ for the ingress
    def record_http(self, responses: dict, rejected: dict) -> None:
        """HTTP outcomes the ingress counted since its last report (it has no registry of its own: every
        series lives in the replicas' registries, which Prometheus scrapes per pod)."""
        self.metrics.observe_http(responses, rejected)

    def ready(self) -> dict:
        """What /readyz reports: info() plus whether the engine runs."""
        why = self.not_ready()
        return {**self.info(), "ready": why is None, "reason": why}

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def info(self) -> dict:
        return {"id": self.served_model_name, "max_model_len": self.engine.max_model_len,
                "pattern": self.engine.pattern, "pattern_version": self.engine.pattern_version,
                "replica_pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve calls this; a dead engine thread restarts the replica."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine thread is not running")

    def close(self) -> None:
        """Stop the replica port, the engine (and its workers) and the traffic sampler, which flushes."""
        try:
            if self.port is not None:
                self.port.close()
            self.engine.stop()
            if hasattr(self.model, "workers"):
                self.model.stop()
            if self.sampler is not None:
                self.sampler.stop()
        except Exception:
            pass

    def __del__(self):
        self.close()
