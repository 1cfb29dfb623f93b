"""Triton kernels against the PyTorch references, on fresh random inputs with poisoned outputs.

Marked `gpu`: run on the H200 machine with `pytest -m gpu tests/kernels`. They also run on a CPU
under Triton's interpreter (`TRITON_INTERPRET=1 pytest -m gpu tests/kernels`) at small sizes.
Tolerances: index scores within 1e-5 (bf16 inputs, fp32 accumulation) or 1e-3 (FP8: Hopper's FP8
tensor cores accumulate with fewer mantissa bits) of the row's largest score; top-k is checked by
score (every chosen key scores at least the k-th best score, less that tolerance) and by >= 97 %
set overlap (near-ties may swap); attention outputs in bf16 by relative Frobenius error < 1e-2.
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from topk_checks import assert_topk_correct

from indexcache import kernels
from indexcache.kernels import reference as ref

pytestmark = pytest.mark.gpu
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_INDEX = 0x7EADBEEF
# The interpreter mishandles bf16 (NumPy has no bf16): fp32 there, bf16 on the GPU.
LOW = torch.float32 if INTERPRET else torch.bfloat16


# `dev` and `gen` (fresh seeded inputs per run) come from tests/kernels/conftest.py


def make_indexer(gen, dev, B, T, H, D, S, q_start, kv_len, dtype=LOW):
    q = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k = torch.randn(B, S, D, generator=gen).to(dtype)
    # weights of both signs, as weights_proj produces
    w = torch.randn(B, T, H, generator=gen) * (H ** -0.5 * D ** -0.5)
    return (q.to(dev), k.to(dev), w.to(dev), torch.tensor(q_start, device=dev),
            torch.tensor(kv_len, device=dev))


def run_indexer_case(dev, gen, B, T, H, D, S, q_start, kv_len, topk, fp8=False, query_chunk=None):
    from indexcache.kernels.indexer import indexer_topk
    q, k, w, qs, kl = make_indexer(gen, dev, B, T, H, D, S, q_start, kv_len)
    k_scale = None
    if fp8:
        q, k, w, k_scale = ref.quantize_indexer_fp8(q, k, w)
    out = torch.full((B, T, topk), POISON_INDEX, dtype=torch.int32, device=dev)
    idx = indexer_topk(q, k, w, topk, qs, kl, k_scale=k_scale, query_chunk=query_chunk, out=out)
    assert idx.data_ptr() == out.data_ptr()
    scores = ref.ref_indexer_scores(q, k, w, qs, kl, k_scale=k_scale)
    assert_topk_correct(idx, scores, topk, rtol=1e-3 if fp8 else 1e-4)


SMALL = INTERPRET


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_indexer_prefill_matches_reference(dev, gen, fp8):
    if SMALL:
        run_indexer_case(dev, gen, B=2, T=70, H=4, D=16, S=200, q_start=[0, 100], kv_len=[70, 170],
                         topk=32, fp8=fp8, query_chunk=40)
    else:
        # a 2K-token chunk of a prefill at 14K of a 16K context, 32 x 128 heads, top-2048
        run_indexer_case(dev, gen, B=2, T=2048, H=32, D=128, S=16384, q_start=[14336, 0],
                         kv_len=[16384, 2048], topk=2048, fp8=fp8, query_chunk=1024)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_indexer_decode_matches_reference(dev, gen, fp8):
    # one query per sequence at the end of its cache, sequences of different lengths
    if SMALL:
        run_indexer_case(dev, gen, B=3, T=1, H=4, D=16, S=300, q_start=[299, 9, 150],
                         kv_len=[300, 10, 151], topk=32, fp8=fp8)
    else:
        run_indexer_case(dev, gen, B=3, T=1, H=32, D=128, S=70000, q_start=[69999, 999, 40000],
                         kv_len=[70000, 1000, 40001], topk=2048, fp8=fp8)


def test_radix_topk_handles_ties_and_negative_scores(dev, gen):
    from indexcache.kernels.indexer import topk_rows_into
    B, T, S, topk = 2, 8 if SMALL else 300, 3000 if SMALL else 100000, 64 if SMALL else 2048
    # few distinct values (many ties at the threshold), both signs
    scores = (torch.randint(-6, 7, (B, T, S), generator=gen).float() * 0.37).to(dev)
    q_start = torch.tensor([S - T, 0], device=dev)
    kv_len = torch.tensor([S, S], device=dev)
    out = torch.full((B, T, topk), POISON_INDEX, dtype=torch.int32, device=dev)
    topk_rows_into(scores, out, q_start, kv_len, 0, topk)
    pos = torch.arange(S, device=dev)
    limit = q_start[:, None] + torch.arange(T, device=dev)[None, :]                 # (B, T)
    masked = scores.masked_fill(pos[None, None, :] > limit[..., None], float("-inf"))
    assert_topk_correct(out, masked, topk, ties=True)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("n_queries", [1, 300], ids=["decode", "prefill"])
def test_indexer_score_stage_matches_reference(dev, gen, fp8, n_queries):
    from indexcache.kernels.indexer import indexer_scores_into
    S = 200 if SMALL else 5000
    q, k, w, qs, kl = make_indexer(gen, dev, 2, n_queries, 4 if SMALL else 32, 16 if SMALL else 128, S,
                                   [S - n_queries, 0], [S, min(S, n_queries + 7)])
    k_scale = None
    if fp8:
        q, k, w, k_scale = ref.quantize_indexer_fp8(q, k, w)
    out = torch.full((2, n_queries, S), float("nan"), device=dev)
    indexer_scores_into(q, k, w, qs, kl, k_scale, 0, n_queries, out, write_all=True)
    want = ref.ref_indexer_scores(q, k, w, qs, kl, k_scale=k_scale)
    assert not torch.isnan(out).any(), "unwritten scores"
    assert torch.equal(torch.isinf(out), torch.isinf(want)), "wrong causal / length mask"
    finite = torch.isfinite(want)
    err = (out[finite] - want[finite]).abs().max() / want[finite].abs().max()
    assert err < (1e-3 if fp8 else 1e-5), f"score error {float(err):.2e}"


def test_radix_topk_addresses_past_2_31_elements(dev, gen):
    """A (16K x 200K) fp32 score chunk has more than 2^31 elements: offsets must be 64-bit."""
    from indexcache.kernels.indexer import topk_rows_into
    T, S, topk = (4, 64, 8) if SMALL else (11000, 200000, 2048)   # 2.2e9 elements on the GPU
    scores = torch.randn(1, T, S, device=dev)
    q_start = torch.tensor([S - T], device=dev)
    kv_len = torch.tensor([S], device=dev)
    out = torch.full((1, T, topk), POISON_INDEX, dtype=torch.int32, device=dev)
    topk_rows_into(scores, out, q_start, kv_len, 0, topk)
    # check the last rows, whose offsets pass 2^31 (the masked reference: causal limit per row)
    last = scores[:, -3:].clone()
    limit = S - 3 + torch.arange(3, device=dev)
    last.masked_fill_(torch.arange(S, device=dev)[None, None, :] > limit[None, :, None], float("-inf"))
    assert_topk_correct(out[:, -3:], last, topk)
    del scores


def test_switch_runs_triton_on_device_and_agrees_with_the_reference(dev, gen):
    q, k, w, qs, kl = make_indexer(gen, dev, 1, 40, 4, 16, 64, [24], [64])
    kernels.use_triton(True)
    try:
        assert kernels.backend(dev) == "triton"
        fast = kernels.indexer_topk(q, k, w, 8, qs, kl)
    finally:
        kernels.use_triton(None)
    cpu = [x.cpu() for x in (q, k, w, qs, kl)]
    assert_topk_correct(fast, ref.ref_indexer_scores(*cpu), 8)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_sparse_gqa_matches_reference(dev, gen):
    from indexcache.kernels.sparse_attention import sparse_attention_gqa
    B, T, Hq, Hkv, Dh, S, K = (2, 5, 6, 2, 32, 90, 20) if SMALL else (2, 300, 32, 8, 128, 8192, 2048)
    q = torch.randn(B, T, Hq, Dh, generator=gen).to(LOW).to(dev)
    k = torch.randn(B, S, Hkv, Dh, generator=gen).to(LOW).to(dev)
    v = torch.randn(B, S, Hkv, Dh, generator=gen).to(LOW).to(dev)
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    idx = idx.to(torch.int32)
    idx[0, 1, K // 3:] = -1     # a partly filled row
    idx[1, 2, :] = -1           # nothing selected -> zeros
    idx = idx.to(dev)
    out = torch.full_like(q, float("nan"))
    got = sparse_attention_gqa(q, k, v, idx, Dh ** -0.5, out=out)
    want = ref.ref_sparse_attention_gqa(q, k, v, idx, Dh ** -0.5)
    assert not torch.isnan(got).any(), "unwritten output"
    assert rel_err(got, want) < 1e-2
    assert torch.count_nonzero(got[1, 2]) == 0


@pytest.mark.parametrize("decode, layout", [(False, "heads_m"), (False, "keys_m"), (True, None)],
                         ids=["prefill-heads_m", "prefill-keys_m", "decode"])
def test_sparse_mla_matches_reference(dev, gen, decode, layout):
    """Both prefill layouts (heads on the M side of the products, or the gathered keys) and the decode path."""
    from indexcache.kernels.sparse_attention import sparse_attention_mla
    # the 30B shape: 20 heads, latent 512 + rope 64, top-2048 (smaller under the interpreter; 100 keys
    # selected there so that the keys_m kernel's 64-key blocks run a full block and a partial one)
    H, Dc, Dr = (5, 32, 16) if SMALL else (20, 512, 64)
    S, K = (300, 100) if SMALL else (20000, 2048)
    B, T = (2, 1) if decode else (2 if SMALL else 1, 3 if SMALL else 200)
    q = (torch.randn(B, T, H, Dc + Dr, generator=gen) * 0.5).to(LOW).to(dev)
    kv = torch.randn(B, S, Dc + Dr, generator=gen).to(LOW).to(dev)
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    idx = idx.to(torch.int32)
    idx[0, 0, K // 2:] = -1
    idx = idx.to(dev)
    scale = (192 + 64) ** -0.5
    idx[-1, -1, :] = -1                     # nothing selected -> zeros
    out = torch.full((B, T, H, Dc), float("nan"), dtype=LOW, device=dev)
    got = sparse_attention_mla(q, kv, idx, scale, Dc, out=out, layout=layout)
    want = ref.ref_sparse_attention_mla(q, kv, idx, scale, Dc)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "unwritten output"
    assert rel_err(got, want) < 1e-2
    assert torch.count_nonzero(got[-1, -1]) == 0, "a query with no valid index must give zeros"
    if decode:
        # the split-K path (used when few queries leave SMs idle) against the one-program path
        for n_split in (1, 3):
            again = sparse_attention_mla(q, kv, idx, scale, Dc, n_split=n_split,
                                         out=torch.full_like(out, float("nan")))
            assert rel_err(again, want) < 1e-2, f"n_split={n_split}"


def _mla_fp8_case(gen, dev, B, T, H, Dc, Dr, S, K):
    """Random q, an FP8 latent cache built from a normalised latent (as the model writes it), a bf16
    RoPE key, and top-k style indices (distinct per row) with a half-filled row and an empty row."""
    q = (torch.randn(B, T, H, Dc + Dr, generator=gen) * 0.5).to(LOW).to(dev)
    latent = torch.randn(B, S, Dc, generator=gen)
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True))          # RMS-normalised rows
    latent8, latent_scale = ref.quantize_latent_fp8(latent.to(LOW))
    k_rope = torch.randn(B, S, Dr, generator=gen).to(LOW)
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    idx = idx.to(torch.int32)
    idx[0, 0, K // 2:] = -1                 # a partly filled row
    idx[-1, -1, :] = -1                     # nothing selected -> zeros
    return q, latent8.to(dev), latent_scale.to(dev), k_rope.to(dev), idx.to(dev)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_sparse_mla_fp8_kv_matches_reference(dev, gen, decode):
    """The FP8-latent kernel (e4m3 rows, one fp32 scale per key, bf16 RoPE key) against its twin, which
    dequantises and runs the bf16 reference: relative Frobenius error < 1e-2 (bf16 operands, fp32
    accumulation), zeros for a row with no valid index, every output written (NaN-poisoned)."""
    from indexcache.kernels.sparse_attention import sparse_attention_mla_fp8
    H, Dc, Dr = (5, 32, 16) if SMALL else (20, 512, 64)
    S, K = (100, 24) if SMALL else (20000, 2048)
    B, T = (2, 1) if decode else (1, 3 if SMALL else 200)
    q, latent8, latent_scale, k_rope, idx = _mla_fp8_case(gen, dev, B, T, H, Dc, Dr, S, K)
    scale = (192 + 64) ** -0.5
    want = ref.ref_sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, idx, scale)
    for n_split in ((None, 1, 3) if decode else (None,)):
        out = torch.full((B, T, H, Dc), float("nan"), dtype=LOW, device=dev)
        got = sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, idx, scale, out=out, n_split=n_split)
        assert got.data_ptr() == out.data_ptr()
        assert not torch.isnan(got).any(), f"unwritten output (n_split={n_split})"
        assert rel_err(got, want) < 1e-2, f"n_split={n_split}"
        assert torch.count_nonzero(got[-1, -1]) == 0, "a row with no valid index must be zeros"



def _random_rows(gen, dev, B, T, S):
    scores = torch.randn(B, T, S, generator=gen).to(dev)
    return scores, torch.tensor([S - T, S // 2], device=dev), torch.tensor([S, S // 2 + T], device=dev)


def sampled_case(T_small, T_gpu):
    """(B, T, S, topk, stride) for the sampled top-k tests. Both sizes estimate the threshold from the
    64th-best sample (RANK = topk * margin / stride), so a random row misses the [topk, CAP] window of
    candidates with probability ~1e-5 (simulated: 0 of 20,000 rows); at RANK 16 it was ~0.4 % per row."""
    return (2, T_small, 3000, 64, 2) if SMALL else (2, T_gpu, 131072, 2048, 64)


def _topk_both_ways(scores, q_start, kv_len, topk, **sampled):
    from indexcache.kernels.indexer import topk_rows_into
    B, T = scores.shape[:2]
    dev = scores.device
    radix = torch.full((B, T, topk), POISON_INDEX, dtype=torch.int32, device=dev)
    fast = torch.full((B, T, topk), POISON_INDEX, dtype=torch.int32, device=dev)
    path = torch.full((B * T,), -1, dtype=torch.int32, device=dev)
    topk_rows_into(scores, radix, q_start, kv_len, 0, topk, method="radix")
    topk_rows_into(scores, fast, q_start, kv_len, 0, topk, method="sampled", path_out=path, **sampled)
    return radix, fast, path.cpu()


def _masked(scores, q_start, kv_len):
    B, T, S = scores.shape
    pos = torch.arange(S, device=scores.device)
    limit = torch.minimum(q_start[:, None] + torch.arange(T, device=scores.device)[None, :], kv_len[:, None] - 1)
    return scores.masked_fill(pos[None, None, :] > limit[..., None], float("-inf"))


def test_sampled_topk_equals_the_radix_select_on_random_rows(dev, gen):
    """The sampled top-k (threshold from every stride-th key, select among the candidates) is a fast path
    of the whole-row radix select: the same set of indices (the order within a row may differ: each
    writes the keys above its last radix digit first), and the sampled path is what ran."""
    B, T, S, topk, stride = sampled_case(8, 256)
    scores, q_start, kv_len = _random_rows(gen, dev, B, T, S)
    radix, fast, path = _topk_both_ways(scores, q_start, kv_len, topk, stride=stride)
    assert torch.equal(radix.cpu().sort(-1).values, fast.cpu().sort(-1).values)
    assert_topk_correct(fast, _masked(scores, q_start, kv_len), topk)
    assert (path == 1).float().mean() >= 0.9 and not (path == -1).any()


def test_sampled_topk_falls_back_to_the_whole_row_when_the_estimate_fails(dev, gen):
    """Rows where the estimate fails take the whole-row fallback and still return the exact top-k: a
    constant row (every key ties), a row whose sampled keys are all the worst (too few candidates), and
    a row whose best value is shared by half its keys, so more keys reach the threshold than the
    scratch holds. A row with a few distinct values may take either path; random rows take the sampled one."""
    B, T, S, topk, stride = sampled_case(6, 64)
    scores = torch.randn(B, T, S, generator=gen).to(dev)
    q_start, kv_len = torch.tensor([S - T, S - T - 7], device=dev), torch.tensor([S, S - 7], device=dev)
    scores[:, 0] = 0.25                                                # every key ties
    sampled_positions = torch.arange(0, S, stride, device=dev)
    scores[:, 1, sampled_positions] = -50.0                            # samples say: threshold is low
    scores[:, 2, ::2] = 50.0                                           # half the row reaches it
    scores[:, 3] = (scores[:, 3] * 2).round()                          # few distinct values
    radix, fast, path = _topk_both_ways(scores, q_start, kv_len, topk, stride=stride)
    assert torch.equal(radix.cpu().sort(-1).values, fast.cpu().sort(-1).values)
    assert_topk_correct(fast, _masked(scores, q_start, kv_len), topk, ties=True)
    rows = path.view(B, T)
    assert (rows[:, :3] == 2).all(), rows
    assert (rows[:, 4:] == 1).all(), rows


def test_topk_method_is_checked(dev, gen):
    from indexcache.kernels.indexer import topk_rows_into
    scores, q_start, kv_len = _random_rows(gen, dev, 1, 2, 100)
    out = torch.empty(1, 2, 8, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="method"):
        topk_rows_into(scores, out, q_start[:1], kv_len[:1], 0, 8, method="bitonic")
