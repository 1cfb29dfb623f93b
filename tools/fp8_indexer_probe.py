"""Probe for tests/kernels/test_model_fast_path.py::test_fp8_indexer_cache_matches_the_reference_on_the_same_e4m3_keys:
where do the Triton (in-place) and reference runs of the same tiny model first select different keys, and is
the difference a near-tie (reference score gap between the k-th and the swapped key) or a real error?

    PYTHONPATH=serving:tests python3 tools/fp8_indexer_probe.py [--family mla] [--seeds 5]
Prints one JSON line per seed."""
import argparse
import json
import sys

import torch

sys.path[:0] = ["serving", "tests"]
from indexcache.kernels.interpreter import patch_for_numpy2  # noqa: E402

patch_for_numpy2()   # under TRITON_INTERPRET=1 on the CPU
from indexcache import kernels  # noqa: E402
from indexcache.kernels import reference as ref  # noqa: E402
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("fast_path_test", "tests/kernels/test_model_fast_path.py")
t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t)
from tiny_models import random_model  # noqa: E402


def recorded_run(model, use_triton, prompts, slots, pattern):
    calls = []
    real = kernels.indexer_topk

    def spy(q, k, weights, topk, q_start, kv_len, k_scale=None, k_slots=None):
        idx = real(q, k, weights, topk, q_start, kv_len, k_scale=k_scale, k_slots=k_slots)
        kk = k if k_slots is None else k[k_slots]
        ks = k_scale if k_slots is None or k_scale is None else k_scale[k_slots]
        scores = ref.ref_indexer_scores(q, kk, weights, q_start, kv_len, k_scale=ks)   # (B, T, S) fp32
        calls.append((idx.clone(), scores))
        return idx

    kernels.indexer_topk = spy
    try:
        logits = t._run(model, use_triton, True, prompts, slots, pattern)
    finally:
        kernels.indexer_topk = real
    return logits, calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="mla")
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    for seed in range(a.seeds):
        model = random_model(a.family, seed=seed, projection_std=0.3, index_head_dim=32).to(t.DEVICE, t.DTYPE)
        pattern = "F" * model.args.n_layers
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(2, model.args.vocab_size, (n,), generator=g).tolist() for n in (19, 11)]
        ref_logits, ref_calls = recorded_run(model, False, prompts, [1, 3], pattern)
        fast_logits, fast_calls = recorded_run(model, True, prompts, [1, 3], pattern)
        err = float((fast_logits - ref_logits).norm() / ref_logits.norm())
        first = None
        for i, ((ia, sa), (ib, _)) in enumerate(zip(ref_calls, fast_calls)):
            a_sorted, b_sorted = ia.sort(-1).values, ib.sort(-1).values
            if not torch.equal(a_sorted, b_sorted):
                rows = (a_sorted != b_sorted).any(-1).nonzero()[0].tolist()
                b_, t_ = rows[0], rows[1]
                s = sa[b_, t_]
                ra, rb = set(ia[b_, t_].tolist()) - {-1}, set(ib[b_, t_].tolist()) - {-1}
                only_ref, only_fast = sorted(ra - rb), sorted(rb - ra)
                first = {"call": i, "row": [b_, t_], "only_ref": only_ref, "only_fast": only_fast,
                         "ref_scores_only_ref": [float(s[j]) for j in only_ref if j >= 0],
                         "ref_scores_only_fast": [float(s[j]) for j in only_fast if 0 <= j < s.numel()],
                         "kth_score": float(s.topk(ia.shape[-1]).values[-1])}
                break
        print(json.dumps({"seed": seed, "family": a.family, "rel_err": err, "calls": len(ref_calls),
                          "first_difference": first}), flush=True)


if __name__ == "__main__":
    main()
