"""`indexcache serve` against plain transformers on the same model, the same prompts, the same machine, in
one run (issue #20): what a user who compares the two sees.

    python bench/serve_vs_peer.py --json bench/results/serve_vs_peer.json
    python bench/serve_vs_peer.py --url http://127.0.0.1:8000 ...   # a server already running (ours only
                                                                   # measured while it runs; peers after)

Ours: the bundled SmolLM2 DSA model through `indexcache serve` (started here unless --url), real HTTP,
the OpenAI client, streaming. The peer: `transformers` LlamaForCausalLM with the same SmolLM2-135M
weights (the packaged GGUF dequantised to fp32, what `from_pretrained(gguf_file=...)` gives, without the
indexer), greedy, KV cache on, in fp32 (the issue's baseline) and bf16.
Our server is stopped before the peers run, so they never share the CPU.

Measured, with identical token ids on both sides (prompts are sent as token ids):
  - TTFT at a --long-prompt-token prompt (essay text): ours = request start to the first streamed token;
    the peer's = one forward over the prompt and the argmax of its last logits;
  - decode tok/s for one request (a 26-token prompt, up to --decode-tokens greedy tokens): ours =
    (tokens - 1) / (last chunk - first chunk), tokens as the usage chunk counts them (runs before 32aca9d
    counted chunks, which undercounts when a lagging stream sends several tokens in one chunk); the peer's = generated tokens after the first over the
    time after its prefill (generate() timed at max_new_tokens=1 and =N);
  - 8 concurrent streams x 64 tokens: ours = all tokens received / wall time of the 8 concurrent
    requests; the peer's = one static batch of the same 8 prompts through generate(), tokens up to each
    row's EOS / wall time.
Each figure is the median of --repeats runs (after one warm-up). Greedy output may stop early at EOS on
either side; the rates count the tokens actually produced.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# the peer runs with the OpenMP wait policy our local server gives its replica (serving/app.py): passive
# waits, without which a 2-thread forward collapses whenever another process takes a core
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "serving"))

DECODE_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def prompts(tokenizer, long_tokens: int):
    """(long prompt ids, decode prompt ids, 8 batch prompts of 64 ids each), from the held-out essays."""
    from indexcache.offline.corpora import heldout_essays
    text = " ".join(d.text for d in heldout_essays()[:3])
    ids = tokenizer.encode(text)
    if len(ids) < long_tokens + 8 * 64:
        raise SystemExit(f"not enough essay text for {long_tokens} + 512 tokens")
    long_ids = ids[:long_tokens]
    batch = [ids[long_tokens + 64 * i: long_tokens + 64 * (i + 1)] for i in range(8)]
    return long_ids, tokenizer.encode(DECODE_PROMPT), batch


# ------------------------------------------------------------------------------------------ ours (HTTP)
async def stream_once(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: its start, the arrival time of each chunk with text, and the tokens generated
    (the usage chunk's count: a chunk can carry several tokens when the stream lags behind the engine)."""
    t0 = time.perf_counter()
    stamps, tokens = [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens is None:
        raise SystemExit("the server sent no usage chunk despite stream_options.include_usage")
    return {"t0": t0, "stamps": stamps, "tokens": tokens}


async def measure_ours(url: str, long_ids, decode_ids, batch, args) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key or "none", max_retries=0,
                                timeout=600)
    model = (await client.models.list()).data[0].id
    ttft, decode, streams = [], [], []
    for rep in range(args.repeats + 1):          # rep 0: warm-up, not counted
        r = await stream_once(client, model, long_ids, 1)
        if rep:
            ttft.append(r["stamps"][0] - r["t0"])
        r = await stream_once(client, model, decode_ids, args.decode_tokens)
        s = r["stamps"]
        if rep and len(s) > 1:   # the first chunk is the first token alone (the server never holds it back)
            decode.append((r["tokens"] - 1) / (s[-1] - s[0]))
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(stream_once(client, model, p, 64) for p in batch))
        wall = time.perf_counter() - t0
        if rep:
            streams.append(sum(x["tokens"] for x in rs) / wall)
    await client.close()
    return summarize(ttft, decode, streams, {"model": model})


def summarize(ttft, decode, streams, extra: dict) -> dict:
    return {**extra, "ttft_long_s": round(statistics.median(ttft), 3), "ttft_long_all": [round(x, 3) for x in ttft],
            "decode_tok_s": round(statistics.median(decode), 1), "decode_all": [round(x, 1) for x in decode],
            "streams8_tok_s": round(statistics.median(streams), 1), "streams8_all": [round(x, 1) for x in streams]}


def start_server(args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "indexcache.cli", "serve", "--port", str(args.port), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quantization != "none":
        cmd += ["--quantization", args.quantization]
    env = {**os.environ, "PYTHONPATH": str(REPO / "serving")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"indexcache serve exited ({proc.returncode}); see {args.server_log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"indexcache serve not ready after 300 s; see {args.server_log}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------ the peer
def load_peer(dtype: str):
    """transformers' LlamaForCausalLM with the bundled model's weights (the SmolLM2-135M GGUF dequantised to
    fp32, as `from_pretrained(gguf_file=...)` gives them), without the indexer's: the plain dense model."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from indexcache.model.loading import bundled_model_dir
    hf_logging.set_verbosity_error()
    root = bundled_model_dir()
    cfg = json.loads((root / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keep if k in cfg}))
    state = {k: v for k, v in load_file(str(root / "model.safetensors")).items() if ".indexer." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"peer weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(getattr(torch, dtype)).eval()


def measure_peer(model, long_ids, decode_ids, batch, args) -> dict:
    import torch
    eos = model.generation_config.eos_token_id

    def generate(ids, n):
        with torch.inference_mode():
            return model.generate(torch.tensor(ids), max_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=eos if isinstance(eos, int) else eos[0],
                                  attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long))

    def produced(row, n_prompt):
        out = row[n_prompt:].tolist()
        stops = {eos} if isinstance(eos, int) else set(eos)
        for i, t in enumerate(out):
            if t in stops:
                return i + 1
        return len(out)

    ttft, decode, streams = [], [], []
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(torch.tensor([long_ids]), use_cache=True).logits[0, -1]
            int(logits.argmax())
        if rep:
            ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate([decode_ids], 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate([decode_ids], args.decode_tokens)
        total = time.perf_counter() - t0
        n = produced(out[0], len(decode_ids))
        if rep and n > 1:
            decode.append((n - 1) / (total - first))
        t0 = time.perf_counter()
        out = generate(batch, 64)
        wall = time.perf_counter() - t0
        if rep:
            streams.append(sum(produced(row, len(batch[0])) for row in out) / wall)
    return summarize(ttft, decode, streams, {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure a running server (default: start `indexcache serve` here)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--dtype", default="auto", help="our server's --dtype")
    p.add_argument("--threads", type=int, help="our server's --threads and the peer's torch threads")
    p.add_argument("--quantization", choices=("none", "int8"), default="none", help="our server's --quantization")
    p.add_argument("--peer-dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--long-prompt-tokens", type=int, default=1000)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--api-key")
    p.add_argument("--server-log", default="/tmp/serve_vs_peer.server.log")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch
    from indexcache.model.loading import bundled_model_dir
    from indexcache.model.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(bundled_model_dir())
    long_ids, decode_ids, batch = prompts(tokenizer, args.long_prompt_tokens)
    from indexcache.model.cpu_dtype import cpu_name
    result = {"commit": git_commit(), "cpu": cpu_name(), "cores": os.cpu_count(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "load_before": loadavg(),
              "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}

    proc = None if args.url else start_server(args)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        result["ours"] = asyncio.run(measure_ours(url, long_ids, decode_ids, batch, args))
        result["ours"]["dtype"] = args.dtype
        result["ours"]["quantization"] = args.quantization
    finally:
        if proc is not None:
            stop_server(proc)
    print("ours:", json.dumps(result["ours"]), flush=True)
    result["load_after_ours"] = loadavg()

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    for dtype in args.peer_dtypes:
        model = load_peer(dtype)
        peer = measure_peer(model, long_ids, decode_ids, batch, args)
        peer["dtype"] = dtype
        o = result["ours"]
        peer["ratios"] = {"ttft": round(o["ttft_long_s"] / peer["ttft_long_s"], 2),
                          "decode": round(o["decode_tok_s"] / peer["decode_tok_s"], 2),
                          "streams8": round(o["streams8_tok_s"] / peer["streams8_tok_s"], 2)}
        result[f"transformers_{dtype}"] = peer
        print(f"transformers {dtype}:", json.dumps(peer), flush=True)
        del model
    result["load_after"] = loadavg()

    rows = [("ours (indexcache serve)", result["ours"])] + [
        (f"transformers {d}", result[f"transformers_{d}"]) for d in args.peer_dtypes]
    print(f"\n{args.long_prompt_tokens}-token TTFT / decode / 8 streams, medians of {args.repeats} "
          f"(commit {result['commit']}, load {result['load_before']} -> {result['load_after']})")
    print("| | TTFT s | decode tok/s | 8 streams tok/s | ours/peer TTFT | decode | streams |\n|---|---|---|---|---|---|---|")
    for name, r in rows:
        ratio = r.get("ratios", {})
        print(f"| {name} | {r['ttft_long_s']} | {r['decode_tok_s']} | {r['streams8_tok_s']} | "
              f"{ratio.get('ttft', '')} | {ratio.get('decode', '')} | {ratio.get('streams8', '')} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
