"""The local live switch: `indexcache pattern set --url ...` (POST /v1/admin/pattern) under concurrent
streaming load: no request fails, each one runs on one pattern from start to end with exactly the output of
that pattern, and every response's fingerprint carries the version the switch answered with."""
import asyncio
import re

import httpx
import openai

from indexcache.cli import main as cli
from indexcache.engine import SamplingParams
from indexcache.engine.generate import generate

MODEL = "indexcache-tiny"
FINGERPRINT = re.compile(r"indexcache-v(\d+)-([FS]+)")


def test_pattern_set_under_load_fails_no_request_and_versions_every_response(serve_app, model, tokenizer, capsys):
    url, key = serve_app.url, serve_app.api_key
    pid = serve_app.server().info.remote().result()["replica_pid"]
    switched: dict[int, str] = {}      # version -> pattern, as the CLI reported them
    started_on: set[int] = set()
    results = []

    async def one(client, i):
        prompt = f"switch {i} " + "index cache "[: i % 12]
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        text, prints = [], set()
        async for chunk in stream:
            prints.add(chunk.system_fingerprint)
            started_on.add(int(FINGERPRINT.fullmatch(chunk.system_fingerprint).group(1)))
            if chunk.choices:
                text.append(chunk.choices[0].text)
        results.append((prompt, "".join(text), prints))

    async def switch():
        import json
        for pattern in ("FSSFSS", "FSFSFS", "FSSSSS"):
            await asyncio.sleep(0.05)
            assert await asyncio.to_thread(cli, ["pattern", "set", "--url", url, "--api-key", key, pattern]) == 0
            answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert answer["pattern"] == pattern and answer["full_layers"] == pattern.count("F")
            switched[answer["pattern_version"]] = pattern
            while answer["pattern_version"] not in started_on:   # some request runs on it before the next switch
                await asyncio.sleep(0.02)

    async def worker(client, switching, w):
        i = 0
        while True:
            done = switching.done()
            await one(client, 10 * w + i)
            i += 1
            if done:
                return

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        switching = asyncio.create_task(switch())
        await asyncio.wait_for(asyncio.gather(switching, *(worker(client, switching, w) for w in range(3))), 120)

    try:
        asyncio.run(main())
        # a bad pattern is refused naming the field, and the live one stays
        live = httpx.get(f"{url}/v1/admin/pattern", headers={"Authorization": f"Bearer {key}"}).json()
        assert cli(["pattern", "set", "--url", url, "--api-key", key, "SFFFFF"]) == 2
        assert "param: pattern" in capsys.readouterr().err
        assert cli(["pattern", "set", "--url", url, "--api-key", key, "--freq", "0"]) == 2
        assert "param: freq" in capsys.readouterr().err
        r = httpx.post(f"{url}/v1/admin/pattern", json={"pattern": "FFF"}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pattern" and "6 layers" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/admin/pattern", json={"pattern": 7}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pattern"
        assert httpx.post(f"{url}/v1/admin/pattern", json={"pattern": "FFFFFF"}).status_code == 401   # behind the key
        assert cli(["pattern", "get", "--url", url, "--api-key", key]) == 0
        assert capsys.readouterr().out.strip() and live == httpx.get(
            f"{url}/v1/admin/pattern", headers={"Authorization": f"Bearer {key}"}).json()
    finally:
        serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 70})   # later tests expect the default
    assert len(switched) == 3 and len(results) >= 6
    seen = set()
    for prompt, text, prints in results:
        assert len(prints) == 1, prints                     # one pattern from start to end
        version, pattern = FINGERPRINT.fullmatch(prints.pop()).groups()
        assert switched.get(int(version), pattern) == pattern   # the version names the pattern the CLI set
        seen.add(pattern)
        want = generate(model, [tokenizer.encode(prompt)], SamplingParams(
            max_new_tokens=10, stop_token_ids=tuple(tokenizer.stop_token_ids)), pattern=pattern)[0]
        assert text == tokenizer.decode(want), (prompt, pattern)
    assert set(switched.values()) <= seen, seen          # every switched-to pattern served requests
    assert serve_app.server().info.remote().result()["replica_pid"] == pid   # no restart
