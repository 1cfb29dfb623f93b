"""The server deployment in the ingress's own process: what `indexcache serve` runs by default (one replica,
one machine), where every streamed token would otherwise cross one more process (the server replica's Ray
stream to the ingress replica) on the same cores as the forward.

`InProcessServer` answers the calls `OpenAIIngress` makes on the server's `DeploymentHandle`
(`handle.info.remote()`, awaitable and cancellable; `handle.options(stream=True).generate.remote(job)`, an
async iterator) from an `IndexCacheServer` built in this process. The model loads in a thread, so the
ingress is up at once and answers 503 with Retry-After until it is ready, as with two deployments; a failed
load is logged and fails every health check (Serve restarts the replica, as it restarts a server replica
whose constructor raised). user_config (pattern, sample rate, price) reaches the server through the
ingress's user_config key "server", checked when it arrives and applied once the model is loaded.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from typing import Any

from indexcache_contracts.serve_app import check_user_config

log = logging.getLogger("indexcache.serve")

LOAD_POLL_S = 0.05   # how often a call waiting for the model looks again (only while it loads)


class InProcessServer:
    def __init__(self, server_args: dict):
        self._lock = threading.Lock()
        self._server = None                  # the IndexCacheServer, once loaded
        self._error: BaseException | None = None
        self._config: dict | None = None     # the latest user_config, applied once loaded
        threading.Thread(target=self._load, args=(server_args,), name="indexcache-load", daemon=True).start()

    def _load(self, server_args: dict) -> None:
        from .server import IndexCacheServer
        try:
            server = IndexCacheServer(**server_args)
        except BaseException as exc:   # the replica stays up to say so (health check, 503s): Serve restarts it
            log.exception("the model failed to load")
            self._error = exc
            return
        with self._lock:
            if self._config is not None:
                server.reconfigure(self._config)
            self._server = server

    # ---------------------------------------------------------------------------- what Serve calls
    def reconfigure(self, user_config: dict) -> None:
        """IndexCacheServer's user_config: a bad one raises now (Serve reports the update as failed)."""
        check_user_config(user_config)
        with self._lock:
            self._config = user_config
            server = self._server
        if server is not None:
            server.reconfigure(user_config)

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the model failed to load: {type(self._error).__name__}: {self._error}")
        if self._server is not None:
            self._server.check_health()

    def close(self) -> None:
        """Stop the engine and flush the traffic sampler (the replica is shutting down)."""
        if self._server is not None:
            self._server.close()

    # ---------------------------------------------------------------------------- what the ingress calls
    async def loaded(self):
        """The IndexCacheServer, once it has loaded (RuntimeError if it failed to)."""
        while self._server is None:
            if self._error is not None:
                raise RuntimeError(f"the model failed to load ({type(self._error).__name__})")
            await asyncio.sleep(LOAD_POLL_S)
        return self._server

    def options(self, stream: bool = False) -> "_Options":
        return _Options(self, stream)

    def __getattr__(self, name: str) -> "_Method":
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name, stream=False)


class _Options:
    """`handle.options(stream=...)`: its methods' calls stream or not."""

    def __init__(self, owner: InProcessServer, stream: bool):
        self.owner, self.stream = owner, stream

    def __getattr__(self, name: str) -> "_Method":
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self.owner, name, self.stream)


class _Method:
    """`handle.<name>.remote(...)`: a task (awaitable, cancellable) for a call; with `options(stream=True)`, an
    async iterator over what the method yields."""

    def __init__(self, owner: InProcessServer, name: str, stream: bool):
        self.owner, self.name, self.stream = owner, name, stream

    def remote(self, *args: Any, **kwargs: Any):
        if self.stream:
            return _Stream(self.owner, self.name, args, kwargs)
        return asyncio.ensure_future(self._call(args, kwargs))

    async def _call(self, args, kwargs):
        result = getattr(await self.owner.loaded(), self.name)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


class _Stream:
    """`handle.options(stream=True).<name>.remote(...)`: the server method's stream, started on first use."""

    def __init__(self, owner: InProcessServer, name: str, args, kwargs):
        self._agen = self._items(owner, name, args, kwargs)

    @staticmethod
    async def _items(owner: InProcessServer, name: str, args, kwargs):
        stream = getattr(await owner.loaded(), name)(*args, **kwargs)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        """The client went away: close the stream (its engine request is aborted)."""
        asyncio.ensure_future(self._agen.aclose())
