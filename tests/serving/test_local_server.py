"""The server inside the ingress's process (`local_server.InProcessServer`, the app's ingress_in_server, what
`indexcache serve` runs): the calls the ingress makes on a server handle give what the server itself gives,
while the model loads they wait (the ingress turns that into 503s), a user_config that arrives before the
model is applied once it has loaded, a bad one is refused at once, and a model that fails to load fails every
health check and every call instead of hanging them. The whole app through `indexcache serve`:
tests/serving/test_cli_serve.py."""
import asyncio

import pytest

from indexcache.serving.local_server import InProcessServer
from indexcache.serving.protocol import GenerateRequest, StreamHead, TextDelta
from indexcache.serving.server import IndexCacheServer

ARGS = dict(model="tiny", max_model_len=128, max_batch_size=2)


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_calls_and_streams_match_the_server_and_config_waits_for_the_model():
    local = InProcessServer(ARGS)
    local.reconfigure({"pattern": "FFSFFS", "pattern_version": 3})    # before the model has loaded
    job = GenerateRequest(prompt=[5, 6, 7, 8], max_tokens=6, temperature=0.0)

    async def run():
        info = await local.info.remote()
        items = await _collect(local.options(stream=True).generate.remote(job))
        return info, items

    info, items = asyncio.run(run())
    assert (info["pattern"], info["pattern_version"]) == ("FFSFFS", 3)
    local.check_health()
    assert isinstance(items[0], StreamHead) and items[0].pattern_version == 3
    deltas = [d for d in items[1:] if isinstance(d, TextDelta)]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 6

    direct = IndexCacheServer(**ARGS)     # the same server on its own, the same pattern: the same stream
    direct.reconfigure({"pattern": "FFSFFS", "pattern_version": 3})
    try:
        want = asyncio.run(_collect(direct.generate(job)))
    finally:
        direct.close()
        local.close()
    # the same head and the same text and counts (how tokens group into deltas depends on when the consumer
    # reads: a lagging one gets several tokens in one delta)
    text = lambda stream: "".join(d.text for d in stream[1:])
    assert items[0] == want[0] and text(items) == text(want)
    assert (items[-1].finish_reason, items[-1].completion_tokens) == (want[-1].finish_reason, want[-1].completion_tokens)


def test_a_bad_user_config_is_refused_naming_the_key():
    local = InProcessServer(ARGS)
    try:
        with pytest.raises(ValueError, match="sample_rate"):
            local.reconfigure({"sample_rate": 2})
        with pytest.raises(ValueError, match="unknown key"):
            local.reconfigure({"patern": "FFFFFF"})
    finally:
        asyncio.run(local.loaded())
        local.close()


def test_a_model_that_fails_to_load_fails_health_checks_and_calls():
    local = InProcessServer(dict(model="/nonexistent/checkpoint"))

    async def call():
        return await asyncio.wait_for(local.info.remote(), 60)

    with pytest.raises(RuntimeError, match="failed to load"):
        asyncio.run(call())
    with pytest.raises(RuntimeError, match="failed to load"):
        local.check_health()


def test_calls_wait_while_the_model_loads():
    """What the ingress sees while loading: a call does not answer (it times out, the route answers 503)."""
    local = InProcessServer(dict(model="tiny", max_model_len=128))

    async def probe():
        call = local.ready.remote()
        try:
            await asyncio.wait_for(asyncio.shield(call), 0.001)
            return "answered"
        except asyncio.TimeoutError:
            call.cancel()
            return "waiting"

    async def ready():
        return await local.ready.remote()

    assert asyncio.run(probe()) == "waiting"
    asyncio.run(local.loaded())
    assert asyncio.run(ready())["ready"] is True
    local.close()
