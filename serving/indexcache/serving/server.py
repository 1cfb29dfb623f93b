"""The server deployment: one per replica (one per GPU), owning the model, the engine, the metrics and
the traffic sampler. The ingress (ingress.py) calls `generate()` with a `GenerateRequest` and reads the
typed stream described in protocol.py.

Its runtime knobs come from `user_config` through `reconfigure()` (docs/contracts.md): `pattern`,
`pattern_version`, `sample_rate`, `gpu_hourly_usd`. A pattern change applies to new requests; in-flight
ones finish on the pattern they started with. This module imports no Ray: `app.py` wraps the class in a
Serve deployment, and tests can build one in-process.
"""

import logging
import os
from typing import AsyncIterator, Callable, Protocol

from indexcache_contracts.serve_app import check_user_config

from ..model.loading import load_model
from .detokenizer import TextStream
from .protocol import GenerateRequest, RequestRefused, StreamHead, TextDelta

log = logging.getLogger("indexcache.serve")

class ServingEngine(Protocol):
    """What the server needs from an engine (`indexcache.engine.Engine` is one)."""
    pattern: str
    pattern_version: int
    max_model_len: int

    def check_prompt(self, prompt: list[int]) -> None: ...                 # raises ValueError / ContextLengthError
    def set_pattern(self, pattern: str, version: int) -> None: ...
    def generate(self, prompt: list[int], params, on_submit: Callable | None = None) -> AsyncIterator: ...
    def abort(self, request, reason: str = "abort") -> None: ...            # `request`: what on_submit received
    def is_alive(self) -> bool: ...
    def stop(self) -> None: ...


class IndexCacheServer:
    """Owns the model, engine, metrics and sampler of one replica."""

    def __init__(self, model: str = "smollm2", served_model_name: str | None = None, deployment: str = "local",
                 max_batch_size: int = 8, max_model_len: int | None = 2048, chunk_size: int = 256,
                 samples_dir: str | None = None, sample_rate: float = 0.0, gpu_hourly_usd: float = 0.0,
                 metrics_port: int | None = None, dtype: str = "auto", engine_class: type | None = None,
                 model_cache: str | None = None, enforce_eager: bool = False):
        """engine_class: an Engine subclass (tests inject faults through it); default Engine."""
        from ..engine import Engine
        from .metrics import ServingMetrics
        from .sampler import SamplerConfig, TrafficSampler

        self.model, pattern, self.tokenizer, name = load_model(model, dtype, cache_dir=model_cache)
        self.served_model_name = served_model_name or name
        self.metrics = ServingMetrics(self.served_model_name, deployment, self.model.args.n_layers, gpu_hourly_usd)
        engine_class = engine_class or Engine
        self.engine: ServingEngine = engine_class(self.model, pattern=pattern, max_batch_size=max_batch_size,
                                                  max_model_len=max_model_len, chunk_size=chunk_size,
                                                  metrics=self.metrics, enforce_eager=enforce_eager).start()
        if sample_rate and not samples_dir:
            raise ValueError("sample_rate > 0 needs samples_dir (where the sample shards go)")
        self.sampler = TrafficSampler(SamplerConfig(samples_dir, rate=sample_rate)).start() if samples_dir else None
        if metrics_port:
            self._serve_metrics_port(int(metrics_port))

    def _serve_metrics_port(self, port: int) -> None:
        from prometheus_client import start_http_server
        try:
            start_http_server(port, registry=self.metrics.registry)
        except OSError as exc:   # two replicas on one node: the ingress route still shows this replica's metrics
            log.warning("metrics port %d unavailable (%s); metrics stay reachable through /metrics", port, exc)

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
        if rate is not None and self.sampler is not None:
            self.sampler.set_rate(float(rate))
        if self.sampler is not None:
            # samples kept so far reach the volume now rather than up to flush_interval_s later: a user
            # who turns sampling off (or changes anything) finds what was kept ready to calibrate on
            self.sampler.flush()
        if price is not None:
            self.metrics.set_price(price)
        log.info("pattern v%d %s (%d/%d F layers)", version, pattern, pattern.count("F"), len(pattern))

    # ------------------------------------------------------------------ requests
    def _tokenize(self, request: GenerateRequest) -> list[int]:
        """-> prompt ids. Raises ValueError for bad input."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        prompt = request.prompt
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamHead | RequestRefused | TextDelta]:
        """The stream of protocol.py: a head (`StreamHead`, or `RequestRefused` and nothing more), then
        `TextDelta`s until one carries a finish reason."""
        from ..engine import ContextLengthError, SamplingParams

        field = request.input_field
        try:
            ids = self._tokenize(request)
            self.engine.check_prompt(ids)
            params = SamplingParams(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                    top_p=request.top_p, seed=request.seed,
                                    stop_token_ids=tuple(self.tokenizer.stop_token_ids))
        except ContextLengthError as exc:
            yield RequestRefused(str(exc), status=400, param=field, code="context_length_exceeded")
            return
        except ValueError as exc:
            yield RequestRefused(str(exc), status=400, param=field)
            return
        if self.sampler is not None:
            if isinstance(request.prompt, str):
                self.sampler.offer(prompt=request.prompt)
            elif request.messages is not None:
                self.sampler.offer(messages=request.messages)
        holder = []
        agen = self.engine.generate(ids, params, on_submit=holder.append)
        text = TextStream(self.tokenizer.decode, list(request.stop))
        first = True
        try:
            async for chunk in agen:
                if first:
                    yield StreamHead(prompt_tokens=len(ids), pattern=chunk.pattern,
                                     pattern_version=chunk.pattern_version)
                    first = False
                token = chunk.token_id if chunk.token_id not in params.stop_token_ids else None
                delta, stopped = text.push(token, final=chunk.finish_reason is not None)
                reason = "stop" if stopped else chunk.finish_reason
                if stopped and chunk.finish_reason is None:
                    self.engine.abort(holder[0], "stop")
                if delta or reason:
                    yield TextDelta(delta, finish_reason=reason, completion_tokens=len(text.ids), error=chunk.error)
                if reason:
                    return
        except Exception as exc:   # e.g. the tokenizer cannot decode: end this request as an error, not the replica
            log.exception("request failed while streaming its output")
            if holder:
                self.engine.abort(holder[0], "error")
            if first:
                yield StreamHead(prompt_tokens=len(ids), pattern=self.engine.pattern,
                                 pattern_version=self.engine.pattern_version)
            yield TextDelta("", finish_reason="error", completion_tokens=len(text.ids),
                            error=f"generation failed ({type(exc).__name__}); see the replica log")
        finally:
            await agen.aclose()

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

    def __del__(self):
        try:
            self.engine.stop()
            if self.sampler is not None:
                self.sampler.stop()
        except Exception:
            pass
