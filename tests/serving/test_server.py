"""The replica's server in-process (no Ray): the typed stream the ingress reads (protocol.py) against the
reference generate loop, refusals that name the field, and the health check Ray Serve uses to restart a
replica whose engine died."""
import asyncio
import time

import pytest

from indexcache.engine import Engine, SamplingParams
from indexcache.engine.generate import generate
from indexcache.serving.protocol import (ChatCompletionRequest, CompletionRequest, GenerateRequest, RequestRefused,
                                         StreamHead, TextDelta)
from indexcache.serving.server import IndexCacheServer


@pytest.fixture(scope="module")
def server():
    s = IndexCacheServer(model="tiny", max_model_len=64, max_batch_size=2)
    yield s
    s.engine.stop()


def collect(server, request):
    async def run():
        return [m async for m in server.generate(request)]
    return asyncio.run(run())


def test_the_stream_is_a_head_then_deltas_matching_the_reference_generate(server, model, tokenizer):
    prompt = "sparse layers share"
    messages = collect(server, CompletionRequest(prompt=prompt, max_tokens=12, temperature=0).to_generate_request())
    head, deltas = messages[0], messages[1:]
    assert head == StreamHead(prompt_tokens=len(tokenizer.encode(prompt)), pattern=server.engine.pattern,
                              pattern_version=server.engine.pattern_version)
    assert all(isinstance(d, TextDelta) for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason in ("stop", "length") and deltas[-1].error is None
    ids = generate(model, [tokenizer.encode(prompt)], SamplingParams(max_new_tokens=12,
                   stop_token_ids=tuple(tokenizer.stop_token_ids)))[0]
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids)
    assert deltas[-1].completion_tokens == len(ids)


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(server, model, tokenizer):
    prompt = "the index cache"
    full = tokenizer.decode(generate(model, [tokenizer.encode(prompt)], SamplingParams(max_new_tokens=20))[0])
    stop = full[5:7]
    deltas = collect(server, CompletionRequest(prompt=prompt, max_tokens=20, temperature=0,
                                               stop=stop).to_generate_request())[1:]
    assert "".join(d.text for d in deltas) == full[:full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_bad_input_is_refused_before_any_text_naming_the_field(server):
    too_long = collect(server, GenerateRequest(max_tokens=4, prompt="x" * 64))
    assert len(too_long) == 1 and isinstance(too_long[0], RequestRefused)
    assert (too_long[0].status, too_long[0].param, too_long[0].code) == (400, "prompt", "context_length_exceeded")
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "caf\u00e9"}]).to_generate_request(64)
    refused = collect(server, chat)
    assert len(refused) == 1 and refused[0].param == "messages" and "ASCII" in refused[0].message


def test_a_chat_request_without_a_limit_may_run_to_the_end_of_the_context():
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.to_generate_request(max_model_len=300).max_tokens == 300
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                 max_completion_tokens=5).to_generate_request(300).max_tokens == 5
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        GenerateRequest(max_tokens=1)


def test_the_long_prefill_threshold_reaches_the_engine():
    """`indexcache serve --long-prefill-token-threshold` / the app arg: the replica's engine schedules with
    it (0: first come, first served); unset, the engine's default of 4 prefill chunks."""
    for given, expected in ((0, 0), (100, 100), (None, 4 * 32)):
        s = IndexCacheServer(model="tiny", max_model_len=64, max_batch_size=1, chunk_size=32,
                             long_prefill_token_threshold=given)
        try:
            assert s.engine.long_prefill_token_threshold == expected
        finally:
            s.engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the crash is the point
def test_health_check_fails_once_the_engine_thread_has_died():
    class DyingEngine(Engine):
        def _loop(self):
            raise RuntimeError("the scheduler thread crashed")

    healthy = IndexCacheServer(model="tiny", max_model_len=64, max_batch_size=1)
    try:
        healthy.check_health()
    finally:
        healthy.engine.stop()
    with pytest.raises(RuntimeError, match="engine thread is not running"):
        healthy.check_health()   # a stopped engine is as dead as a crashed one

    dying = IndexCacheServer(model="tiny", max_model_len=64, max_batch_size=1, engine_class=DyingEngine)
    deadline = time.monotonic() + 10
    while dying.engine.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="engine thread is not running"):
        dying.check_health()


def test_a_failure_before_the_engine_is_a_500_refusal_counted_as_an_error(server):
    """A bug outside the engine (here: the tokenizer raising) refuses that request with a 500 and counts it as
    finish_reason="error"; the server keeps serving."""
    errors = server.metrics._requests.labels(**server.metrics.labels, finish_reason="error")
    before = errors._value.get()
    real = server.tokenizer.encode

    def broken(text):
        raise RuntimeError("tokenizer bug")

    server.tokenizer.encode = broken
    try:
        out = collect(server, GenerateRequest(max_tokens=4, prompt="x"))
    finally:
        server.tokenizer.encode = real
    assert len(out) == 1 and isinstance(out[0], RequestRefused) and out[0].status == 500
    assert "RuntimeError" in out[0].message and errors._value.get() == before + 1
    assert isinstance(collect(server, GenerateRequest(max_tokens=2, prompt="ok"))[-1], TextDelta)


def test_generated_tokens_are_counted_as_usage_counts_them(server, model, tokenizer):
    """A request that ends with the end-of-text token: the counter grows by its completion_tokens, which do not
    include that token."""
    import random
    from indexcache.engine.generate import generate as reference

    rng = random.Random(5)
    words = ["the", "index", "cache", "sparse", "layer", "a", "b", "zz", "42"]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=tuple(tokenizer.stop_token_ids))
    for _ in range(200):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        ids = reference(model, [tokenizer.encode(prompt)], params)[0]
        if ids[-1] in tokenizer.stop_token_ids and len(ids) > 2:
            break
    else:
        pytest.fail("no prompt ends with EOS")
    counter = server.metrics.generation_tokens
    before = counter._value.get()
    deltas = collect(server, CompletionRequest(prompt=prompt, max_tokens=30, temperature=0).to_generate_request())[1:]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(ids) - 1
    assert counter._value.get() - before == deltas[-1].completion_tokens
