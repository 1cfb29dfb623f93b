"""Greedy vs uniform vs all-F IndexCache patterns on the real SmolLM2 DSA model (issue 4 acceptance).

For each target fraction (default 1/2 and 1/4 of the 30 layers F):
  - calibrate: the greedy search on training-text windows (activation reuse), its wall time and passes;
    with --compare-plain also the plain search (no reuse): wall time, passes, and that it picks the same;
  - evaluate greedy, uniform (same F count) and all-F: perplexity on held-out documents at
    --eval-context tokens (essays not trained on + Shakespeare) and passkey retrieval (depths 10/50/90 %).
Prints a markdown table for bench/RESULTS.md and writes the raw numbers as JSON.

Needs the SmolLM2 DSA model (issue 3: indexcache.smollm2, indexcache.corpora, indexcache.evaluate).
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

from indexcache.calibration import CalibrationSet, calibrate, checkpoint_identity, plain_greedy_search, target_full_layers  # noqa: E402
from indexcache.checkpoint import load_checkpoint  # noqa: E402
from indexcache.pattern import uniform_pattern  # noqa: E402


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    from indexcache.smollm2 import bundled_indexer, convert_smollm2
    out = Path(tempfile.mkdtemp(prefix="smollm2-dsa-"))
    print(f"# converting SmolLM2 with the bundled indexer into {out}", file=sys.stderr)
    return convert_smollm2(out, indexer=bundled_indexer())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluate_pattern(model, tokenizer, pattern: str, windows: list[list[int]], passkeys: list[dict]) -> dict:
    from indexcache.evaluate import greedy, passkey_prompt, window_nll
    nll = count = 0
    for w in windows:
        a, b = window_nll(model, w, "sparse", pattern)
        nll, count = nll + a, count + b
    found = 0
    for trial in passkeys:
        prompt = passkey_prompt(tokenizer.encode, trial["context"], trial["depth"], trial["key"])
        answer = tokenizer.decode(greedy(model, prompt, 8, "sparse", pattern))
        found += str(trial["key"]) in answer
    return {"ppl": math.exp(nll / count), "passkey": f"{found}/{len(passkeys)}"}


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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration_quality.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from indexcache import corpora
    from indexcache.evaluate import heldout_windows, passkey_trials
    from indexcache.tokenizer import load_tokenizer

    path = model_dir(args)
    dtype = getattr(torch, args.dtype)
    model, _ = load_checkpoint(path, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(path)
    n = model.args.n_layers
    calib_tokens = list(corpora.token_windows(corpora.training_documents(), tokenizer.encode, args.calib_tokens,
                                              separator_id=tokenizer.eos_token_id, max_windows=args.calib_samples))
    calib = CalibrationSet.from_token_lists(calib_tokens, batch_tokens=max(8192, args.calib_tokens),
                                            device=args.device)
    windows = [w for ws in heldout_windows(tokenizer.encode, args.eval_context, args.eval_windows).values() for w in ws]
    passkeys = passkey_trials(args.passkey_contexts)
    model_id = checkpoint_identity(path)
    record = {"model": str(path), "model_id": model_id, "device": args.device, "dtype": args.dtype,
              "torch_threads": torch.get_num_threads(), "calib_samples": calib.num_samples,
              "calib_tokens": calib.num_tokens, "eval_context": args.eval_context, "eval_windows": len(windows),
              "passkey_trials": len(passkeys), "runs": []}

    all_full = "F" * n
    t = time.monotonic()
    record["all_full"] = evaluate_pattern(model, tokenizer, all_full, windows, passkeys)
    print(f"# all-F: {record['all_full']} ({time.monotonic() - t:.0f} s)", file=sys.stderr)
    for fraction in args.fractions:
        sync(args.device)
        t = time.monotonic()
        result = calibrate(model, calib, fraction, model_id=model_id, progress=True)
        sync(args.device)
        run = {"fraction": fraction, "full_layers": result["full_layers"], "greedy_pattern": result["pattern"],
               "calib_loss_delta": result["loss_delta"], "uniform_pattern": result["uniform_pattern"],
               "calib_uniform_loss_delta": result["uniform_loss_delta"], "search_wall_s": time.monotonic() - t,
               "passes": result["passes"], "passes_plain": result["passes"] + result["passes_saved"],
               "overlap_shared_mean": result["overlap"].get("shared_mean")}
        if args.compare_plain:
            t = time.monotonic()
            plain = plain_greedy_search(model, calib, target_full_layers(n, fraction))
            sync(args.device)
            run["plain_wall_s"] = time.monotonic() - t
            run["plain_same_pattern"] = plain.pattern == result["pattern"]
        run["greedy"] = evaluate_pattern(model, tokenizer, result["pattern"], windows, passkeys)
        run["uniform"] = evaluate_pattern(model, tokenizer, uniform_pattern(n, result["full_layers"]), windows, passkeys)
        record["runs"].append(run)
        print(f"# {fraction}: {json.dumps(run)}", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"| F layers | pattern | ppl@{args.eval_context} | passkey | calib loss delta | search s (reuse) | "
          f"passes reuse / plain | plain s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n}/{n} all-F | - | {record['all_full']['ppl']:.3f} | {record['all_full']['passkey']} | 0 | - | - | - |")
    for run in record["runs"]:
        for kind in ("greedy", "uniform"):
            pat = run[f"{kind}_pattern"]
            delta = run["calib_loss_delta"] if kind == "greedy" else run["calib_uniform_loss_delta"]
            timing = (f"{run['search_wall_s']:.1f} | {run['passes']} / {run['passes_plain']} | "
                      f"{run.get('plain_wall_s', float('nan')):.1f}") if kind == "greedy" else "- | - | -"
            print(f"| {run['full_layers']}/{n} {kind} | `{pat}` | {run[kind]['ppl']:.3f} | {run[kind]['passkey']} | "
                  f"{'-' if delta is None else f'{delta:+.4f}'} | {timing} |")
    print(f"# raw numbers in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
