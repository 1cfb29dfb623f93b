"""The metrics agree with what the client saw, read back from a real Prometheus scraping the running app:
responses by route and status code, rejections by reason, generated tokens exactly as `usage` counts them
(an end-of-text token is not a generated token), per-request phase and length histograms."""
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx
import pytest

from indexcache.engine import SamplingParams
from indexcache.engine.generate import generate

ROOT = Path(__file__).resolve().parents[2]
for path in (str(ROOT), str(ROOT / "tests" / "dashboards")):
    if path not in sys.path:
        sys.path.insert(0, path)
from prom_helpers import Prometheus  # noqa: E402

MODEL = "indexcache-tiny"
SEL = 'deployment="test-icd"'
C, CHAT = "/v1/completions", "/v1/chat/completions"


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series with labels: value} (the route reports the ingress's counts first)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for k, v in samples.items() if k.split("{")[0] == name
               and all(f'{key}="{val}"' in k for key, val in labels.items()))


def eos_prompts(model, tokenizer, pattern, n=2, max_tokens=30):
    """Prompts whose greedy continuation ends with the end-of-text token within max_tokens (found now)."""
    rng = random.Random(5)
    words = ["the", "index", "cache", "sparse", "layer", "a", "b", "zz", "42"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(120)]
    outs = generate(model, [tokenizer.encode(p) for p in prompts],
                    SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tuple(tokenizer.stop_token_ids)),
                    pattern=pattern)
    found = [p for p, o in zip(prompts, outs) if o[-1] in tokenizer.stop_token_ids and len(o) > 2]
    assert len(found) >= n, "no prompt of the tiny model ends with EOS; pick other words"
    return found[:n]


def burst(url, auth, n):
    """n concurrent streams; an admitted one holds its slot until every request has its answer, then drops
    its stream (the way tests/serving/test_serve_app.py fills the limit). Returns the status codes."""
    async def main():
        answered, all_answered = [], asyncio.Event()

        async def one(client, i):
            body = {"prompt": f"request {i}", "max_tokens": 200, "temperature": 0, "stream": True}
            async with client.stream("POST", f"{url}{C}", json=body, headers=auth) as r:
                answered.append(r.status_code)
                if len(answered) == n:
                    all_answered.set()
                if r.status_code == 200:
                    await asyncio.wait_for(all_answered.wait(), timeout=30)
                else:
                    await r.aread()
                return r.status_code

        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
    return asyncio.run(main())


def test_metrics_match_what_the_client_saw_in_a_real_prometheus(serve_app, model, tokenizer):
    url, auth = serve_app.url, {"Authorization": f"Bearer {serve_app.api_key}"}
    limit = httpx.get(f"{url}/healthz").json()["max_ongoing_requests"]
    before = scrape(url)

    # --- refusals, each of a known reason ---------------------------------------------------------
    bad = [(C, b'{"prompt": "x", "stream": 0}'), (C, b"\xff"), (CHAT, b'{"messages": [{"role": "root", "content": "x"}]}'),
           (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}')]
    for route, raw in bad:
        assert httpx.post(url + route, content=raw, headers=auth).status_code == 400
    too_long = [httpx.post(url + C, json={"prompt": "x" * 300}, headers=auth) for _ in range(2)]
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" for r in too_long)
    assert httpx.post(url + C, json={"prompt": "x"}).status_code == 401
    assert httpx.post(url + C, json={"prompt": "x", "model": "gpt-9"}, headers=auth).status_code == 404
    codes = burst(url, auth, limit + 3)
    assert codes.count(429) >= 1 and codes.count(200) + codes.count(429) == limit + 3, codes
    deadline = time.monotonic() + 30   # the dropped streams free their slots
    while total(scrape(url), "indexcache_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)

    # --- successes: usage must equal the token counters exactly -------------------------------------
    mid = scrape(url)
    pattern = serve_app.server().info.remote().result()["pattern"]
    client = serve_app.client()
    usages, reasons = [], []
    for prompt in eos_prompts(model, tokenizer, pattern):                     # end with EOS: "stop"
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
    assert reasons == ["stop", "stop"]
    r = client.completions.create(model=MODEL, prompt="length limited", max_tokens=7, temperature=0)
    usages.append(r.usage)
    reasons.append(r.choices[0].finish_reason)
    chat = [{"role": "user", "content": "count my tokens"}]
    stream = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=9, temperature=0, stream=True)
    chunks = list(stream)
    usages.append(chunks[-1].usage)
    reasons.append(next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason))
    n_ok = len(usages)
    generated = sum(u.completion_tokens for u in usages)
    prompt_tokens = sum(u.prompt_tokens for u in usages)

    expected_http = {(C, "400"): 4, (CHAT, "400"): 2, (C, "401"): 1, (C, "404"): 1, (C, "429"): codes.count(429),
                     (C, "200"): codes.count(200) + 3, (CHAT, "200"): 1}
    expected_rejected = {"invalid_request": 4, "context_length": 2, "unauthorized": 1, "model_not_found": 1,
                         "too_many_requests": codes.count(429), "not_ready": 0}
    with Prometheus({"indexcache": f"127.0.0.1:{serve_app.port}"}) as prom:
        def value(expr):
            res = prom.query(expr)
            return sum(float(s["value"][1]) for s in res)

        checks = {}
        for (route, code), n in expected_http.items():
            name = "indexcache_http_responses_total"
            checks[f'{name}{{{SEL}, route="{route}", code="{code}"}}'] = total(before, name, route=route, code=code) + n
        for reason, n in expected_rejected.items():
            name = "indexcache_requests_rejected_total"
            checks[f'{name}{{{SEL}, reason="{reason}"}}'] = total(before, name, reason=reason) + n
        for name, n in (("indexcache_generation_tokens_total", generated),
                        ("indexcache_request_generation_tokens_sum", generated),
                        ("indexcache_request_generation_tokens_count", n_ok),
                        ("indexcache_request_prompt_tokens_sum", prompt_tokens),
                        ("indexcache_request_prompt_tokens_count", n_ok),
                        ("indexcache_request_prefill_time_seconds_count", n_ok),
                        ("indexcache_request_decode_time_seconds_count", n_ok)):
            checks[f"{name}{{{SEL}}}"] = total(mid, name) + n
        for reason in ("stop", "length"):
            checks[f'indexcache_requests_total{{{SEL}, finish_reason="{reason}"}}'] = \
                total(mid, "indexcache_requests_total", finish_reason=reason) + reasons.count(reason)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            got = {expr: value(expr) for expr in checks}
            if got == checks:
                break
            time.sleep(0.5)
        assert {k: got[k] for k in checks if got[k] != checks[k]} == {}, \
            {k: (got[k], checks[k]) for k in checks if got[k] != checks[k]}
        # the phase histograms hold plausible times: queueing is short when nothing waits
        assert value(f"indexcache_request_queue_time_seconds_count{{{SEL}}}") >= n_ok
        assert value(f"indexcache_request_queue_time_seconds_sum{{{SEL}}}") >= 0
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
