"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI routes, SSE streaming), API key, the
app-wide limit on requests in flight (429 beyond it), and the translation between OpenAI bodies and the
typed server stream of protocol.py. It takes the server's handle, so tests can bind any server.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /v1/admin/pattern (GET: the live pattern; POST:
switch it), /healthz (liveness: this process answers), /readyz (the model is loaded and the engine runs;
503 + Retry-After while loading), /metrics.

Every failure is answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: bodies are
parsed here from raw bytes (protocol.parse_body), unknown paths and methods, a server that is still
loading (503), and any bug (500, never a bare text body). Error bodies are ASCII-escaped JSON, so no input
can make rendering them fail.

HTTP outcomes (responses by route and code, rejections by reason) are counted here and reported to the
server deployment about once a second (`record_http`): the replicas' registries hold every series, and
Prometheus scrapes them per pod (metrics.py).
"""

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexcache_contracts.metrics import HTTP_ROUTES
from indexcache_contracts.serve_app import check_ingress_config

# a module, not its object: Serve pickles the ingress class by value, and a global object would be copied
from . import metrics as outcomes
from .protocol import (MAX_BODY_BYTES, BadRequest, ChatCompletionRequest, CompletionRequest, RequestRefused,
                       TokenLogprob, _Body, _Strict, parse_body)

log = logging.getLogger("indexcache.serve")

api = FastAPI(title="IndexCache OpenAI-compatible API")

READY_WAIT_S = 1.0       # how long a request waits for a server that is still loading before its 503
RETRY_AFTER_LOADING = "5"
UNCOUNTED_PATHS = ("/metrics", "/healthz", "/readyz")   # probes and scrapes: not API traffic


# ---------------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------------
class AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting user input (even a lone surrogate) always renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return AsciiJSON({"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                "param": param, "code": code}}, status_code=status, headers=headers)


def _event(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


def _error_event(message: str | None) -> str:
    """The event that ends a stream whose generation failed after the 200 was sent: `data: {"error": ...}`,
    which the openai client raises as APIError (OpenAI and vLLM do the same)."""
    return _event({"error": {"message": message or "generation failed inside the server; see the replica log",
                             "type": "server_error", "param": None, "code": 500}})


# ---------------------------------------------------------------------------------------------------
# HTTP outcomes: counted in this process (metrics.HTTP_OUTCOMES), reported to the server deployment
# ---------------------------------------------------------------------------------------------------
def _route(scope) -> str | None:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    if path in UNCOUNTED_PATHS:
        return None
    return path if path in HTTP_ROUTES else "other"


class CountAndCatch:
    """ASGI middleware: counts every API response by route and status code, and turns an exception that
    escaped a route before any byte was sent into an OpenAI-shaped 500 (never a plain-text body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route(scope)
        started = []

        async def send_counted(message):
            if message["type"] == "http.response.start" and not started:
                started.append(message["status"])
                if route is not None:
                    outcomes.HTTP_OUTCOMES.responses[(route, str(message["status"]))] += 1
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if started:   # mid-response (e.g. the client went away): nothing left to answer
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await error(500, "internal server error; see the ingress log")(scope, receive, send_counted)


api.add_middleware(CountAndCatch)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        return error(404, f"no route {request.method} {request.url.path}; the API is under /v1 "
                          "(completions, chat/completions, models)", code="not_found")
    if exc.status_code == 405:
        return error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                     headers=dict(exc.headers or {}))
    return error(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid body"}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return error(400, f"{field}: {first.get('msg')}", param=field)


# ---------------------------------------------------------------------------------------------------
# logprobs in OpenAI's two shapes
# ---------------------------------------------------------------------------------------------------
def completion_logprobs(entries: tuple[TokenLogprob, ...], offset: int) -> dict:
    """/v1/completions: parallel lists; top_logprobs maps token text -> logprob; text_offset counts characters
    from the start of the completion (each token's text, as its own decode gives it)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: tuple[TokenLogprob, ...]) -> dict:
    """/v1/chat/completions: one object per token with its top alternatives."""
    return {"content": [{**_chat_token(e.token, e.logprob), "top_logprobs": [_chat_token(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


async def _awaited(response):
    """A DeploymentResponse as a coroutine (for asyncio.wait_for)."""
    return await response


class AdminPatternRequest(_Strict):
    """POST /v1/admin/pattern: {"pattern": "FSSF..."} or {"freq": 4, "offset": 2}."""
    pattern: str | None = None
    freq: int | None = None
    offset: int | None = None


async def sse_events(stream, meta: dict, chat: bool, prompt_tokens: int, release,
                     usage_chunk: bool = True) -> AsyncIterator[str]:
    """OpenAI server-sent events for one streamed request (`stream`: the server's TextDeltas after its head);
    `release` runs once the stream ends however it ends. A vanished client cancels this generator, which
    cancels the server call."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    try:
        if chat:
            yield _event({**meta, "object": obj, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        n_out, offset = 0, 0
        async for chunk in stream:
            failed = chunk.finish_reason == "error"
            if failed and not chunk.text and chunk.logprobs is None:   # end the stream the way OpenAI and vLLM do
                yield _error_event(chunk.error)
                yield "data: [DONE]\n\n"
                return
            n_out = chunk.completion_tokens
            # the text that arrived with the failure (tokens produced before it, sent in one message) still
            # goes out first, without a finish_reason, then the error event
            reason = None if chunk.finish_reason in (None, "error") else (
                "length" if chunk.finish_reason == "length" else "stop")
            if chat:
                choice = {"index": 0, "delta": {"content": chunk.text} if chunk.text else {},
                          "finish_reason": reason}
                if chunk.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(chunk.logprobs)
            else:
                choice = {"index": 0, "text": chunk.text, "finish_reason": reason, "logprobs": None}
                if chunk.logprobs is not None:
                    choice["logprobs"] = completion_logprobs(chunk.logprobs, offset)
                    offset += sum(len(e.token) for e in chunk.logprobs)
            yield _event({**meta, "object": obj, "choices": [choice]})
            if failed:
                yield _error_event(chunk.error)
                yield "data: [DONE]\n\n"
                return
        if usage_chunk:
            yield _event({**meta, "object": obj, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": n_out,
                "total_tokens": prompt_tokens + n_out}})
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
# the deployment
# ---------------------------------------------------------------------------------------------------
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle | None, max_ongoing_requests: int = 32, api_key: str | None = None,
                 num_replicas: int = 1, server_args: dict | None = None):
        """server: the server deployment's handle; or None with server_args, IndexCacheServer's arguments: the
        server runs in this process (local_server.py; the app's ingress_in_server)."""
        self.in_process = None
        if server_args is not None:
            from .local_server import InProcessServer
            server = self.in_process = InProcessServer(server_args)
        elif server is None:
            raise ValueError("OpenAIIngress needs the server deployment's handle or server_args")
        self.server = server
        self.max_ongoing = max_ongoing_requests
        self.api_key = api_key or os.environ.get("INDEXCACHE_API_KEY") or None
        self.num_replicas = num_replicas
        self.ongoing = 0
        self._info: dict | None = None
        self._probe: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None

    def reconfigure(self, config: dict) -> None:
        """Ray Serve calls this with the ingress's user_config, at start and on every change, without a
        restart: the operator raises the app-wide limit here when the replica count changes. Requests
        already in flight keep their slots; a lower limit only refuses new ones until enough finish."""
        n = check_ingress_config(config)
        if "server" in (config or {}):
            if self.in_process is None:
                raise ValueError("user_config key 'server' is for an app with ingress_in_server; here the server "
                                 "is its own deployment: give IndexCacheServer its user_config")
            self.in_process.reconfigure(config["server"])
        if n is not None:
            self.max_ongoing = n

    def check_health(self) -> None:
        """Ray Serve calls this: with the server in this process, its health (a failed load, a dead engine)."""
        if self.in_process is not None:
            self.in_process.check_health()

    def __del__(self):
        if getattr(self, "in_process", None) is not None:
            self.in_process.close()

    # ------------------------------------------------------------------ the server, and whether it is up
    async def info(self) -> dict | None:
        """The server's model id and context, once it has loaded; None while no replica answers within
        READY_WAIT_S (loading). One probe at a time, shared by all waiting requests."""
        self._start_reporter()
        if self._info is not None:
            return self._info
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._fetch_info())
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), timeout=READY_WAIT_S)
        except asyncio.TimeoutError:
            return None
        except Exception:   # the server failed to start: still not ready; the next request probes again
            log.warning("the server deployment did not answer info()", exc_info=True)
            return None
        return self._info

    async def _fetch_info(self) -> None:
        self._info = await self.server.info.remote()

    def _not_ready(self) -> JSONResponse:
        outcomes.HTTP_OUTCOMES.rejected["not_ready"] += 1
        return error(503, "the model is still loading; retry shortly", code="model_not_ready",
                     headers={"Retry-After": RETRY_AFTER_LOADING})

    def _start_reporter(self) -> None:
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.report_outcomes()

    async def report_outcomes(self) -> None:
        """Hand the counts gathered since the last report to the server (kept for the next try on failure)."""
        responses, rejected = outcomes.HTTP_OUTCOMES.take()
        if not responses and not rejected:
            return
        call = self.server.record_http.remote(responses, rejected)
        try:
            await asyncio.wait_for(_awaited(call), timeout=5)
        except Exception as exc:   # loading, restarting: keep them
            log.warning("could not report HTTP counts to the server (%s: %s); kept for the next try",
                        type(exc).__name__, exc)
            call.cancel()
            outcomes.HTTP_OUTCOMES.give_back(responses, rejected)

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            outcomes.HTTP_OUTCOMES.rejected["unauthorized"] += 1
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return None

    # ------------------------------------------------------------------ probes and metrics
    @api.get("/healthz")
    async def healthz(self):
        """Liveness: this process answers (also while the model loads)."""
        self._start_reporter()
        return {"status": "ok", "model": self._info["id"] if self._info else None, "ready": self._info is not None,
                "ongoing_requests": self.ongoing, "max_ongoing_requests": self.max_ongoing}

    @api.get("/readyz")
    async def readyz(self):
        """Readiness: a server replica has its model loaded and its engine running."""
        call = self.server.ready.remote()
        try:
            state = await asyncio.wait_for(_awaited(call), timeout=READY_WAIT_S * 2)
        except Exception as exc:
            log.warning("readyz: %s: %s", type(exc).__name__, exc)
            call.cancel()
            state = {"ready": False, "reason": "the model is loading (no server replica answers yet)"}
        if state.get("ready"):
            self._info = self._info or {k: state[k] for k in ("id", "max_model_len")}
            return {"status": "ready", "model": state["id"], "pattern": state["pattern"],
                    "pattern_version": state["pattern_version"]}
        return AsciiJSON({"status": "not ready", "reason": state.get("reason")}, status_code=503,
                         headers={"Retry-After": RETRY_AFTER_LOADING})

    @api.get("/metrics")
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST
        if await self.info() is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_LOADING})
        await self.report_outcomes()   # a scrape right after a response sees it counted
        return Response(await self.server.metrics_text.remote(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the API
    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        info = await self.info()
        if info is None:
            return self._not_ready()
        return {"object": "list", "data": [{"id": info["id"], "object": "model", "created": 0,
                                            "owned_by": "indexcache", "max_model_len": info["max_model_len"]}]}

    @api.get("/v1/admin/pattern")
    async def get_pattern(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        if await self.info() is None:
            return self._not_ready()
        info = await self.server.info.remote()
        return {"pattern": info["pattern"], "pattern_version": info["pattern_version"],
                "full_layers": info["pattern"].count("F"), "num_layers": len(info["pattern"])}

    @api.post("/v1/admin/pattern")
    async def set_pattern(self, request: Request):
        """Switch the IndexCache pattern of the running replica (local use: on Kubernetes the pattern is the
        IndexCacheDeployment's, and the operator's next update overrides this)."""
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = parse_body(await self._body(request), AdminPatternRequest)
        except BadRequest as exc:
            outcomes.HTTP_OUTCOMES.rejected["invalid_request"] += 1
            return error(400, exc.message, param=exc.param, code=exc.code)
        if self.num_replicas > 1:
            return error(409, f"this app runs {self.num_replicas} server replicas and the route reaches one; "
                              "change the pattern of all through the IndexCacheServer user_config",
                         code="multiple_replicas")
        if await self.info() is None:
            return self._not_ready()
        result = await self.server.set_pattern.remote(body.pattern, body.freq, body.offset)
        if "error" in result:
            outcomes.HTTP_OUTCOMES.rejected["invalid_request"] += 1
            return error(400, f"{result['param']}: {result['error']}" if not result["error"].startswith(
                result["param"]) else result["error"], param=result["param"])
        return result

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}", param="body")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", param="body")
        return raw

    async def _serve(self, request: Request, kind: type[_Body], chat: bool):
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = parse_body(await self._body(request), kind)
        except BadRequest as exc:
            outcomes.HTTP_OUTCOMES.rejected["invalid_request"] += 1
            return error(400, exc.message, param=exc.param, code=exc.code)
        info = await self.info()
        if info is None:
            return self._not_ready()
        if body.model is not None and body.model != info["id"]:
            outcomes.HTTP_OUTCOMES.rejected["model_not_found"] += 1
            return error(404, f"model {body.model!r} is not served here; this server serves {info['id']!r}",
                         param="model", code="model_not_found")
        if self.ongoing >= self.max_ongoing:
            outcomes.HTTP_OUTCOMES.rejected["too_many_requests"] += 1
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
            job = body.to_generate_request(info["max_model_len"]) if chat else body.to_generate_request()
            stream = self.server.options(stream=True).generate.remote(job)
            head = await stream.__anext__()
            if isinstance(head, RequestRefused):
                release()
                if head.status < 500:
                    outcomes.HTTP_OUTCOMES.rejected["context_length" if head.code == "context_length_exceeded"
                                      else "invalid_request"] += 1
                return error(head.status, head.message, param=head.param, code=head.code)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            meta = {"id": rid, "created": int(time.time()), "model": info["id"],
                    "system_fingerprint": f"indexcache-v{head.pattern_version}-{head.pattern}"}
            if body.streaming:
                usage_chunk = body.stream_options is None or body.stream_options.include_usage is not False
                return StreamingResponse(sse_events(stream, meta, chat, head.prompt_tokens, release, usage_chunk),
                                         media_type="text/event-stream")
            text, reason, n_out, failure, logprobs = [], None, 0, None, []
            try:
                async for chunk in stream:
                    text.append(chunk.text)
                    reason, n_out = chunk.finish_reason or reason, chunk.completion_tokens
                    failure = chunk.error or failure
                    logprobs.extend(chunk.logprobs or ())
            except Exception:   # the server call itself failed (e.g. its replica died)
                log.exception("a request failed")
                reason = "error"
            release()
            usage = {"prompt_tokens": head.prompt_tokens, "completion_tokens": n_out,
                     "total_tokens": head.prompt_tokens + n_out}
            if reason == "error":
                return error(500, failure or "generation failed inside the server; see the replica log")
            want = job.logprobs is not None
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                          "finish_reason": reason, "logprobs": chat_logprobs(tuple(logprobs)) if want else None}
                return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
            choice = {"index": 0, "text": "".join(text), "finish_reason": reason,
                      "logprobs": completion_logprobs(tuple(logprobs), 0) if want else None}
            return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
        except BaseException:
            release()
            raise
