"""`indexcache eval`: what DSA and IndexCache cost in quality, measured on held-out text.

For each variant (dense attention; the all-F DSA model; optionally an IndexCache --pattern):
  - perplexity on held-out long documents (essays not trained on, Shakespeare plays) at each context;
  - passkey retrieval: a 5-digit key hidden at depths 10/50/90 % of filler at each context, greedy decode.
And, from one dense teacher pass per context (the all-F model's own indexers):
  - indexer recall: the share of the dense top-k keys (head-summed attention) that the indexer's top-k
    picks, and the share of the dense attention mass the indexer's top-k keeps, per layer;
  - the cross-layer overlap matrix of top-k sets, |A_i & A_j| / k averaged over queries that see more
    than 2k keys, for the dense attention's top-k and for the indexers' top-k; adjacent-layer and
    all-pairs means; a heat-map PNG.
Writes eval.json, eval.md (tables) and overlap.png to --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import corpora
from ..model.dsa import DSAForCausalLM, KVCache
from .indexer_stats import (indexer_kl, layer_index_scores, layer_inputs_and_attention, overlap_matrix, set_overlap,
                            topk_sets)

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


# ---------------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def window_nll(model: DSAForCausalLM, tokens: list[int], attention: str, pattern: str, chunk: int = 1024) -> tuple[float, int]:
    """Summed next-token NLL over one window and the number of predicted tokens.
    Logits are computed `chunk` positions at a time: an 8K x 49K fp32 logit matrix would be 1.6 GB."""
    device = model.lm_head.weight.device
    ids = torch.tensor([tokens], device=device)
    ctx, pattern = model.context(ids, pattern=pattern, attention=attention)
    x, _ = model.run_layers(model.model.embed_tokens(ids), ctx, pattern)
    total = 0.0
    for a in range(0, len(tokens) - 1, chunk):
        b = min(a + chunk, len(tokens) - 1)
        logits = model.logits(x[:, a:b])[0]                                   # (b-a, V) fp32
        total += F.cross_entropy(logits, ids[0, a + 1:b + 1], reduction="sum").item()
    return total, len(tokens) - 1


def heldout_windows(encode, context: int, per_source: int) -> dict[str, list[list[int]]]:
    """Up to `per_source` windows of `context` tokens from each held-out source.
    Essays: held-out segments packed in order (they are one running text in the source file);
    Shakespeare: one window from the start of each play, plays in file-name order."""
    essays = list(corpora.token_windows(corpora.heldout_essays(), encode, context, max_windows=per_source))
    plays = []
    for play in corpora.shakespeare_plays():
        plays += list(corpora.token_windows([play], encode, context, concatenate=False, max_windows=1))
        if len(plays) >= per_source:
            break
    return {"essays": essays, "shakespeare": plays}


# ---------------------------------------------------------------------------------------------------
# passkey retrieval
# ---------------------------------------------------------------------------------------------------
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_NEW_TOKENS = 7


def passkey_prompt(tokenizer, context: int, depth: float, key: int) -> list[int]:
    """A plain completion prompt of `context - PASSKEY_NEW_TOKENS` tokens (room for the answer within the
    context) with the key sentence at `depth` (0..1) of the filler. (Asking through the chat template
    was tried and did worse on the dense model: 3/6 vs 5/6 at 1K-2K.)"""
    encode = tokenizer.encode
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    intro, question, filler = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION), encode(PASSKEY_FILLER)
    n_filler = context - PASSKEY_NEW_TOKENS - len(intro) - len(question) - len(needle)
    if n_filler < 1:
        raise ValueError(f"context {context} is too short for a passkey prompt")
    hay = (filler * (n_filler // len(filler) + 1))[:n_filler]
    cut = int(len(hay) * depth)
    return intro + hay[:cut] + needle + hay[cut:] + question


@torch.no_grad()
def greedy(model: DSAForCausalLM, prompt: list[int], new_tokens: int, attention: str, pattern: str) -> list[int]:
    """Cached greedy decoding with dense or sparse attention in prefill and decode alike."""
    device = model.lm_head.weight.device
    cache = KVCache(model.args, 1, len(prompt) + new_tokens, pattern, dtype=model.lm_head.weight.dtype, device=device)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache=cache, pattern=pattern, attention=attention,
                   logits_at=torch.tensor([len(prompt) - 1], device=device))
    out = []
    for i in range(new_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), start_pos=len(prompt) + i, cache=cache,
                       pattern=pattern, attention=attention, logits_at=torch.zeros(1, dtype=torch.long, device=device))
    return out


def passkey_trials(contexts, seed: int = 0, depths=PASSKEY_DEPTHS) -> list[dict]:
    rng = random.Random(seed)
    return [{"context": c, "depth": d, "key": rng.randint(10000, 99999)} for c in contexts for d in depths]


# ---------------------------------------------------------------------------------------------------
# retrieval from real prose: the passkey's needle, but the haystack is held-out essay text
# ---------------------------------------------------------------------------------------------------
RETRIEVAL_INTRO = ("Below is an essay. Somewhere inside it is a sentence that gives a secret number. "
                   "Read the essay and remember the secret number.\n\n")
RETRIEVAL_QUESTION = "\n\nWhat is the secret number mentioned in the essay above? The secret number is"
RETRIEVAL_NEW_TOKENS = 8


@functools.lru_cache(maxsize=4)
def _prose_ids(encode, n_tokens: int) -> tuple[int, ...]:
    """The first n_tokens of the held-out essays run together (never trained on, not the periodic filler)."""
    return tuple(next(corpora.token_windows(corpora.heldout_essays(), encode, n_tokens, max_windows=1)))


def retrieval_prompt(tokenizer, context: int, depth: float, key: int, offset: int = 0) -> list[int]:
    """A completion prompt of `context - RETRIEVAL_NEW_TOKENS` tokens: held-out essay prose starting
    `offset` tokens into the held-out essays, with one sentence giving a 7-digit number at `depth` (0..1),
    cut at a token boundary; the question at the end. Unlike the passkey's repeated filler, every
    haystack token is different natural text, so attention cannot lean on periodicity."""
    encode = tokenizer.encode
    needle = encode(f" The secret number is {key}. Remember it: the secret number is {key}. ")
    intro, question = encode(RETRIEVAL_INTRO), encode(RETRIEVAL_QUESTION)
    n_hay = context - RETRIEVAL_NEW_TOKENS - len(intro) - len(question) - len(needle)
    if n_hay < 1:
        raise ValueError(f"context {context} is too short for a retrieval prompt")
    hay = list(_prose_ids(encode, offset + n_hay)[offset:offset + n_hay])
    cut = int(len(hay) * depth)
    return intro + hay[:cut] + needle + hay[cut:] + question


def retrieval_trials(contexts, seed: int = 1, depths=PASSKEY_DEPTHS) -> list[dict]:
    """One 7-digit key per (context, depth); each trial's haystack starts at a different place."""
    rng = random.Random(seed)
    return [{"context": c, "depth": d, "key": rng.randint(1_000_000, 9_999_999), "offset": 1000 * i}
            for i, (c, d) in enumerate((c, d) for c in contexts for d in depths)]


def run_retrieval(model: DSAForCausalLM, tokenizer, trials: list[dict], attention: str, pattern: str) -> list[dict]:
    found = []
    for trial in trials:
        prompt = retrieval_prompt(tokenizer, trial["context"], trial["depth"], trial["key"], trial["offset"])
        out = tokenizer.decode(greedy(model, prompt, RETRIEVAL_NEW_TOKENS, attention, pattern))
        found.append({**trial, "ok": str(trial["key"]) in out.replace(",", ""), "answer": out})
    return found


# ---------------------------------------------------------------------------------------------------
# indexer recall and cross-layer overlap
# ---------------------------------------------------------------------------------------------------
def overlap_summary(m: list[list[float]]) -> dict:
    n = len(m)
    adjacent = [m[i][i + 1] for i in range(n - 1)]
    pairs = [m[i][j] for i in range(n) for j in range(i + 1, n)]
    far = [m[i][j] for i in range(n) for j in range(i + 10, n)]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"adjacent_mean": mean(adjacent), "adjacent_min": round(min(adjacent), 4) if adjacent else None,
            "adjacent_max": round(max(adjacent), 4) if adjacent else None, "all_pairs_mean": mean(pairs),
            "ten_or_more_apart_mean": mean(far), "adjacent": [round(a, 4) for a in adjacent]}


@torch.no_grad()
def indexer_analysis(model: DSAForCausalLM, tokens: list[int], k: int) -> dict:
    """Recall of dense top-k, attention mass kept, KL, and overlap matrices on one window.
    Queries in the second half of the window (each sees > T/2 keys), and only those seeing > 2k keys."""
    device = model.lm_head.weight.device
    ids = torch.tensor([tokens], device=device)
    T = len(tokens)
    first = max(T // 2, 2 * k)
    if first >= T:
        raise ValueError(f"top-k {k} is too large for a {T}-token window: need at least {2 * k + 1} tokens")
    dense_sets, index_sets, per_layer = [], [], []
    for layer, x, attn, ctx in layer_inputs_and_attention(model, ids):
        scores = layer_index_scores(model, layer, x.float(), ctx)
        d_set, i_set = topk_sets(attn, k, first), topk_sets(scores, k, first)
        a = attn[0, first:].float()
        dense_mass = (a * d_set).sum(-1).mean().item()
        index_mass = (a * i_set).sum(-1).mean().item()
        recall = set_overlap(d_set, i_set, k)
        per_layer.append({"layer": layer, "recall": round(recall, 4), "dense_topk_mass": round(dense_mass, 4),
                          "indexer_topk_mass": round(index_mass, 4), "kl": round(indexer_kl(attn, scores).item(), 4)})
        dense_sets.append(d_set)
        index_sets.append(i_set)
    return {"per_layer": per_layer, "dense_overlap": overlap_matrix(dense_sets, k),
            "indexer_overlap": overlap_matrix(index_sets, k)}


def heatmap(matrix: list[list[float]], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="top-k overlap |A ∩ B| / k")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# the whole evaluation
# ---------------------------------------------------------------------------------------------------
TASKS = ("perplexity", "passkey", "retrieval", "analysis")
DEFAULT_TASKS = ("perplexity", "passkey", "analysis")


def evaluate(model: DSAForCausalLM, tokenizer, *, contexts=DEFAULT_CONTEXTS, topk: int | None = None,
             pattern: str | None = None, windows_per_source: int = 1, passkey_contexts=None,
             analysis_context: int | None = None, out_dir: Path | None = None, log=print,
             variants: dict[str, str] | None = None, tasks=DEFAULT_TASKS, baselines: bool = True,
             depths=PASSKEY_DEPTHS) -> dict:
    """tokenizer: anything with encode(text) -> ids and decode(ids) -> text (tokenizer.CheckpointTokenizer).
    variants: more named IndexCache patterns (name -> F/S string), each measured like `pattern`
    ("indexcache"). tasks: which of TASKS to run. baselines: measure dense and all-F DSA too.
    depths: where the passkey and retrieval needles go (fractions of the haystack, 0..1)."""
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {list(depths)}: e.g. --depths 0.1,0.5,0.9")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    encode = tokenizer.encode
    n = model.args.n_layers
    if topk is not None:
        model.args.index_topk = topk   # the sparse step reads args.index_topk at every forward
    k = model.args.index_topk
    runs = {"dense": ("dense", "F" * n), "dsa_all_f": ("sparse", "F" * n)} if baselines else {}
    for name, pat in (({"indexcache": pattern} if pattern else {}) | dict(variants or {})).items():
        if name in runs:
            raise ValueError(f"variant name {name!r} is taken: dense and dsa_all_f are always measured")
        model.check_pattern(pat)
        runs[name] = ("sparse", pat)
    if not runs:
        raise ValueError("nothing to evaluate: give --pattern or --variant, or keep the dense/all-F baselines")
    result = {"model": {"n_layers": n, "index_topk": k, "index_n_heads": model.args.index_n_heads,
                        "index_head_dim": model.args.index_head_dim},
              "pattern": pattern, "variants": {name: pat for name, (_, pat) in runs.items()},
              "tasks": list(tasks), "contexts": list(contexts), "perplexity": {}, "passkey": {}, "retrieval": {}}
    t0 = time.perf_counter()
    for context in contexts if "perplexity" in tasks else ():
        if context > model.args.max_seq_len:
            raise ValueError(f"context {context} exceeds the model's max_position_embeddings ({model.args.max_seq_len})")
        sources = heldout_windows(encode, context, windows_per_source)
        row = {}
        for name, (attention, pat) in runs.items():
            per_source = {}
            for source, wins in sources.items():
                nll = sum(window_nll(model, w, attention, pat)[0] for w in wins)
                count = sum(len(w) - 1 for w in wins)
                per_source[source] = round(math.exp(nll / count), 4) if count else None
            row[name] = per_source
        result["perplexity"][str(context)] = row
        log(f"[eval] perplexity @ {context}: {row} ({time.perf_counter() - t0:.0f} s)")
    key_contexts = passkey_contexts if passkey_contexts is not None else contexts
    if "passkey" in tasks:
        trials = passkey_trials(key_contexts, depths=depths)
        for name, (attention, pat) in runs.items():
            found = []
            for trial in trials:
                prompt = passkey_prompt(tokenizer, trial["context"], trial["depth"], trial["key"])
                out = greedy(model, prompt, PASSKEY_NEW_TOKENS, attention, pat)
                found.append({**trial, "ok": str(trial["key"]) in tokenizer.decode(out)})
            result["passkey"][name] = {"correct": sum(t["ok"] for t in found), "total": len(found), "trials": found}
            log(f"[eval] passkey {name}: {sum(t['ok'] for t in found)}/{len(found)} ({time.perf_counter() - t0:.0f} s)")
    if "retrieval" in tasks:
        trials = retrieval_trials(key_contexts, depths=depths)
        for name, (attention, pat) in runs.items():
            found = run_retrieval(model, tokenizer, trials, attention, pat)
            result["retrieval"][name] = {"correct": sum(t["ok"] for t in found), "total": len(found), "trials": found}
            log(f"[eval] retrieval {name}: {sum(t['ok'] for t in found)}/{len(found)} ({time.perf_counter() - t0:.0f} s)")
    analysis = None
    if "analysis" in tasks:
        analysis_context = analysis_context or min(max(contexts), 4096)
        window = heldout_windows(encode, analysis_context, 1)["essays"][0]
        analysis = indexer_analysis(model, window, k)
        result["indexer"] = {"context": analysis_context, "topk": k, "per_layer": analysis["per_layer"],
                             "recall_mean": _mean(r["recall"] for r in analysis["per_layer"]),
                             "indexer_topk_mass_mean": _mean(r["indexer_topk_mass"] for r in analysis["per_layer"]),
                             "dense_topk_mass_mean": _mean(r["dense_topk_mass"] for r in analysis["per_layer"])}
        result["overlap"] = {"context": analysis_context, "topk": k,
                             "dense": {**overlap_summary(analysis["dense_overlap"]), "matrix": _round(analysis["dense_overlap"])},
                             "indexer": {**overlap_summary(analysis["indexer_overlap"]), "matrix": _round(analysis["indexer_overlap"])}}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        (out_dir / "eval.md").write_text(markdown_report(result))
        if analysis is not None:
            heatmap(analysis["indexer_overlap"], f"indexer top-{k} overlap, {analysis_context} tokens "
                    f"(adjacent mean {result['overlap']['indexer']['adjacent_mean']:.2f})", out_dir / "overlap.png")
            heatmap(analysis["dense_overlap"], f"dense attention top-{k} overlap, {analysis_context} tokens "
                    f"(adjacent mean {result['overlap']['dense']['adjacent_mean']:.2f})", out_dir / "overlap_dense.png")
    return result


def topk_curve(model: DSAForCausalLM, tokenizer, topks, contexts, windows_per_source: int = 1, log=print) -> dict:
    """Perplexity of the dense model and of the all-F DSA model at each top-k and context:
    {context: {"dense": {source: ppl}, "topk": {k: {source: ppl}}}}."""
    n = model.args.n_layers
    saved = model.args.index_topk
    curve = {}
    try:
        for context in contexts:
            sources = heldout_windows(tokenizer.encode, context, windows_per_source)
            row = {"dense": {}, "topk": {}}
            for source, wins in sources.items():
                nll = sum(window_nll(model, w, "dense", "F" * n)[0] for w in wins)
                row["dense"][source] = round(math.exp(nll / sum(len(w) - 1 for w in wins)), 4)
            for k in topks:
                model.args.index_topk = k
                row["topk"][str(k)] = {}
                for source, wins in sources.items():
                    nll = sum(window_nll(model, w, "sparse", "F" * n)[0] for w in wins)
                    row["topk"][str(k)][source] = round(math.exp(nll / sum(len(w) - 1 for w in wins)), 4)
            curve[str(context)] = row
            log(f"[eval] top-k curve @ {context}: {row}")
    finally:
        model.args.index_topk = saved
    return curve


def curve_markdown(curve: dict) -> str:
    lines = ["| context | source | dense | " + " | ".join(f"top-{k}" for k in next(iter(curve.values()))["topk"]) + " |"]
    lines.append("|---|---|---|" + "---|" * len(next(iter(curve.values()))["topk"]))
    for context, row in curve.items():
        for source, dense in row["dense"].items():
            cells = [f"{v[source]:.3f} ({(v[source] / dense - 1) * 100:+.1f} %)" for v in row["topk"].values()]
            lines.append(f"| {context} | {source} | {dense:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4)


def _round(m):
    return [[round(v, 3) for v in row] for row in m]


def markdown_report(r: dict) -> str:
    variants = list(next(iter(r["perplexity"].values())).keys()) if r["perplexity"] else []
    lines = [f"# Evaluation (top-k {r['model']['index_topk']}, {r['model']['n_layers']} layers"
             + (f", pattern `{r['pattern']}`" if r["pattern"] else "") + ")", ""]
    if r.get("variants"):
        lines += ["| variant | pattern | F layers |", "|---|---|---|"]
        lines += [f"| {name} | `{pat}` | {pat.count('F')} |" for name, pat in r["variants"].items()] + [""]
    if variants:
        has_dense = "dense" in variants
        lines += ["## Perplexity on held-out text", "",
                  "| context | source | " + " | ".join(variants) + " |" + (" vs dense: " + " / ".join(
                      v for v in variants if v != "dense") + " |" if has_dense else ""),
                  "|---|---|" + "---|" * len(variants) + ("---|" if has_dense else "")]
        for context, row in r["perplexity"].items():
            for source in row[variants[0]]:
                vals = [row[v][source] for v in variants]
                line = f"| {context} | {source} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
                if has_dense:
                    line += " " + " / ".join(f"{(row[v][source] / row['dense'][source] - 1) * 100:+.2f} %"
                                             for v in variants if v != "dense") + " |"
                lines.append(line)
        lines.append("")
    for task, title in (("passkey", "Passkey retrieval (repeated filler)"),
                        ("retrieval", "Retrieval from real prose (held-out essays)")):
        if not r.get(task):
            continue
        lines += [f"## {title}", "", "| variant | correct |", "|---|---|"]
        for name, p in r[task].items():
            failed = ", ".join(f"{t['context']}@{t['depth']}" for t in p["trials"] if not t["ok"])
            lines.append(f"| {name} | {p['correct']}/{p['total']}" + (f" (missed {failed})" if failed else "") + " |")
        lines.append("")
    if "indexer" in r:
        ix = r["indexer"]
        lines += [f"## Indexer vs dense top-{ix['topk']} ({ix['context']} tokens, second-half queries)", "",
                  f"mean recall {ix['recall_mean']:.3f}; attention mass kept: indexer top-k {ix['indexer_topk_mass_mean']:.3f}, "
                  f"dense top-k {ix['dense_topk_mass_mean']:.3f}", "",
                  "| layer | recall | mass (indexer top-k) | mass (dense top-k) | KL |", "|---|---|---|---|---|"]
        for row in ix["per_layer"]:
            lines.append(f"| {row['layer']} | {row['recall']:.3f} | {row['indexer_topk_mass']:.3f} | "
                         f"{row['dense_topk_mass']:.3f} | {row['kl']:.3f} |")
        ov = r["overlap"]
        lines += ["", f"## Cross-layer overlap of top-{ov['topk']} sets ({ov['context']} tokens)", "",
                  "| sets | adjacent mean | adjacent min | adjacent max | all pairs | >= 10 apart |", "|---|---|---|---|---|---|"]
        for name in ("dense", "indexer"):
            o = ov[name]
            far = f"{o['ten_or_more_apart_mean']:.3f}" if o["ten_or_more_apart_mean"] is not None else "-"
            lines.append(f"| {name} | {o['adjacent_mean']:.3f} | {o['adjacent_min']:.3f} | {o['adjacent_max']:.3f} | "
                         f"{o['all_pairs_mean']:.3f} | {far} |")
        lines += ["", "Heat maps: overlap.png (indexer), overlap_dense.png (dense attention).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in [0, 1], e.g. 0.1,0.5,0.9; got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected token counts >= 2, got {text!r}")
    return values


def parse_variants(specs: list[str], n_layers: int, checkpoint_pattern: str) -> dict[str, str]:
    """--variant NAME=PATTERN items -> {name: F/S string} (see add_eval_arguments for the forms)."""
    from ..model.pattern import expand_pattern_name, uniform_pattern, validate_pattern
    from indexcache_contracts.calibration import read_calibration_result

    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--variant {spec!r}: expected NAME=PATTERN, e.g. greedy=FFSS... or uniform=uniform:8")
        if value.startswith("uniform:"):
            try:
                value = uniform_pattern(n_layers, int(value.split(":", 1)[1]))
            except ValueError as exc:
                raise ValueError(f"--variant {spec!r}: {exc}") from None
        elif value == "checkpoint":
            value = checkpoint_pattern
        elif value.startswith("calibrated:"):
            value = read_calibration_result(Path(value.split(":", 1)[1]).read_text())["pattern"]
        value = expand_pattern_name(value, n_layers)
        validate_pattern(value, n_layers)
        if name in out:
            raise ValueError(f"--variant {name!r} given twice")
        out[name] = value
    return out


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="llama_dsa checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for eval.json, eval.md, overlap.png")
    parser.add_argument("--pattern", help="also evaluate this IndexCache F/S pattern")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATTERN",
                        help="also evaluate a named pattern (repeatable): an F/S string, 'uniform:N' (N evenly "
                             "spaced F layers), 'checkpoint' (the checkpoint's own default pattern) or "
                             "'calibrated:FILE' (the pattern of a calibration result / shipped pattern.json)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--no-baselines", action="store_true", help="skip dense and all-F DSA (measured before)")
    parser.add_argument("--topk", type=int, help="override the checkpoint's index_topk")
    parser.add_argument("--contexts", type=_int_list, default=list(DEFAULT_CONTEXTS), help="e.g. 1024,2048,4096,8192")
    parser.add_argument("--passkey-contexts", type=_int_list, help="default: --contexts")
    parser.add_argument("--depths", type=_float_list, default=list(PASSKEY_DEPTHS),
                        help="needle depths of the passkey and retrieval trials, fractions of the haystack "
                             "(default 0.1,0.5,0.9)")
    parser.add_argument("--windows", type=int, default=1, help="held-out windows per source and context")
    parser.add_argument("--analysis-context", type=int, help="tokens for recall/overlap (default min(max context, 4096))")
    parser.add_argument("--indexer", help="trained indexer.safetensors to use instead of the checkpoint's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="float32 (default): bf16 on CPU measured perplexity 48.5 vs 27.9 at 1K tokens")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--topk-curve", type=_int_list,
                        help="instead of the full evaluation: perplexity of dense vs all-F DSA at these top-k "
                             "values (e.g. 64,128,256,512) and --contexts; writes curve.json and curve.md")


def main_eval(args) -> int:
    """`indexcache eval --model DIR --out DIR [--pattern ...]`; args: a Namespace or an argv list."""
    from safetensors.torch import load_file

    from ..model.checkpoint import load_checkpoint
    from ..model.tokenizer import load_tokenizer

    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="indexcache eval", description=__doc__.split("\n")[0])
        add_eval_arguments(parser)
        args = parser.parse_args(list(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.topk is not None and args.topk < 1:
            raise ValueError(f"--topk {args.topk}: must be >= 1")
        extra = load_file(args.indexer) if args.indexer else None
        model, own_pattern = load_checkpoint(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                             extra_state=extra)
        variants = parse_variants(args.variant, model.args.n_layers, own_pattern)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        tokenizer = load_tokenizer(args.model)
        if args.topk_curve:
            curve = topk_curve(model, tokenizer, args.topk_curve, args.contexts, args.windows,
                               log=lambda m: print(m, file=sys.stderr))
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
            (out / "curve.md").write_text(curve_markdown(curve))
            print(curve_markdown(curve))
            return 0
        result = evaluate(model, tokenizer, contexts=args.contexts, topk=args.topk, pattern=args.pattern,
                          windows_per_source=args.windows, passkey_contexts=args.passkey_contexts,
                          analysis_context=args.analysis_context, out_dir=Path(args.out),
                          log=lambda m: print(m, file=sys.stderr), variants=variants, tasks=tasks,
                          baselines=not args.no_baselines, depths=args.depths)
    except (ValueError, FileNotFoundError) as err:
        print(f"indexcache eval: {err}", file=sys.stderr)
        return 2
    print(markdown_report(result))
    return 0
