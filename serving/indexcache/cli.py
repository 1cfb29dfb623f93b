"""`indexcache` command line: generate, serve, convert, train-indexer, eval, calibrate, distill."""

from __future__ import annotations

import argparse
import sys


def add_pattern_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("IndexCache pattern (default: the checkpoint's own)")
    g.add_argument("--pattern", help="F/S per layer, e.g. FFSSFSSS (F: run the indexer, S: reuse indices)")
    g.add_argument("--freq", type=int, help="index_topk_freq: every freq-th layer after the offset is F")
    g.add_argument("--offset", type=int, help="index_skip_topk_offset (default 2: layers 0 and 1 F)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .generate import SamplingParams, generate
    from .tokenizer import load_tokenizer

    if args.pattern and (args.freq or args.offset):
        raise SystemExit("give either --pattern or --freq/--offset, not both")
    model, pattern = load_checkpoint(args.model, pattern=args.pattern, freq=args.freq, offset=args.offset)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        tokenizer = None
    else:
        tokenizer = load_tokenizer(args.model)
        prompt = tokenizer.encode(args.prompt)
    eos = model.args.eos_token_id
    stop = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=stop)
    out = generate(model, [prompt], params, pattern=pattern)[0]
    print(f"# pattern {pattern} ({pattern.count('F')}/{len(pattern)} F layers)", file=sys.stderr)
    print(tokenizer.decode(out, skip_special_tokens=True) if tokenizer else ",".join(map(str, out)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from .pattern import resolve_pattern

    if args.pattern and (args.freq or args.offset):
        raise SystemExit("give either --pattern or --freq/--offset, not both")
    model = "tiny" if args.tiny else (args.model or "smollm2")
    if model == "smollm2":
        from .serve_app import bundled_model_dir
        bundled_model_dir()   # fail here, with the fix, rather than inside a Ray replica
    pattern = args.pattern
    if pattern is None and (args.freq or args.offset):
        from .config import ModelArgs
        from .serve_app import bundled_model_dir
        from .tiny import TINY_CONFIG
        n_layers = TINY_CONFIG["n_layers"] if model == "tiny" else ModelArgs.from_dir(
            bundled_model_dir() if model == "smollm2" else model).n_layers
        pattern = resolve_pattern(n_layers, freq=args.freq or 1, offset=args.offset or 2)
    from .serve_app import start_local
    app_args = dict(model=model, max_ongoing_requests=args.max_ongoing_requests, max_batch_size=args.max_batch_size,
                    max_model_len=args.max_model_len, samples_dir=args.samples_dir, sample_rate=args.sample_rate,
                    gpu_hourly_usd=args.gpu_hourly_usd, api_key=args.api_key, pattern=pattern)
    print(f"starting Ray Serve on {args.host}:{args.port} with model {model} ...", file=sys.stderr, flush=True)
    url = start_local(app_args, host=args.host, port=args.port, num_cpus=args.num_cpus)
    print(f"IndexCache OpenAI-compatible API listening on {url}/v1  (metrics: {url}/metrics; Ctrl-C stops)",
          flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve
    serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indexcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help="HF-format checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the tokenizer in the checkpoint directory)")
    src.add_argument("--prompt-ids", help="comma-separated token ids (checkpoints without a tokenizer)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    add_pattern_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API locally (Ray Serve on this machine)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2 DSA model)")
    src.add_argument("--tiny", action="store_true", help="a tiny random model (tests and demos; gibberish text)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-ongoing-requests", type=int, default=32, help="more get 429 + Retry-After")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context per request, prompt + output tokens")
    p.add_argument("--samples-dir", help="write sampled traffic (JSONL shards) here")
    p.add_argument("--sample-rate", type=float, default=0.0, help="fraction of requests sampled (needs --samples-dir)")
    p.add_argument("--gpu-hourly-usd", type=float, default=0.0, help="price of the replica's hardware per hour")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env INDEXCACHE_API_KEY or none)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    add_pattern_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"indexcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
