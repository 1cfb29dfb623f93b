"""Greedy vs uniform vs all-F IndexCache patterns on the real SmolLM2 DSA model (issue 4 acceptance).

For each target fraction (default 1/2 and 1/4 of the 30 layers F):
  - calibrate: the greedy search on training-text windows (activation reuse), its wall time and passes
    (one search down to the smallest fraction, timed as it passes each target: greedy is deterministic);
    with --compare-plain also the plain search (no reuse): wall time, passes, and that it picks the same;
  - evaluate greedy, uniform (same F count) and all-F: perplexity on held-out documents at
    --eval-context tokens (essays not trained on + Shakespeare) and passkey retrieval (depths 10/50/90 %).
Prints a markdown table for bench/RESULTS.md and writes the raw numbers as JSON.

Needs the SmolLM2 DSA model (issue 3: indexcache.offline.smollm2, indexcache.offline.corpora, indexcache.offline.evaluate).
  CPU, small:  python bench/calibration_quality.py --calib-samples 8 --calib-tokens 512 --eval-context 4096 \
                   --eval-windows 2 --passkey-contexts 4096
  H200:        python bench/calibration_quality.py --device cuda --compare-plain
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "serving"))

from indexcache.offline.calibration import CalibrationSet, checkpoint_identity, plain_greedy_search, target_full_layers  # noqa: E402
from indexcache.model.checkpoint import load_checkpoint  # noqa: E402
from indexcache.model.pattern import uniform_pattern  # noqa: E402


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    from indexcache.offline.smollm2 import bundled_indexer, convert_smollm2
    out = Path(tempfile.mkdtemp(prefix="smollm2-dsa-"))
    print(f"# converting SmolLM2 with the bundled indexer into {out}", file=sys.stderr)
    return convert_smollm2(out, indexer=bundled_indexer())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluate_pattern(model, tokenizer, pattern: str, windows: list[list[int]], passkeys: list[dict]) -> dict:
    from indexcache.offline.evaluate import PASSKEY_NEW_TOKENS, greedy, passkey_prompt, window_nll
    nll = count = 0
    for w in windows:
        a, b = window_nll(model, w, "sparse", pattern)
        nll, count = nll + a, count + b
    missed = []
    for trial in passkeys:
        prompt = passkey_prompt(tokenizer, trial["context"], trial["depth"], trial["key"])
        answer = tokenizer.decode(greedy(model, prompt, PASSKEY_NEW_TOKENS, "sparse", pattern))
        if str(trial["key"]) not in answer:
            missed.append(f"{trial['context']}@{trial['depth']}")
    return {"ppl": math.exp(nll / count), "passkey": f"{len(passkeys) - len(missed)}/{len(passkeys)}",
            "passkey_missed": missed}


def timed_searches(model, calib, targets: list[int], device: str, compare_plain: bool) -> dict:
    """One greedy search down to the smallest target (greedy is deterministic, so the pattern it holds
    after reaching a larger target is exactly what a search stopping there returns), timed at each
    target; the same for the plain search when asked."""
    from indexcache.offline.calibration import greedy_search
    lowest = min(targets)
    marks: dict[str, dict] = {"greedy": {}, "plain": {}}

    def mark(kind: str, pattern: str, passes: int, t0: float, loss: float | None = None) -> None:
        if pattern.count("F") in targets:
            sync(device)
            marks[kind][pattern.count("F")] = {"pattern": pattern, "passes": passes, "loss": loss,
                                               "wall_s": round(time.monotonic() - t0, 2)}
            print(f"# {kind} search reached {pattern.count('F')} F: {json.dumps(marks[kind][pattern.count('F')])}",
                  file=sys.stderr, flush=True)

    sync(device)
    t0 = time.monotonic()
    result = greedy_search(model, calib, lowest,
                           on_step=lambda st: mark("greedy", st.pattern, st.passes, t0, st.steps[-1]["loss"]))
    loss_all_full = result.loss_all_full
    for m in marks["greedy"].values():
        m["calib_loss_delta"] = m["loss"] - loss_all_full
    if compare_plain:
        sync(device)
        t0 = time.monotonic()
        plain_greedy_search(model, calib, lowest, on_step=lambda pat, passes: mark("plain", pat, passes, t0))
    marks["loss_all_full"] = loss_all_full
    return marks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="llama_dsa checkpoint dir (default: convert SmolLM2 + bundled indexer)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--calib-samples", type=int, default=16, help="training-text windows to calibrate on")
    p.add_argument("--calib-tokens", type=int, default=1024, help="tokens per calibration window")
    p.add_argument("--eval-context", type=int, default=4096)
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows per source")
    p.add_argument("--passkey-contexts", type=int, nargs="*", default=[4096])
    p.add_argument("--compare-plain", action="store_true", help="also time the plain search (no reuse)")
    p.add_argument("--search-only", action="store_true", help="time the searches; skip perplexity and passkey")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration_quality.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from indexcache.offline import corpora
    from indexcache.offline.calibration import pattern_loss
    from indexcache.offline.evaluate import heldout_windows, passkey_trials
    from indexcache.model.tokenizer import load_tokenizer

    path = model_dir(args)
    dtype = getattr(torch, args.dtype)
    model, _ = load_checkpoint(path, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(path)
    n = model.args.n_layers
    calib_tokens = list(corpora.token_windows(corpora.training_documents(), tokenizer.encode, args.calib_tokens,
                                              separator_id=tokenizer.eos_token_id, max_windows=args.calib_samples))
    calib = CalibrationSet.from_token_lists(calib_tokens, batch_tokens=max(8192, args.calib_tokens),
                                            device=args.device)
    model_id = checkpoint_identity(path)
    targets = sorted({target_full_layers(n, f) for f in args.fractions}, reverse=True)
    record = {"model": str(path), "model_id": model_id, "device": args.device, "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch_threads": torch.get_num_threads(), "calib_samples": calib.num_samples,
              "calib_tokens": calib.num_tokens, "runs": []}

    marks = timed_searches(model, calib, targets, args.device, args.compare_plain)
    record["loss_all_full"] = marks["loss_all_full"]
    windows = passkeys = None
    if not args.search_only:
        windows = [w for ws in heldout_windows(tokenizer.encode, args.eval_context, args.eval_windows).values()
                   for w in ws]
        passkeys = passkey_trials(args.passkey_contexts)
        record.update(eval_context=args.eval_context, eval_windows=len(windows), passkey_trials=len(passkeys))
        record["all_full"] = evaluate_pattern(model, tokenizer, "F" * n, windows, passkeys)
        print(f"# all-F: {json.dumps(record['all_full'])}", file=sys.stderr, flush=True)
    for target in targets:
        g = marks["greedy"][target]
        uniform = uniform_pattern(n, target)
        run = {"full_layers": target, "greedy_pattern": g["pattern"], "calib_loss_delta": g["calib_loss_delta"],
               "uniform_pattern": uniform,
               "calib_uniform_loss_delta": pattern_loss(model, calib, uniform) - marks["loss_all_full"],
               "search_wall_s": g["wall_s"], "passes": g["passes"]}
        if target in marks["plain"]:
            plain = marks["plain"][target]
            run.update(plain_wall_s=plain["wall_s"], passes_plain=plain["passes"],
                       plain_same_pattern=plain["pattern"] == g["pattern"])
        if windows is not None:
            run["greedy"] = evaluate_pattern(model, tokenizer, g["pattern"], windows, passkeys)
            run["uniform"] = evaluate_pattern(model, tokenizer, uniform, windows, passkeys)
        record["runs"].append(run)
        print(f"# {target}/{n} F: {json.dumps(run)}", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"| F layers | pattern | calib loss delta | ppl@{args.eval_context} | passkey | search s reuse / plain | "
          f"passes reuse / plain | same pattern |")
    print("|---|---|---|---|---|---|---|---|")
    if "all_full" in record:
        print(f"| {n}/{n} all-F | - | 0 | {record['all_full']['ppl']:.3f} | {record['all_full']['passkey']} | - | - | - |")
    for run in record["runs"]:
        for kind in ("greedy", "uniform"):
            delta = run["calib_loss_delta"] if kind == "greedy" else run["calib_uniform_loss_delta"]
            quality = (f"{run[kind]['ppl']:.3f} | {run[kind]['passkey']}" if kind in run else "- | -")
            timing = (f"{run['search_wall_s']:.1f} / {run.get('plain_wall_s', float('nan')):.1f} | "
                      f"{run['passes']} / {run.get('passes_plain', '-')} | {run.get('plain_same_pattern', '-')}"
                      if kind == "greedy" else "- | - | -")
            print(f"| {run['full_layers']}/{n} {kind} | `{run[f'{kind}_pattern']}` | {delta:+.4f} | {quality} | {timing} |")
    print(f"# raw numbers in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
