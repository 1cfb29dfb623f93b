"""Load generator for the OpenAI-compatible API: N concurrent streaming clients, each sending requests
back to back for a fixed time. Reports request and output-token throughput and TTFT / TPOT / end-to-end
percentiles (client-side, measured from the first byte of the request to each streamed chunk).

    indexcache serve --tiny --port 8000 &            # or the real model
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 1 4 16 --duration 30

TPOT here is the mean time between streamed chunks after the first, per request (a chunk is one token
unless the server held text back for a stop string or an incomplete UTF-8 character).

`--system-prompt-words N`: every request starts with the same N-word "system prompt" (seeded, fixed per
run) before its own random words, the traffic a prefix cache serves (`indexcache serve --kv-cache-tokens
... [--no-prefix-caching]`): compare TTFT with and without it.

`--long-prompt-words N` (instead of the clients loop): one request of N words, then, `--delay` s later while
its prefill runs, `--short-requests` requests of `--prompt-words` words at once; reports the long request's
TTFT and the short ones' TTFT percentiles, over `--repeats` rounds (fresh words each round). Run it against
`indexcache serve --long-prefill-token-threshold 0` (first come, first served) and without the flag (short
prompts first) to see what the short ones wait:

    python bench/serve_load.py --url http://127.0.0.1:8000 --long-prompt-words 7000 --short-requests 8 \
        --max-tokens 16 --repeats 2 --label short-first --json mixed.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import openai

WORDS = ("sparse attention selects the most relevant earlier tokens with a small indexer and adjacent layers "
         "pick nearly the same ones so most layers can reuse the indices of an earlier layer").split()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def client_loop(client: openai.AsyncOpenAI, model: str, args, deadline: float, rng: random.Random, out: list):
    while time.monotonic() < deadline:
        prompt = args.system_prompt + " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
        t0 = time.monotonic()
        stamps = []
        try:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                     temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.monotonic())
        except openai.APIStatusError as exc:
            out.append({"error": exc.status_code})
            await asyncio.sleep(1)
            continue
        end = time.monotonic()
        if stamps:
            out.append({"ttft": stamps[0] - t0, "e2e": end - t0, "tokens": len(stamps),
                        "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None})


async def timed_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: TTFT and end-to-end seconds from the moment it is sent."""
    t0 = time.monotonic()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.monotonic())
    return {"ttft": stamps[0] - t0 if stamps else None, "e2e": time.monotonic() - t0, "tokens": len(stamps)}


async def run_mixed(url: str, args) -> dict:
    """One long prompt in flight, short ones arriving during its prefill: what the short ones wait."""
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                                max_retries=0, timeout=1800)
    model = (await client.models.list()).data[0].id
    words = lambda rng, n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    longs, shorts = [], []
    for round_ in range(args.repeats):
        rng = random.Random(1000 + round_)   # fresh words each round: no cached prefix between rounds
        long_task = asyncio.create_task(timed_request(client, model, words(rng, args.long_prompt_words),
                                                      args.max_tokens))
        await asyncio.sleep(args.delay)
        shorts += await asyncio.gather(*(timed_request(client, model, words(rng, args.prompt_words), args.max_tokens)
                                         for _ in range(args.short_requests)))
        longs.append(await long_task)
    ttft = [r["ttft"] for r in shorts if r["ttft"] is not None]
    return {
        "label": args.label, "url": url, "model": model, "rounds": args.repeats,
        "long_prompt_words": args.long_prompt_words, "short_requests": args.short_requests,
        "short_prompt_words": args.prompt_words, "max_tokens": args.max_tokens, "delay_s": args.delay,
        "long_ttft_s": [round(r["ttft"], 2) for r in longs], "long_e2e_s": [round(r["e2e"], 2) for r in longs],
        **{f"short_ttft_p{int(q * 100)}_ms": round(1000 * percentile(ttft, q), 1) for q in (0.5, 0.9)},
        "short_ttft_max_ms": round(1000 * max(ttft), 1),
        "short_e2e_p50_s": round(percentile([r["e2e"] for r in shorts], 0.5), 2),
    }


async def run(url: str, clients: int, args) -> dict:
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                                max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    out: list[dict] = []
    start = time.monotonic()
    deadline = start + args.duration
    await asyncio.gather(*(client_loop(client, model, args, deadline, random.Random(i), out) for i in range(clients)))
    wall = time.monotonic() - start
    ok = [r for r in out if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    e2e = [r["e2e"] for r in ok]
    return {
        "clients": clients, "model": model, "requests": len(ok), "errors": len(out) - len(ok), "wall_s": round(wall, 1),
        "req_per_s": round(len(ok) / wall, 2), "output_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        **{f"ttft_p{int(q * 100)}_ms": round(1000 * percentile(ttft, q), 1) for q in (0.5, 0.9, 0.99)},
        **{f"tpot_p{int(q * 100)}_ms": round(1000 * percentile(tpot, q), 1) for q in (0.5, 0.9, 0.99)},
        "e2e_p50_s": round(percentile(e2e, 0.5), 2),
        "tpot_mean_ms": round(1000 * statistics.fmean(tpot), 1) if tpot else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=30, help="seconds per concurrency level")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--system-prompt-words", type=int, default=0,
                   help="a shared prefix of this many words before every request's own words (prefix caching)")
    p.add_argument("--api-key")
    p.add_argument("--json", help="also write the results here")
    mixed = p.add_argument_group("one long prompt + short ones (instead of the clients loop)")
    mixed.add_argument("--long-prompt-words", type=int, default=0, help="words of the long prompt (0: off)")
    mixed.add_argument("--short-requests", type=int, default=8, help="short requests sent during its prefill")
    mixed.add_argument("--delay", type=float, default=2.0, help="seconds between the long and the short requests")
    mixed.add_argument("--repeats", type=int, default=1, help="rounds, one after the other")
    mixed.add_argument("--label", default="", help="names the server setting in the output")
    args = p.parse_args()
    if args.long_prompt_words:
        r = asyncio.run(run_mixed(args.url, args))
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
        return
    shared = random.Random(1234)
    args.system_prompt = "".join(shared.choice(WORDS) + " " for _ in range(args.system_prompt_words))
    results = []
    for n in args.clients:
        r = asyncio.run(run(args.url, n, args))
        results.append(r)
        print(json.dumps(r), flush=True)
    cols = ["clients", "requests", "errors", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p90_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "e2e_p50_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
