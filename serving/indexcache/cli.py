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
