"""Write the calibration samples the shipped SmolLM2 pattern was chosen on, as `indexcache calibrate` reads them.

    python tools/calibration_samples.py --out calib.jsonl --windows 2 --tokens 1024

The samples are the first `--windows` windows of `--tokens` tokens of the TRAINING text of
`indexcache.offline.corpora` (training essay segments, then HotpotQA): disjoint from every held-out essay
and Shakespeare play that `indexcache eval` measures on. One JSON line per window,
`{"token_ids": [...], "tokenizer": "smollm2-dsa"}` (the name `indexcache calibrate --model smollm2`
expects), so calibration sees exactly these ids. Deterministic: no seed is involved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))

from indexcache.offline import corpora  # noqa: E402


def calibration_windows(tokenizer, windows: int, tokens: int, separator_id: int) -> list[list[int]]:
    return list(corpora.token_windows(corpora.training_documents(), tokenizer.encode, tokens,
                                      separator_id=separator_id, max_windows=windows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per window")
    p.add_argument("--model", help="checkpoint directory whose tokenizer to use (default: the bundled SmolLM2 "
                                   "checkpoint, converted if needed)")
    p.add_argument("--separator-id", type=int,
                   help="token id between documents (default: the checkpoint's eos_token_id from config.json; "
                        "the tokenizer's own eos id differs between transformers versions, so a recorded "
                        "command names it)")
    args = p.parse_args(argv)
    from indexcache.model.tokenizer import load_tokenizer
    from indexcache.offline.smollm2 import bundled_checkpoint

    checkpoint = Path(args.model or bundled_checkpoint())
    tokenizer = load_tokenizer(checkpoint)
    separator = args.separator_id
    if separator is None:
        from indexcache.model.config import ModelArgs
        eos = ModelArgs.from_dir(checkpoint).eos_token_id
        separator = eos[0] if isinstance(eos, list) else eos
    rows = calibration_windows(tokenizer, args.windows, args.tokens, separator)
    Path(args.out).write_text("".join(json.dumps({"token_ids": ids, "tokenizer": "smollm2-dsa"}) + "\n"
                                      for ids in rows))
    print(f"# {len(rows)} windows x {args.tokens} tokens of training text -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
