"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI routes, SSE streaming), API key, the
app-wide limit on requests in flight (429 beyond it), and the translation between OpenAI bodies and the
typed server stream of protocol.py. Routes: /v1/completions, /v1/chat/completions, /v1/models, /healthz,
/metrics. It takes the server's handle, so tests can bind any server.
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

from indexcache_contracts.serve_app import check_ingress_config

from .protocol import ChatCompletionRequest, CompletionRequest, RequestRefused, _Body

log = logging.getLogger("indexcache.serve")

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
            job = body.to_generate_request(info["max_model_len"]) if chat else body.to_generate_request()
            stream = self.server.options(stream=True).generate.remote(job)
            head = await stream.__anext__()
            if isinstance(head, RequestRefused):
                release()
                return error(head.status, head.message, param=head.param, code=head.code)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            meta = {"id": rid, "created": int(time.time()), "model": info["id"],
                    "system_fingerprint": f"indexcache-v{head.pattern_version}-{head.pattern}"}
            if body.stream:
                return StreamingResponse(self._sse(stream, meta, chat, head.prompt_tokens, release),
                                         media_type="text/event-stream")
            text, reason, n_out, failure = [], None, 0, None
            try:
                async for chunk in stream:
                    text.append(chunk.text)
                    reason, n_out = chunk.finish_reason or reason, chunk.completion_tokens
                    failure = chunk.error or failure
            except Exception:   # the server call itself failed (e.g. its replica died)
                log.exception("a request failed")
                reason = "error"
            release()
            usage = {"prompt_tokens": head.prompt_tokens, "completion_tokens": n_out,
                     "total_tokens": head.prompt_tokens + n_out}
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
                if chunk.finish_reason == "error":   # end the stream the way OpenAI and vLLM do
                    yield _error_event(chunk.error)
                    yield "data: [DONE]\n\n"
                    return
                n_out = chunk.completion_tokens
                reason = None if chunk.finish_reason in (None,) else (
                    "length" if chunk.finish_reason == "length" else "stop")
                if chat:
                    choice = {"index": 0, "delta": {"content": chunk.text} if chunk.text else {},
                              "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": chunk.text, "finish_reason": reason, "logprobs": None}
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
