"""Perplexity of the all-F DSA model with several trained indexers against the dense model (CPU, fp32).

    python tools/compare_indexers.py --context 4096 --topk 256 512 \
        --indexer v1=/path/indexer.safetensors --indexer v2=/path/other.safetensors

Windows: held-out essay segment 1 and Shakespeare play 0 of `indexcache.offline.corpora` (never trained on), the
first `--context` tokens of each. The checkpoint is the packaged SmolLM2 converted with random indexers;
each `--indexer` file replaces them.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from safetensors.torch import load_file  # noqa: E402

from indexcache.offline import corpora  # noqa: E402
from indexcache.model.checkpoint import load_checkpoint  # noqa: E402
from indexcache.offline.smollm2 import convert_smollm2  # noqa: E402
from indexcache.model.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--topk", type=int, nargs="+", default=[256, 512])
    p.add_argument("--indexer", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = convert_smollm2(Path(tempfile.mkdtemp(prefix="smollm2-")), indexer=None)
    tok = load_tokenizer(ckpt)
    docs = (corpora.heldout_essays()[1], corpora.shakespeare_plays()[0])
    windows = [torch.tensor([tok.encode(d.text[: args.context * 6])[: args.context]]) for d in docs]
    model, _ = load_checkpoint(ckpt)

    def ppl(attention: str) -> list[float]:
        out = []
        with torch.no_grad():
            for x in windows:
                logits = model(x, attention=attention)
                out.append(round(math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item()), 3))
        return out

    print(f"windows: {[d.name for d in docs]}, {args.context} tokens each")
    print("dense", ppl("dense"), flush=True)
    for spec in args.indexer:
        name, path = spec.split("=", 1)
        model.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
        for k in args.topk:
            model.args.index_topk = k
            print(name, f"top-{k}", ppl("sparse"), flush=True)


if __name__ == "__main__":
    main()
