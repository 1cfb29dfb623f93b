"""The PyTorch references against naive per-element loops (CPU, runs in CI)."""
import math

import pytest
import torch

from indexcache import kernels
from indexcache.kernels import reference as ref


def naive_scores(q, k, w, q_start, kv_len, k_scale=None):
    B, T, H, D = q.shape
    S = k.shape[1]
    out = torch.full((B, T, S), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                if s <= int(q_start[b]) + t and s < int(kv_len[b]):
                    total = 0.0
                    for h in range(H):
                        dot = float(q[b, t, h].double() @ k[b, s].double())
                        total += float(w[b, t, h]) * max(dot, 0.0)
                    if k_scale is not None:
                        total *= float(k_scale[b, s])
                    out[b, t, s] = total
    return out


def naive_attention(q, keys, values, idx, scale, group):
    """q (Hq, Dk); keys (S, Hkv, Dk); values (S, Hkv, Dv); idx (K,)."""
    Hq = q.shape[0]
    out = torch.zeros(Hq, values.shape[-1], dtype=torch.float64)
    sel = [int(i) for i in idx if int(i) >= 0]
    for h in range(Hq):
        if not sel:
            continue
        logits = [scale * float(q[h].double() @ keys[j, h // group].double()) for j in sel]
        m = max(logits)
        p = [math.exp(x - m) for x in logits]
        z = sum(p)
        for pj, j in zip(p, sel):
            out[h] += (pj / z) * values[j, h // group].double()
    return out


def random_indexer(B=2, T=5, H=3, D=8, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, S, D, generator=g)
    w = torch.randn(B, T, H, generator=g) * (H ** -0.5 * D ** -0.5)
    # sequence 0: a prefill chunk starting at 4 with 9 cached keys; sequence 1 from 0, full cache
    q_start = torch.tensor([4, 0])[:B]
    kv_len = torch.tensor([9, S])[:B]
    return q, k, w, q_start, kv_len


def test_indexer_scores_match_naive_loop_with_causal_and_length_masks():
    q, k, w, q_start, kv_len = random_indexer()
    got = ref.ref_indexer_scores(q, k, w, q_start, kv_len)
    want = naive_scores(q, k, w, q_start, kv_len)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-5)
    # key 5 is visible to query 1 of sequence 0 (position 5) but not to query 0 (position 4)
    assert torch.isfinite(got[0, 1, 5]) and torch.isinf(got[0, 0, 5])


def test_indexer_topk_picks_the_highest_scores_and_pads_with_minus_one():
    q, k, w, q_start, kv_len = random_indexer()
    topk = 6
    idx = ref.ref_indexer_topk(q, k, w, topk, q_start, kv_len)
    assert idx.dtype == torch.int32 and idx.shape == (2, 5, topk)
    want = naive_scores(q, k, w, q_start, kv_len)
    for b in range(2):
        for t in range(5):
            n_valid = int(torch.isfinite(want[b, t]).sum())
            row = idx[b, t].tolist()
            chosen = [i for i in row if i >= 0]
            assert len(chosen) == min(topk, n_valid) and len(set(chosen)) == len(chosen)
            assert row.count(-1) == topk - len(chosen)
            best = set(want[b, t].topk(len(chosen)).indices.tolist())
            assert set(chosen) == best


def test_indexer_chunking_gives_the_same_answer_as_one_pass(monkeypatch):
    q, k, w, q_start, kv_len = random_indexer(T=7, S=16, seed=3)
    whole = ref.ref_indexer_topk(q, k, w, 4, q_start, kv_len)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 3 * 16)  # one query per chunk
    assert torch.equal(ref.ref_indexer_topk(q, k, w, 4, q_start, kv_len), whole)


def test_fp8_quantised_indexer_matches_scaled_naive_scores():
    q, k, w, q_start, kv_len = random_indexer(seed=1)
    q8, k8, w8, k_scale = ref.quantize_indexer_fp8(q, k, w)
    assert q8.dtype == torch.float8_e4m3fn and k8.dtype == torch.float8_e4m3fn
    got = ref.ref_indexer_scores(q8, k8, w8, q_start, kv_len, k_scale=k_scale)
    want = naive_scores(q8.float(), k8.float(), w8, q_start, kv_len, k_scale)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-6)
    # and the quantised scores stay close to the full-precision ones (e4m3: ~6 % per element)
    exact = ref.ref_indexer_scores(q, k, w, q_start, kv_len)
    err = (got[finite] - exact[finite]).norm() / exact[finite].norm()
    assert err < 0.1


def test_gqa_reference_matches_naive_softmax_and_zero_rows():
    g = torch.Generator().manual_seed(5)
    B, T, Hq, Hkv, Dh, S, K = 2, 3, 4, 2, 8, 10, 5
    q = torch.randn(B, T, Hq, Dh, generator=g)
    k = torch.randn(B, S, Hkv, Dh, generator=g)
    v = torch.randn(B, S, Hkv, Dh, generator=g)
    idx = torch.randint(0, S, (B, T, K), generator=g, dtype=torch.int32)
    idx[0, 1, 2:] = -1          # a partly filled row
    idx[1, 2, :] = -1           # a row with nothing selected -> zeros
    # distinct indices per row (top-k never repeats a key)
    for b in range(B):
        for t in range(T):
            if b == 1 and t == 2:
                continue
            perm = torch.randperm(S, generator=g)[:K].to(torch.int32)
            idx[b, t] = torch.where(idx[b, t] >= 0, perm, idx[b, t])
    scale = Dh ** -0.5
    got = ref.ref_sparse_attention_gqa(q, k, v, idx, scale)
    for b in range(B):
        for t in range(T):
            want = naive_attention(q[b, t], k[b], v[b], idx[b, t], scale, Hq // Hkv)
            torch.testing.assert_close(got[b, t].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[1, 2]) == 0


def test_mla_reference_reads_values_from_the_latent_part():
    g = torch.Generator().manual_seed(6)
    B, T, H, Dc, Dr, S, K = 1, 4, 3, 6, 2, 9, 4
    q = torch.randn(B, T, H, Dc + Dr, generator=g)
    kv = torch.randn(B, S, Dc + Dr, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])[None].to(torch.int32)
    scale = 0.3
    got = ref.ref_sparse_attention_mla(q, kv, idx, scale, v_dim=Dc)
    assert got.shape == (B, T, H, Dc)
    keys = kv[0][:, None, :]
    for t in range(T):
        want = naive_attention(q[0, t], keys, keys[..., :Dc], idx[0, t], scale, H)
        torch.testing.assert_close(got[0, t].double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_bf16_outputs_close_to_fp32():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 2, 16, generator=g)
    kv = torch.randn(1, 8, 16, generator=g)
    idx = torch.arange(8, dtype=torch.int32).expand(1, 2, 8).contiguous()
    out32 = ref.ref_sparse_attention_mla(q, kv, idx, 0.25, 12)
    out16 = ref.ref_sparse_attention_mla(q.bfloat16(), kv.bfloat16(), idx, 0.25, 12)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).norm() / out32.norm() < 1e-2


def _fp8_mla_case(seed, B=2, T=3, H=4, Dc=32, Dr=8, S=40, K=12):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dc + Dr, generator=g) * 0.5
    latent = torch.randn(B, S, Dc, generator=g)
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True))   # the model's normalised latent
    k_rope = torch.randn(B, S, Dr, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T)]).view(B, T, K).to(torch.int32)
    idx[0, 1, K // 3:] = -1
    idx[1, 2, :] = -1
    return q, latent, k_rope, idx


def test_fp8_latent_quantisation_keeps_each_row_within_e4m3_precision():
    _, latent, _, _ = _fp8_mla_case(8)
    latent8, scale = ref.quantize_latent_fp8(latent.bfloat16())
    assert latent8.dtype == torch.float8_e4m3fn and latent8.shape == latent.shape
    assert scale.dtype == torch.float32 and scale.shape == latent.shape[:2]
    # each row's largest element maps to e4m3's largest finite value, 448
    assert torch.equal(latent8.float().abs().amax(-1), torch.full(scale.shape, 448.0))
    back = ref.dequantize_latent_fp8(latent8, scale)
    # 3 mantissa bits: every element within 1/16 of itself (or of the e4m3 subnormal step near 0)
    tol = latent.bfloat16().float().abs() / 16 + scale[..., None] * 2.0 ** -9
    assert ((back - latent.bfloat16().float()).abs() <= tol).all()


def test_fp8_latent_mla_reference_is_close_to_the_bf16_attention():
    """Attention over the FP8 latent cache against attention over the same cache in bf16 (same queries,
    same indices): within 5 % relative Frobenius error (e4m3: 3 mantissa bits); rows with no key are
    zeros in both; over the dequantised cache it is the bf16 reference exactly."""
    q, latent, k_rope, idx = _fp8_mla_case(9)
    scale = 0.2
    kv = torch.cat([latent, k_rope], -1).bfloat16()
    latent8, latent_scale = ref.quantize_latent_fp8(kv[..., :32])
    got = ref.ref_sparse_attention_mla_fp8(q.bfloat16(), latent8, latent_scale, kv[..., 32:], idx, scale)
    want = ref.ref_sparse_attention_mla(q.bfloat16(), kv, idx, scale, 32)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 0.05, err
    assert torch.count_nonzero(got[1, 2]) == 0
    deq = torch.cat([ref.dequantize_latent_fp8(latent8, latent_scale), kv[..., 32:].float()], -1)
    assert torch.equal(got, ref.ref_sparse_attention_mla(q.bfloat16(), deq, idx, scale, 32))


def _fp8_mla_call(latent8=None, latent_scale=None, k_rope=None, q=None):
    """The FP8-latent reference on a valid (1, 1, 2 heads, 8 + 4) case, with one argument replaced."""
    latent8 = torch.zeros(1, 5, 8).to(torch.float8_e4m3fn) if latent8 is None else latent8
    latent_scale = torch.ones(1, 5) if latent_scale is None else latent_scale
    k_rope = torch.zeros(1, 5, 4) if k_rope is None else k_rope
    q = torch.zeros(1, 1, 2, 12) if q is None else q
    return ref.ref_sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope,
                                            torch.zeros(1, 1, 2, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("call, field", [
    (lambda: ref.ref_indexer_topk(torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.randn(1, 2, 1),
                                  2, torch.tensor([0]), torch.tensor([4])), "q"),
    (lambda: ref.ref_indexer_topk(torch.randn(1, 2, 1, 3), torch.randn(1, 4, 5), torch.randn(1, 2, 1),
                                  2, torch.tensor([0]), torch.tensor([4])), "k"),
    (lambda: ref.ref_indexer_topk(torch.randn(1, 2, 1, 3), torch.randn(1, 4, 3), torch.randn(1, 2, 1),
                                  0, torch.tensor([0]), torch.tensor([4])), "topk"),
    (lambda: ref.ref_sparse_attention_gqa(torch.randn(1, 1, 3, 4), torch.randn(1, 5, 2, 4),
                                          torch.randn(1, 5, 2, 4), torch.zeros(1, 1, 2, dtype=torch.int32),
                                          1.0), "q"),
    (lambda: ref.ref_sparse_attention_mla(torch.randn(1, 1, 2, 4), torch.randn(1, 5, 4),
                                          torch.full((1, 1, 2), 5, dtype=torch.int32), 1.0, 3), "indices"),
    (lambda: _fp8_mla_call(latent8=torch.zeros(1, 5, 8, dtype=torch.bfloat16)), "latent8"),
    (lambda: _fp8_mla_call(latent8=torch.zeros(2, 5, 8).to(torch.float8_e4m3fn)), "latent8"),
    (lambda: _fp8_mla_call(latent_scale=torch.ones(1, 4)), "latent_scale"),
    (lambda: _fp8_mla_call(latent_scale=torch.ones(1, 5, dtype=torch.bfloat16)), "latent_scale"),
    (lambda: _fp8_mla_call(k_rope=torch.zeros(1, 5, 3)), "k_rope"),
    (lambda: _fp8_mla_call(q=torch.zeros(1, 1, 2, 8)), "latent8"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        call()


def test_switch_uses_references_on_cpu_and_honours_the_environment(monkeypatch):
    monkeypatch.setenv("INDEXCACHE_KERNELS", "auto")
    kernels.use_triton(None)
    assert kernels.backend("cpu") == "torch"
    monkeypatch.setenv("INDEXCACHE_KERNELS", "torch")
    assert kernels.backend("cuda") == "torch"
    monkeypatch.setenv("INDEXCACHE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="INDEXCACHE_KERNELS"):
        kernels.backend("cpu")
    kernels.use_triton(False)
    try:
        assert kernels.backend("cuda") == "torch"  # the override wins over the (bad) environment
    finally:
        kernels.use_triton(None)
    q, k, w, q_start, kv_len = random_indexer()
    monkeypatch.setenv("INDEXCACHE_KERNELS", "auto")
    assert torch.equal(kernels.indexer_topk(q, k, w, 3, q_start, kv_len),
                       ref.ref_indexer_topk(q, k, w, 3, q_start, kv_len))


def test_forcing_triton_on_cpu_tensors_says_how_to_fix_it(monkeypatch):
    """Without a GPU, INDEXCACHE_KERNELS=triton must fail loudly, never compute silently wrong."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, w, q_start, kv_len = random_indexer()
    kernels.use_triton(True)
    try:
        with pytest.raises((ValueError, RuntimeError), match="INDEXCACHE_KERNELS=torch"):
            kernels.indexer_topk(q, k, w, 3, q_start, kv_len)
    finally:
        kernels.use_triton(None)
