"""The Ray Serve app end to end: the official `openai` client (streaming too), bad input, limits, client
disconnects, live pattern switches through user_config, and a real Prometheus scraping /metrics."""
import asyncio
import random
import re
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from indexcache.engine import SamplingParams
from indexcache.engine.generate import generate

MODEL = "indexcache-tiny"


def expected_text(model, tokenizer, ids, pattern, max_tokens, **sampling):
    params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tuple(tokenizer.stop_token_ids), **sampling)
    out = generate(model, [ids], params, pattern=pattern)[0]
    return tokenizer.decode(out)


def random_text(rng, lo=10, hi=60):
    words = ["the", "index", "cache", "sparse", "layer", "token", "model", "fast", "of", "and", "42"]
    text = " ".join(rng.choice(words) for _ in range(hi))
    return text[: rng.randint(lo, hi)]


def metric(text, name, **labels):
    """Value of one sample in Prometheus exposition text."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in /metrics")


def test_openai_client_completions_and_chat_match_the_model(serve_app, model, tokenizer):
    client = serve_app.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "IndexCache shares top-k indices"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    want = expected_text(model, tokenizer, tokenizer.encode(prompt), "FFFFFF", 20)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 20
    assert r.choices[0].finish_reason == "length"
    # streaming gives the same text, piece by piece
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == want
    # chat renders the model's chat template
    messages = [{"role": "user", "content": "hello there"}]
    ids = tokenizer.apply_chat_template(messages)
    want_chat = expected_text(model, tokenizer, ids, "FFFFFF", 12)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want_chat and r.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want_chat


def test_sampling_parameters_and_stop_sequences(serve_app, model, tokenizer):
    client = serve_app.client()
    prompt = "sparse attention with a lightning indexer"
    ids = tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
    first = client.completions.create(**kw).choices[0].text
    assert first == client.completions.create(**kw).choices[0].text
    assert first == expected_text(model, tokenizer, ids, "FFFFFF", 16, temperature=0.8, top_p=0.9, seed=1234)
    greedy = expected_text(model, tokenizer, ids, "FFFFFF", 30)
    stop = greedy[5:8]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[:greedy.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = [c for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                                     stop=stop, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in streamed) == greedy[:greedy.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_bad_input_gets_4xx_naming_the_problem(serve_app):
    url, auth = serve_app.url, {"Authorization": f"Bearer {serve_app.api_key}"}
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": "many"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 300}, headers=auth)
    assert r.status_code == 400 and "context is 256 tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "model": "gpt-9"}, headers=auth)
    assert r.status_code == 404 and MODEL in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"   # health and metrics need no key
    # the replica survived all of it
    assert serve_app.client().completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_over_the_limit_gets_429_with_retry_after_and_vanished_clients_free_their_slots(serve_app):
    url, auth = serve_app.url, {"Authorization": f"Bearer {serve_app.api_key}"}
    before = httpx.get(f"{url}/metrics").text
    aborts_before = metric(before, "indexcache_requests_total", finish_reason="abort")

    async def hold(client, i):
        """Open a long stream, read a little, then vanish."""
        body = {"prompt": f"request {i}", "max_tokens": 200, "temperature": 0, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=auth) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.headers.get("retry-after")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    await asyncio.sleep(0.3)   # let all 10 arrive while these are in flight
                    break
            return 200, None

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(hold(client, i) for i in range(10)))

    results = asyncio.run(main())
    codes = [c for c, _ in results]
    assert codes.count(200) == 6 and codes.count(429) == 4, codes
    assert all(ra == "1" for c, ra in results if c == 429)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if metric(text, "indexcache_requests_running") == 0 and metric(text, "indexcache_requests_waiting") == 0:
            break
        time.sleep(0.1)
    assert metric(text, "indexcache_requests_running") == 0
    assert metric(text, "indexcache_kv_cache_usage_ratio") == 0
    assert metric(text, "indexcache_requests_total", finish_reason="abort") - aborts_before == 6
    assert serve_app.client().completions.create(model=MODEL, prompt="alive", max_tokens=3, temperature=0).usage.completion_tokens == 3


def _limit(serve_app):
    return httpx.get(f"{serve_app.url}/healthz").json()["max_ongoing_requests"]


def test_the_app_wide_limit_changes_in_place_through_the_ingress_user_config(serve_app):
    """The operator sets the ingress's user_config to maxOngoingRequests x replicas when the replica count
    changes; the new limit holds for new requests without restarting a replica."""
    url, auth = serve_app.url, {"Authorization": f"Bearer {serve_app.api_key}"}
    pid = serve_app.server().info.remote().result()["replica_pid"]
    assert _limit(serve_app) == 6                       # max_ongoing_requests x num_replicas (1)

    async def burst(n):
        """n concurrent streams; an admitted one holds its slot until every request has its answer, so
        the outcome does not depend on how fast the machine is."""
        answered, all_answered = [], asyncio.Event()

        async def hold(client, i):
            body = {"prompt": f"limit {i}", "max_tokens": 100, "temperature": 0, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body, headers=auth) as r:
                answered.append(r.status_code)
                if len(answered) == n:
                    all_answered.set()
                if r.status_code == 200:
                    await asyncio.wait_for(all_answered.wait(), timeout=30)
                else:
                    await r.aread()
                return r.status_code

        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(hold(client, i) for i in range(n)))

    try:
        serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 50}, ingress_user_config={"max_ongoing_requests": 2})
        deadline = time.monotonic() + 30
        while _limit(serve_app) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        codes = asyncio.run(burst(5))
        assert sorted(codes) == [200, 200, 429, 429, 429], codes
    finally:
        serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 51})   # back to the builder's limit
        deadline = time.monotonic() + 30
        while _limit(serve_app) != 6 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _limit(serve_app) == 6
    assert serve_app.server().info.remote().result()["replica_pid"] == pid   # nothing restarted


def test_ingress_user_config_errors_name_the_field():
    from indexcache_contracts.serve_app import check_ingress_config
    assert check_ingress_config({"max_ongoing_requests": 40}) == 40 and check_ingress_config(None) is None
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_ongoing_requests"):
            check_ingress_config({"max_ongoing_requests": bad})
    with pytest.raises(ValueError, match="unknown key.*max_ongoing_requests"):
        check_ingress_config({"max_ongoing": 4})


def test_pattern_switches_under_streaming_load(serve_app, model, tokenizer):
    """Concurrent streams while user_config changes the pattern several times: no errors, and every output
    equals the same request run alone on the pattern it started with."""
    pid = serve_app.server().info.remote().result()["replica_pid"]
    rng = random.Random(7)
    patterns = ["FSSFSS", "FSFSFS", "FFFFFF", "FSSSSS"]
    jobs = []
    started_on = set()   # pattern versions some request has started on (from its fingerprints)

    async def one(client, prompt, n):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        text, fingerprints = [], set()
        async for chunk in stream:
            fingerprints.add(chunk.system_fingerprint)
            started_on.add(int(re.fullmatch(r"indexcache-v(\d+)-[FS]+", chunk.system_fingerprint).group(1)))
            if chunk.choices:
                text.append(chunk.choices[0].text)
        return "".join(text), fingerprints

    async def switch():
        # Each switch waits until a request has started on the pattern before the next one, so every
        # pattern serves traffic however slow the machine is (a fixed sleep skipped some under load).
        for version, pattern in enumerate(patterns, start=10):
            await asyncio.sleep(0.1)
            await asyncio.to_thread(serve_app.deploy, {"pattern": pattern, "pattern_version": version})
            deadline = time.monotonic() + 60
            while version not in started_on:
                assert time.monotonic() < deadline, f"no request started on {pattern} within 60 s of the switch"
                await asyncio.sleep(0.02)

    async def worker(client, switching, out):
        # keep requests in flight until the last switch is live, then one more round
        while True:
            done = switching.done()
            prompt, n = random_text(rng), rng.randint(8, 16)
            jobs.append((prompt, n))
            out.append((len(jobs) - 1, await one(client, prompt, n)))
            if done:
                return

    async def main():
        client = openai.AsyncOpenAI(base_url=serve_app.url + "/v1", api_key=serve_app.api_key, max_retries=0)
        switching = asyncio.create_task(switch())
        out = []
        await asyncio.gather(*(worker(client, switching, out) for _ in range(3)))   # 3 <= the app's limit of 6
        return [r for _, r in sorted(out, key=lambda x: x[0])]

    try:
        results = asyncio.run(main())
    finally:
        serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 20})   # later tests expect the default
    seen = set()
    for (prompt, n), (text, fingerprints) in zip(jobs, results):
        assert len(fingerprints) == 1, fingerprints   # one pattern for the whole request
        version, pattern = re.fullmatch(r"indexcache-v(\d+)-([FS]+)", fingerprints.pop()).groups()
        seen.add(pattern)
        assert text == expected_text(model, tokenizer, tokenizer.encode(prompt), pattern, n), (prompt, pattern)
    assert len(seen) >= 4, seen                       # the switches really happened mid-load
    assert serve_app.server().info.remote().result()["replica_pid"] == pid   # no replica restart


def test_bad_user_config_is_refused_with_the_key(serve_app):
    with pytest.raises(Exception, match="user_config.pattern"):
        serve_app.server().reconfigure.remote({"pattern": "SFFFFF"}).result()
    with pytest.raises(Exception, match="unknown key"):
        serve_app.server().reconfigure.remote({"patern": "FFFFFF"}).result()
    assert serve_app.server().info.remote().result()["pattern"] == "FFFFFF"


def start_prometheus(target_port, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: indexcache\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
    proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def test_a_real_prometheus_scrapes_the_serving_metrics(serve_app, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: apt-get install -y --no-install-recommends prometheus")
    client = serve_app.client()
    serve_app.deploy({"pattern": "FSSFSS", "pattern_version": 30})
    for i in range(3):
        client.completions.create(model=MODEL, prompt=f"cost of request {i} " * 4, max_tokens=10, temperature=0)
    proc, prom = start_prometheus(serve_app.port, tmp_path)
    try:
        def query(expr):
            r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
            return r.json()["data"]["result"]

        deadline = time.monotonic() + 45
        result = []
        while time.monotonic() < deadline:
            try:
                result = query('indexcache_generation_tokens_total{deployment="test-icd"}')
            except (httpx.HTTPError, KeyError, ValueError):
                result = []
            if result:
                break
            time.sleep(0.3)
        assert result, "Prometheus never scraped indexcache_generation_tokens_total"
        assert result[0]["metric"]["model"] == MODEL
        assert float(result[0]["value"][1]) >= 30

        def value(expr):
            res = query(expr)
            assert res, f"no result for {expr}"
            return float(res[0]["value"][1])

        assert value("indexcache_full_layers") == 2 and value("indexcache_layers") == 6
        assert value("indexcache_pattern_version") == 30
        assert value("indexcache_gpu_hourly_usd") == 3.6
        assert value("indexcache_prompt_tokens_total") > 0
        assert value("indexcache_time_to_first_token_seconds_count") >= 3
        assert value("indexcache_time_per_output_token_seconds_count") >= 3
        assert value("indexcache_e2e_request_latency_seconds_count") >= 3
        assert value('indexcache_requests_total{finish_reason="length"}') >= 3
        assert value("indexcache_indexer_flops_total") > 0
        # FSSFSS skips 4 of 6 indexers on these requests: skipped FLOPs outgrow computed ones from here on
        assert value("indexcache_indexer_flops_skipped_total") > 0
        cost, saved = value("indexcache_cost_usd_total"), value("indexcache_cost_saved_usd_total")
        assert 0 < saved < cost
        for expr in ("indexcache_requests_running", "indexcache_requests_waiting", "indexcache_kv_cache_usage_ratio"):
            value(expr)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 31})
