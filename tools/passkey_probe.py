"""Why does a passkey trial fail? Per layer, where the dense model looks and where the indexer ranks it.

    python tools/passkey_probe.py --context 8192 --depth 0.9 [--indexer FILE] [--topk 512] [--out probe.json]
    ... [--ablate N [--ablate-only L,...] [--oracle [--oracle-rows A:B[,C:D]]]] | [--shift L,...]

Builds the same prompt as `indexcache eval --contexts 1024,2048,4096,8192` (the key depends on the eval's
context list: `--trial-contexts`), runs the frozen LM
densely, and for the prompt's last query (where the answer's first token is predicted) reports per layer:
the dense head-summed attention mass on the needle's key digits, the best (smallest) rank the indexer gives
any of those tokens among all keys, and whether that rank is inside the top-k. Then the greedy answers of
the dense and the all-F DSA model. CPU, fp32; an 8K prompt takes a few minutes on two cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from indexcache.offline import evaluate  # noqa: E402
from indexcache.model.checkpoint import load_checkpoint  # noqa: E402
from indexcache.model import Capture, select_indices  # noqa: E402
from indexcache.offline.smollm2 import bundled_indexer, convert_smollm2  # noqa: E402
from indexcache.model.tokenizer import load_tokenizer  # noqa: E402
from indexcache.offline.indexer_stats import layer_index_scores as index_scores  # noqa: E402
from indexcache.offline.indexer_stats import layer_inputs_and_attention  # noqa: E402


def key_positions(tokenizer, prompt: list[int], key: int) -> list[int]:
    """Positions of the tokens spelling the key's digits in its first occurrence in the needle."""
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    for start in range(len(prompt) - len(needle) + 1):
        if prompt[start:start + len(needle)] == needle:
            break
    else:
        raise ValueError("the needle is not in the prompt")
    pos, text = [], ""
    for i, t in enumerate(needle):
        piece = tokenizer.decode([t])
        if any(ch.isdigit() for ch in piece):
            pos.append(start + i)
        text += piece
        if str(key) in text:
            break
    return pos


def trial_prompt(tokenizer, context: int, depth: float, trial_contexts) -> tuple[dict, list[int]]:
    """The eval's passkey trial at (context, depth) and its prompt tokens (keys depend on trial_contexts)."""
    trial = next(t for t in evaluate.passkey_trials(trial_contexts) if t["depth"] == depth and t["context"] == context)
    return trial, evaluate.passkey_prompt(tokenizer, context, depth, trial["key"])


@torch.no_grad()
def probe(model, tokenizer, context: int, depth: float, topk: int, trial_contexts=evaluate.DEFAULT_CONTEXTS) -> dict:
    trial, prompt = trial_prompt(tokenizer, context, depth, trial_contexts)
    needle = key_positions(tokenizer, prompt, trial["key"])
    ids = torch.tensor([prompt])
    layers = []
    for layer, x, attn, ctx in layer_inputs_and_attention(model, ids):
        last_attn = attn[0, -1].float()                                    # (S,) head-summed, sums to 1
        scores = index_scores(model, layer, x.float(), ctx)[0, -1]         # (S,)
        order = scores.argsort(descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        best = int(rank[needle].min())
        dense_rank = int((last_attn > last_attn[needle].max()).sum())
        layers.append({"layer": layer, "needle_mass": round(float(last_attn[needle].sum()), 4),
                       "dense_rank": dense_rank, "indexer_rank": best, "in_topk": best < topk})
    answers = {}
    n = model.args.n_layers
    for name, attention in (("dense", "dense"), ("dsa_all_f", "sparse")):
        out = evaluate.greedy(model, prompt, evaluate.PASSKEY_NEW_TOKENS, attention, "F" * n)
        logits = model(ids, pattern="F" * n, attention=attention, logits_at=torch.tensor([len(prompt) - 1]))[0]
        top = logits.float().log_softmax(-1).topk(5)                       # the answer's first token
        answers[name] = {"answer": tokenizer.decode(out), "ok": str(trial["key"]) in tokenizer.decode(out),
                         "first_token_top5": [(tokenizer.decode([int(i)]), round(float(v), 3))
                                              for v, i in zip(top.values, top.indices)]}
    return {"context": context, "depth": depth, "key": trial["key"], "needle_positions": needle,
            "prompt_tokens": len(prompt), "topk": topk, "layers": layers, "answers": answers}


def oracle_indices(model, x: torch.Tensor, layer: int, topk: int) -> torch.Tensor:
    """The best any indexer could pick: the top-k keys of the layer's own dense head-summed attention on
    hidden states x (1, T, dim), per query; (1, T, topk) int, -1 past the causal keys."""
    capture = Capture(attention=True, index_scores=False, layers={layer})
    ctx = model.context(x.new_zeros(x.shape[:2], dtype=torch.long), pattern="F" * model.args.n_layers,
                        attention="dense", capture=capture)[0]
    model.run_layers(x, ctx, "F" * model.args.n_layers, layer, layer + 1)
    attn = capture.attn.pop(layer)                                          # (1, T, T), 0 above the diagonal
    k = min(topk, attn.shape[-1])
    values, idx = attn.float().topk(k, dim=-1)
    T = attn.shape[1]
    causal = idx <= torch.arange(T)[None, :, None]                          # keys a query may see
    return torch.where(causal, idx, torch.full_like(idx, -1)).to(torch.int32)


def indexer_indices(model, x: torch.Tensor, layer: int, ctx) -> torch.Tensor:
    """The layer's own indexer top-k on hidden states x (1, T, dim), as its F step would pick them."""
    block = model.model.layers[layer]
    normed = block.input_layernorm(x)
    return select_indices(block.self_attn, normed, normed, ctx, layer, None, model.args.index_topk)


@torch.no_grad()
def ablate(model, tokenizer, prompt: list[int], groups: list[list[int]], right: int, oracle: bool = False,
           oracle_rows: list[slice] | None = None) -> list[dict]:
    """The answer's first token with sparse attention in one group of layers only (dense elsewhere): which
    layers' sparse attention (at every position of the prompt) costs the right token `right`.
    oracle: those layers select the dense attention's own top-k instead of the indexer's (the bound
    a perfect indexer would reach at this top-k), for the queries in oracle_rows (slices of prompt
    positions, default all; the indexer picks for the others): which positions' choices cost the answer."""
    n = model.args.n_layers
    ids = torch.tensor([prompt])
    ctxs = {mode: model.context(ids, pattern="F" * n, attention=mode)[0] for mode in ("dense", "sparse")}
    at = torch.tensor([len(prompt) - 1])
    rows = []
    for group in groups:
        x = model.model.embed_tokens(ids)
        for layer in range(n):
            if oracle and layer in group:
                chosen = oracle_indices(model, x, layer, model.args.index_topk)          # (1, T, topk)
                if oracle_rows is not None:
                    mixed = indexer_indices(model, x, layer, ctxs["sparse"])
                    for rows_slice in oracle_rows:
                        mixed[:, rows_slice] = chosen[:, rows_slice]
                    chosen = mixed
                pattern = "F" * layer + "S" + "F" * (n - layer - 1)         # S: use the indices passed in
                x, _ = model.run_layers(x, ctxs["sparse"], pattern, layer, layer + 1, indices=chosen)
                continue
            x, _ = model.run_layers(x, ctxs["sparse" if layer in group else "dense"], "F" * n, layer, layer + 1)
        logp = model.logits(x, at)[0].float().log_softmax(-1)
        top = int(logp.argmax())
        rows.append({"sparse_layers": group, "oracle": oracle,
                     "oracle_rows": ([[r.start, r.stop] for r in oracle_rows] if oracle_rows else "all") if oracle else None,
                     "right_logprob": round(float(logp[right]), 3),
                     "top": tokenizer.decode([top]), "top_logprob": round(float(logp[top]), 3)})
        where = (" rows " + ",".join(f"{r.start}:{r.stop}" for r in oracle_rows)) if oracle_rows else ""
        print(f"sparse{f' (oracle top-k{where})' if oracle else ''} in {group[0]}-{group[-1]}: right token {float(logp[right]):.3f}, "
              f"top {tokenizer.decode([top])!r} {float(logp[top]):.3f}", flush=True)
    return rows


@torch.no_grad()
def distribution_shift(model, tokenizer, prompt: list[int], layers: list[int], topk: int) -> dict:
    """Per layer: the indexer's KL to the dense attention and its top-k recall on the trial prompt, and the
    same on the first held-out essay window of the same length (natural text the indexer never saw).
    A layer that fits prose but not the prompt shows it here."""
    from indexcache.offline import corpora
    from indexcache.offline.indexer_stats import indexer_kl, topk_recall

    essay = next(corpora.token_windows(corpora.heldout_essays(), tokenizer.encode, len(prompt),
                                       separator_id=tokenizer.eos_token_id))
    out = {}
    for name, ids in (("prompt", prompt), ("heldout_essay", essay)):
        rows = []
        for layer, x, attn, ctx in layer_inputs_and_attention(model, torch.tensor([ids]), layers):
            scores = index_scores(model, layer, x.float(), ctx)
            rows.append({"layer": layer, "kl": round(indexer_kl(attn, scores).item(), 4),
                         "recall": round(topk_recall(attn, scores, topk, first_query=len(ids) // 2), 3)})
            print(f"{name} layer {layer}: KL {rows[-1]['kl']:.4f} recall {rows[-1]['recall']:.3f}", flush=True)
        out[name] = rows
    return out


def parse_row_slices(text: str) -> list[slice] | None:
    """'A:B[,C:D...]' (Python slices of prompt positions, negative from the end) -> slices; ':' -> None (all)."""
    if text.strip() == ":":
        return None
    try:
        pairs = [part.split(":") for part in text.split(",")]
        return [slice(int(a) if a.strip() else None, int(b) if b.strip() else None) for a, b in pairs]
    except ValueError:
        raise SystemExit(f"--oracle-rows {text!r}: write A:B[,C:D...] with integers, e.g. -64: or "
                         "7300:7400,-64:") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--depth", type=float, default=0.9, choices=evaluate.PASSKEY_DEPTHS)
    p.add_argument("--indexer", default="", help="indexer safetensors (default: the bundled one)")
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--trial-contexts", default=",".join(map(str, evaluate.DEFAULT_CONTEXTS)),
                   help="the eval's --contexts, which fix the trial keys (seed 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--ablate", type=int, default=0, metavar="N",
                   help="instead: sparse attention in one group of N layers at a time, dense elsewhere")
    p.add_argument("--ablate-only", default="", metavar="L,L,...",
                   help="with --ablate: only the groups starting at these layers")
    p.add_argument("--oracle", action="store_true",
                   help="with --ablate: the sparse layers select the dense attention's own top-k (a perfect "
                        "indexer) instead of the indexer's")
    p.add_argument("--oracle-rows", default=":", metavar="A:B[,C:D]",
                   help="with --oracle: only the queries at these prompt positions (Python slices, negative from "
                        "the end) get the dense top-k; the indexer picks for the rest")
    p.add_argument("--shift", default="", metavar="L,L,...",
                   help="instead: per-layer indexer KL and recall on the prompt vs a held-out essay window of "
                        "the same length, for these layers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = convert_smollm2(Path(tempfile.mkdtemp(prefix="smollm2-")),
                           indexer=Path(args.indexer) if args.indexer else bundled_indexer(), index_topk=args.topk)
    model, tokenizer = load_checkpoint(ckpt, dtype=torch.float32)[0], load_tokenizer(ckpt)
    t0 = time.perf_counter()
    trial_contexts = [int(c) for c in args.trial_contexts.split(",")]
    if args.context not in trial_contexts:
        raise SystemExit(f"--context {args.context} is not in --trial-contexts {args.trial_contexts}")
    if args.shift:
        trial, prompt = trial_prompt(tokenizer, args.context, args.depth, trial_contexts)
        layers = sorted({int(x) for x in args.shift.split(",")})
        r = distribution_shift(model.eval(), tokenizer, prompt, layers, args.topk)
        if args.out:
            Path(args.out).write_text(json.dumps({"context": args.context, "depth": args.depth, "key": trial["key"],
                                                  "indexer": args.indexer or "bundled", **r}, indent=1))
        return
    if args.ablate:
        trial, prompt = trial_prompt(tokenizer, args.context, args.depth, trial_contexts)
        right = tokenizer.encode(f" {trial['key']}")[0]                   # the number's first token
        print(f"prompt {len(prompt)} tokens; key digits at {key_positions(tokenizer, prompt, trial['key'])}")
        n = model.args.n_layers
        groups = [list(range(i, min(n, i + args.ablate))) for i in range(0, n, args.ablate)]
        if args.ablate_only:
            starts = {int(x) for x in args.ablate_only.split(",")}
            groups = [g for g in groups if g[0] in starts]
        else:
            groups = [list(range(n))] + groups
        rows = ablate(model.eval(), tokenizer, prompt, groups, right, oracle=args.oracle,
                      oracle_rows=parse_row_slices(args.oracle_rows))
        if args.out:
            Path(args.out).write_text(json.dumps({"context": args.context, "depth": args.depth, "key": trial["key"],
                                                  "right_token": tokenizer.decode([right]), "rows": rows}, indent=1))
        return
    r = probe(model.eval(), tokenizer, args.context, args.depth, args.topk, trial_contexts)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"context {r['context']} depth {r['depth']} key {r['key']}; needle tokens {r['needle_positions']}")
    print("layer  needle mass  dense rank  indexer rank  in top-k")
    for row in r["layers"]:
        print(f"{row['layer']:5d}  {row['needle_mass']:11.4f}  {row['dense_rank']:10d}  {row['indexer_rank']:12d}  "
              f"{'yes' if row['in_topk'] else 'NO'}")
    for name, a in r["answers"].items():
        print(f"{name}: {a['answer']!r} ({'ok' if a['ok'] else 'wrong'}); first token, top-5 log-probs: "
              + ", ".join(f"{t!r} {v}" for t, v in a["first_token_top5"]))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
