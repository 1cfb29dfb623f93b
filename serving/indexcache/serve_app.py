"""The Ray Serve app: an OpenAI-compatible API over the continuous batching engine.

Roles as in `ray.serve.llm`:
  - `IndexCacheServer` (deployment; owns the model, the engine, the metrics and the traffic sampler; one
    per GPU). Its runtime knobs come from `user_config` through `reconfigure()` (docs/contracts.md):
    `pattern`, `pattern_version`, `sample_rate`, `gpu_hourly_usd`. A pattern change applies to new
    requests; in-flight ones finish on the pattern they started with.
  - `OpenAIIngress` (deployment; FastAPI routes): /v1/completions, /v1/chat/completions (SSE streaming),
    /v1/models, /healthz, /metrics. It takes the server's handle, so tests can bind any server.
  - `build_app(args)`: the application builder the operator and `indexcache serve` use
    (`indexcache.serve_app:build_app`).

The server streams dicts to the ingress: first `{"prompt_tokens": n, ...}` (or `{"error": ..., "status":
4xx, "param": ...}` for bad input, so the ingress can answer with a proper status before any byte of a
stream is sent), then `{"text": delta, "finish_reason": ..., ...}` chunks. A failure after the head ends
with a chunk whose finish_reason is "error" (and an `error` message); the ingress turns it into an SSE
error event, or a 500 when not streaming.
"""

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger("indexcache.serve")

# freq/offset: the upstream rule, resolved here (the replica knows its layer count; the operator need not)
USER_CONFIG_KEYS = ("pattern", "pattern_version", "sample_rate", "gpu_hourly_usd", "freq", "offset")


# ---------------------------------------------------------------------------------------------------
# request bodies (OpenAI fields we honour; unknown fields are ignored, as OpenAI-compatible servers do)
# ---------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Body):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=0)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


# ---------------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------------
def bundled_model_dir() -> Path:
    """The SmolLM2 DSA checkpoint: packaged GGUF + bundled trained indexer, converted once and cached."""
    from .smollm2 import bundled_checkpoint
    return bundled_checkpoint()


def load_model(model: str, dtype: str = "float32"):
    """'tiny' | 'smollm2' | a checkpoint directory -> (model, default pattern, tokenizer, name)."""
    import torch

    if model == "tiny":
        from .tiny import TINY_MODEL_NAME, CharTokenizer, tiny_model
        m = tiny_model(seed=0)
        return m, m.default_pattern, CharTokenizer(), TINY_MODEL_NAME
    from .checkpoint import load_checkpoint
    from .tokenizer import load_tokenizer
    path = bundled_model_dir() if model == "smollm2" else Path(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, pattern = load_checkpoint(path, dtype=getattr(torch, dtype), device=device)
    return m, pattern, load_tokenizer(path), ("smollm2-dsa" if model == "smollm2" else path.name)


# ---------------------------------------------------------------------------------------------------
# the server deployment
# ---------------------------------------------------------------------------------------------------
def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still become a stop string and must not be streamed yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class TextStream:
    """One request's generated token ids -> text to stream, cut at the first stop string.

    The obvious way (decode all output ids and search all the text, every token) is quadratic in the
    output. Here each token costs work proportional to the stop strings and the last token or two:
      - decoding: only the tokens since the last point where the text was complete, with the tokens
        before it as context (a byte-level BPE token may hold half of a UTF-8 character, a SentencePiece
        token's leading space depends on its left neighbour); `text` grows by the difference;
      - searching: only `visible[searched - (longest stop - 1):]`, the new text plus the characters
        before it that a new match could start in (a match wholly inside the old text was found earlier).
    `visible` is the text so far without a trailing unfinished character (U+FFFD while its bytes are
    still coming); at the end everything is flushed. The slow twin in tests/serving/test_text_stream.py
    (decode and search everything each token) cuts at the same token and the same character.
    """

    def __init__(self, decode, stops=()):
        self.decode = decode
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.prefix = 0          # first token of the decoding context
        self.read = 0            # ids[:read] are decoded into `text`
        self.text = ""           # decode(ids[:read]): complete characters only
        self.tail = ""           # text of ids[read:], may end in unfinished characters
        self.searched = 0        # no stop string ends inside visible[:searched]
        self.sent = 0            # visible[:sent] has been streamed

    def push(self, token_id: int | None, final: bool = False) -> tuple[str, bool]:
        """Add one generated token (None: none, e.g. an end without a token); `final`: the request ended.
        Returns (text to stream now, whether a stop string ended the text; then nothing more comes)."""
        if token_id is not None:
            self.ids.append(token_id)
            context = self.decode(self.ids[self.prefix:self.read])
            self.tail = self.decode(self.ids[self.prefix:])[len(context):]
            if self.tail and not self.tail.endswith("\ufffd"):
                self.text += self.tail
                self.prefix, self.read, self.tail = self.read, len(self.ids), ""
        tail = self.tail if final else self.tail.rstrip("\ufffd")
        total = len(self.text) + len(tail)
        start = max(0, self.searched - max(self.longest - 1, 0))     # <= self.sent
        window = self.text[start:] + tail if start <= len(self.text) else tail[start - len(self.text):]
        self.searched = total
        cut = min((i for i in (window.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            end, stopped = start + cut, True
        else:
            end, stopped = (total if final else total - _holdback(window, self.stops)), False
        delta = window[self.sent - start:max(end, self.sent) - start]
        self.sent = max(end, self.sent)
        return delta, stopped


class IndexCacheServer:
    """Owns the model, engine, metrics and sampler of one replica."""

    def __init__(self, model: str = "smollm2", served_model_name: str | None = None, deployment: str = "local",
                 max_batch_size: int = 8, max_model_len: int | None = 2048, chunk_size: int = 256,
                 samples_dir: str | None = None, sample_rate: float = 0.0, gpu_hourly_usd: float = 0.0,
                 metrics_port: int | None = None, dtype: str = "float32", engine_class: type | None = None):
        """engine_class: an Engine subclass (tests inject faults through it); default Engine."""
        from .engine import Engine
        from .metrics import ServingMetrics
        from .sampler import SamplerConfig, TrafficSampler

        self.model, pattern, self.tokenizer, name = load_model(model, dtype)
        self.served_model_name = served_model_name or name
        self.metrics = ServingMetrics(self.served_model_name, deployment, self.model.args.n_layers, gpu_hourly_usd)
        self.engine = (engine_class or Engine)(self.model, pattern=pattern, max_batch_size=max_batch_size,
                             max_model_len=max_model_len, chunk_size=chunk_size, metrics=self.metrics).start()
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
        if not isinstance(user_config, dict):
            raise ValueError(f"user_config must be a mapping with keys {USER_CONFIG_KEYS}, got {user_config!r}")
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"user_config has unknown key(s) {unknown}; allowed: {', '.join(USER_CONFIG_KEYS)}")
        version = user_config.get("pattern_version", self.engine.pattern_version)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"user_config.pattern_version must be a non-negative integer, got {version!r}")
        rate = user_config.get("sample_rate")
        if rate is not None:
            if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ValueError(f"user_config.sample_rate must be a number in [0, 1], got {rate!r}")
            if rate > 0 and self.sampler is None:
                raise ValueError("user_config.sample_rate > 0 but the app has no samples_dir; set samples_dir")
        price = user_config.get("gpu_hourly_usd")
        if price is not None and (not isinstance(price, (int, float)) or price < 0):
            raise ValueError(f"user_config.gpu_hourly_usd must be a number >= 0, got {price!r}")
        pattern = user_config.get("pattern")
        if not pattern and user_config.get("freq") is not None:   # an explicit pattern wins over freq/offset
            from indexcache.pattern import resolve_pattern
            try:
                pattern = resolve_pattern(self.model.args.n_layers, freq=user_config["freq"],
                                          offset=user_config.get("offset", 2))
            except ValueError as exc:
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
    def _tokenize(self, body: dict) -> tuple[list[int], str]:
        """-> (prompt ids, the field they came from). Raises ValueError for bad input."""
        if body.get("messages") is not None:
            return self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True), "messages"
        prompt = body["prompt"]
        return (list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)), "prompt"

    async def generate(self, body: dict) -> AsyncIterator[dict]:
        from .engine import ContextLengthError
        from .generate import SamplingParams

        field = "messages" if body.get("messages") is not None else "prompt"
        try:
            ids, field = self._tokenize(body)
            self.engine.check_prompt(ids)
            params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    top_p=body["top_p"], seed=body.get("seed"),
                                    stop_token_ids=tuple(self.tokenizer.stop_token_ids))
        except ContextLengthError as exc:
            yield {"error": str(exc), "status": 400, "param": field, "code": "context_length_exceeded"}
            return
        except ValueError as exc:
            yield {"error": str(exc), "status": 400, "param": field}
            return
        if self.sampler is not None:
            if isinstance(body.get("prompt"), str):
                self.sampler.offer(prompt=body["prompt"])
            elif body.get("messages") is not None:
                self.sampler.offer(messages=body["messages"])
        holder = []
        agen = self.engine.generate(ids, params, on_submit=holder.append)
        text = TextStream(self.tokenizer.decode, body.get("stop") or [])
        first = True
        try:
            async for chunk in agen:
                if first:
                    yield {"prompt_tokens": len(ids), "pattern": chunk.pattern,
                           "pattern_version": chunk.pattern_version}
                    first = False
                token = chunk.token_id if chunk.token_id not in params.stop_token_ids else None
                delta, stopped = text.push(token, final=chunk.finish_reason is not None)
                reason = "stop" if stopped else chunk.finish_reason
                if stopped and chunk.finish_reason is None:
                    self.engine.abort(holder[0], "stop")
                if delta or reason:
                    yield {"text": delta, "finish_reason": reason, "completion_tokens": len(text.ids),
                           "error": chunk.error}
                if reason:
                    return
        except Exception as exc:   # e.g. the tokenizer cannot decode: end this request as an error, not the replica
            log.exception("request failed while streaming its output")
            if holder:
                self.engine.abort(holder[0], "error")
            if first:
                yield {"prompt_tokens": len(ids), "pattern": self.engine.pattern,
                       "pattern_version": self.engine.pattern_version}
            yield {"text": "", "finish_reason": "error", "completion_tokens": len(text.ids),
                   "error": f"generation failed ({type(exc).__name__}); see the replica log"}
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
        thread = self.engine._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def __del__(self):
        try:
            self.engine.stop()
            if self.sampler is not None:
                self.sampler.stop()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------
# the ingress deployment
# ---------------------------------------------------------------------------------------------------
api = FastAPI(title="IndexCache OpenAI-compatible API")


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _event(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


def _error_event(message: str | None) -> str:
    """The event that ends a stream whose generation failed after the 200 was sent: `data: {"error": ...}`,
    which the openai client raises as APIError (OpenAI and vLLM do the same)."""
    return _event({"error": {"message": message or "generation failed inside the server; see the replica log",
                             "type": "server_error", "param": None, "code": 500}})


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    return error(400, f"{field}: {first.get('msg')}", param=field)


# Ray Serve's own cap on the ingress replica sits this far above the app-wide limit, so that the ingress
# answers 429 itself (at Serve's cap, Ray would queue instead).
INGRESS_HEADROOM = 64


def check_ingress_config(config: dict | None) -> int | None:
    """The ingress's user_config: {"max_ongoing_requests": n}, the app-wide limit on requests in flight
    (429 beyond it). Returns n (None when the key is absent); a bad value raises naming the field."""
    config = config or {}
    unknown = set(config) - {"max_ongoing_requests"}
    if unknown:
        raise ValueError(f"OpenAIIngress user_config: unknown key(s) {sorted(unknown)}; "
                         "the only key is max_ongoing_requests")
    n = config.get("max_ongoing_requests")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"OpenAIIngress user_config max_ongoing_requests={n!r}: must be an integer >= 1 "
                         "(the app-wide limit: per-replica limit x replicas)")
    return n


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, max_ongoing_requests: int = 32, api_key: str | None = None):
        self.server = server
        self.max_ongoing = max_ongoing_requests
        self.api_key = api_key or os.environ.get("INDEXCACHE_API_KEY") or None
        self.ongoing = 0
        self._info: dict | None = None

    def reconfigure(self, config: dict) -> None:
        """Ray Serve calls this with the ingress's user_config, at start and on every change, without a
        restart: the operator raises the app-wide limit here when the replica count changes. Requests
        already in flight keep their slots; a lower limit only refuses new ones until enough finish."""
        n = check_ingress_config(config)
        if n is not None:
            self.max_ongoing = n

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.server.info.remote()
        return self._info

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return None

    @api.get("/healthz")
    async def healthz(self):
        info = await self.info()
        return {"status": "ok", "model": info["id"], "ongoing_requests": self.ongoing,
                "max_ongoing_requests": self.max_ongoing}

    @api.get("/metrics")
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(await self.server.metrics_text.remote(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        info = await self.info()
        return {"object": "list", "data": [{"id": info["id"], "object": "model", "created": 0,
                                            "owned_by": "indexcache", "max_model_len": info["max_model_len"]}]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(request, body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self._serve(request, body, chat=True)

    async def _serve(self, request: Request, body: _Body, chat: bool):
        if (denied := self._auth(request)) is not None:
            return denied
        info = await self.info()
        if body.model is not None and body.model != info["id"]:
            return error(404, f"model {body.model!r} is not served here; this server serves {info['id']!r}",
                         param="model", code="model_not_found")
        if self.ongoing >= self.max_ongoing:
            return error(429, f"the server is at its limit of {self.max_ongoing} ongoing requests; retry shortly",
                         code="too_many_requests", headers={"Retry-After": "1"})
        self.ongoing += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.ongoing -= 1

        try:
            job = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop}
            if chat:
                job["messages"] = [m.model_dump() for m in body.messages]
                limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
                job["max_tokens"] = info["max_model_len"] if limit is None else limit
            else:
                job["prompt"], job["max_tokens"] = body.prompt, body.max_tokens
            stream = self.server.options(stream=True).generate.remote(job)
            head = await stream.__anext__()
            if "error" in head:
                release()
                return error(head["status"], head["error"], param=head.get("param"), code=head.get("code"))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            meta = {"id": rid, "created": int(time.time()), "model": info["id"],
                    "system_fingerprint": f"indexcache-v{head['pattern_version']}-{head['pattern']}"}
            if body.stream:
                return StreamingResponse(self._sse(stream, meta, chat, head["prompt_tokens"], release),
                                         media_type="text/event-stream")
            text, reason, n_out, failure = [], None, 0, None
            try:
                async for chunk in stream:
                    text.append(chunk["text"])
                    reason, n_out = chunk["finish_reason"] or reason, chunk["completion_tokens"]
                    failure = chunk.get("error") or failure
            except Exception:   # the server call itself failed (e.g. its replica died)
                log.exception("a request failed")
                reason = "error"
            release()
            usage = {"prompt_tokens": head["prompt_tokens"], "completion_tokens": n_out,
                     "total_tokens": head["prompt_tokens"] + n_out}
            if reason == "error":
                return error(500, failure or "generation failed inside the server; see the replica log")
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                          "finish_reason": reason, "logprobs": None}
                return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
            choice = {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None}
            return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
        except BaseException:
            release()
            raise

    async def _sse(self, stream, meta: dict, chat: bool, prompt_tokens: int, release) -> AsyncIterator[str]:
        """OpenAI server-sent events; a vanished client cancels this generator, which cancels the server call."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield _event({**meta, "object": obj, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            n_out = 0
            async for chunk in stream:
                if chunk["finish_reason"] == "error":   # end the stream the way OpenAI and vLLM do
                    yield _error_event(chunk.get("error"))
                    yield "data: [DONE]\n\n"
                    return
                n_out = chunk["completion_tokens"]
                reason = None if chunk["finish_reason"] in (None,) else (
                    "length" if chunk["finish_reason"] == "length" else "stop")
                if chat:
                    choice = {"index": 0, "delta": {"content": chunk["text"]} if chunk["text"] else {},
                              "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": chunk["text"], "finish_reason": reason, "logprobs": None}
                yield _event({**meta, "object": obj, "choices": [choice]})
            yield _event({**meta, "object": obj, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out}})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception:   # the server call itself failed (e.g. its replica died): tell the client, in band
            log.exception("a streaming request failed")
            yield _error_event(None)
            yield "data: [DONE]\n\n"
        finally:
            release()



# ---------------------------------------------------------------------------------------------------
# the application builder
# ---------------------------------------------------------------------------------------------------
class AppArgs(BaseModel):
    """Structural settings (a change redeploys); runtime knobs go in IndexCacheServer's user_config."""
    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2"                 # checkpoint dir, "smollm2" (bundled) or "tiny" (random demo)
    served_model_name: str | None = None
    deployment: str = "local"              # the IndexCacheDeployment name (metric label)
    max_ongoing_requests: int = Field(32, ge=1)   # per server replica (Ray Serve's cap on each)
    # the app-wide limit (429 beyond it); default max_ongoing_requests x num_replicas
    ingress_max_ongoing_requests: int | None = Field(None, ge=1)
    max_batch_size: int = Field(8, ge=1)   # KV cache slots: requests decoded together
    max_model_len: int | None = Field(2048, ge=2)
    chunk_size: int = Field(256, ge=1)     # prefill tokens per engine step
    samples_dir: str | None = None
    sample_rate: float = Field(0.0, ge=0, le=1)
    gpu_hourly_usd: float = Field(0.0, ge=0)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    api_key: str | None = None
    pattern: str | None = None             # initial user_config pattern (default: the checkpoint's)
    num_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    dtype: str = "float32"


def build_app(args: dict[str, Any]) -> serve.Application:
    """`indexcache.serve_app:build_app`: the ingress bound to the server deployment."""
    try:
        a = AppArgs(**(args or {}))
    except Exception as exc:   # pydantic names the field
        raise ValueError(f"indexcache.serve_app:build_app args: {exc}") from None
    user_config: dict = {"sample_rate": a.sample_rate, "gpu_hourly_usd": a.gpu_hourly_usd}
    if a.pattern:
        user_config.update(pattern=a.pattern, pattern_version=0)
    server = serve.deployment(IndexCacheServer, name="IndexCacheServer").options(
        num_replicas=a.num_replicas, user_config=user_config,
        # headroom over the ingress limit for /metrics and /healthz calls while saturated
        max_ongoing_requests=a.max_ongoing_requests + 8,
        ray_actor_options={"num_gpus": a.num_gpus, "num_cpus": a.num_cpus},
        health_check_period_s=10)
    # One ingress replica counts every request in flight, whichever server replica runs it; its limit
    # is the app's: the per-replica limit times the replicas (user_config, so it changes in place).
    app_limit = a.ingress_max_ongoing_requests or a.max_ongoing_requests * a.num_replicas
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress").options(
        max_ongoing_requests=app_limit + INGRESS_HEADROOM, user_config={"max_ongoing_requests": app_limit},
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(
        server.bind(model=a.model, served_model_name=a.served_model_name, deployment=a.deployment,
                    max_batch_size=a.max_batch_size, max_model_len=a.max_model_len, chunk_size=a.chunk_size,
                    samples_dir=a.samples_dir, sample_rate=a.sample_rate, gpu_hourly_usd=a.gpu_hourly_usd,
                    metrics_port=a.metrics_port, dtype=a.dtype),
        max_ongoing_requests=app_limit, api_key=a.api_key)


def start_local(app_args: dict, host: str = "127.0.0.1", port: int = 8000, num_cpus: int = 2,
                name: str = "indexcache") -> str:
    """The embedded default: Ray on loopback, Serve's HTTP proxy on host:port, the app at "/".
    Returns the base URL. Workers import this very checkout of `indexcache` (PYTHONPATH), not another
    installed copy."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # else Ray binds the external interface
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    package_root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_args), name=name, route_prefix="/")
    return f"http://{host}:{port}"

