"""The CPU fast path (masked dense sparse attention) against the gathering references, fresh random inputs."""
import pytest
import torch

from indexcache import kernels
from indexcache.kernels.masked import masked_sparse_attention_gqa, masked_sparse_attention_mla
from indexcache.kernels.reference import ref_sparse_attention_gqa, ref_sparse_attention_mla


def random_indices(g, B, T, S, K):
    """Distinct keys per row, some rows padded with -1, one row with no key at all."""
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T)]).view(B, T, K).int()
    n_valid = torch.randint(0, K + 1, (B, T), generator=g)
    idx[torch.arange(K)[None, None, :] >= n_valid[..., None]] = -1
    idx[0, 0] = -1
    return idx


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_gqa_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, S, Hq, Hkv, D, K = 2, 7, 33, 6, 2, 16, 9
    q, k, v = (torch.randn(*shape, generator=g) for shape in [(B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)])
    idx = random_indices(g, B, T, S, K)
    want = ref_sparse_attention_gqa(q, k, v, idx, 0.3)
    got = masked_sparse_attention_gqa(q, k, v, idx, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[0, 0].abs().max() == 0                      # no key selected -> zeros, not NaN


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mla_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, S, H, Dc, Dr, K = 2, 5, 40, 4, 24, 8, 11
    q, kv = torch.randn(B, T, H, Dc + Dr, generator=g), torch.randn(B, S, Dc + Dr, generator=g)
    idx = random_indices(g, B, T, S, K)
    torch.testing.assert_close(masked_sparse_attention_mla(q, kv, idx, 0.2, Dc),
                               ref_sparse_attention_mla(q, kv, idx, 0.2, Dc), atol=1e-5, rtol=1e-5)


def test_auto_mode_uses_the_fast_path_on_cpu_and_torch_mode_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 10, 1, 8, generator=g), torch.randn(1, 10, 1, 8, generator=g)
    idx = random_indices(g, 1, 3, 10, 4)
    calls = []
    import indexcache.kernels as K
    monkeypatch.setattr(K, "masked_sparse_attention_gqa", lambda *a: calls.append("masked") or masked_sparse_attention_gqa(*a))
    monkeypatch.setattr(K, "ref_sparse_attention_gqa", lambda *a: calls.append("ref") or ref_sparse_attention_gqa(*a))
    monkeypatch.setenv("INDEXCACHE_KERNELS", "auto")
    kernels.sparse_attention_gqa(q, k, v, idx, 0.5)
    monkeypatch.setenv("INDEXCACHE_KERNELS", "torch")
    kernels.sparse_attention_gqa(q, k, v, idx, 0.5)
    monkeypatch.setenv("INDEXCACHE_KERNELS", "masked")
    kernels.sparse_attention_gqa(q, k, v, idx, 0.5)
    assert kernels.backend("cuda") == "torch"   # masked mode never picks Triton, even for CUDA tensors
    assert calls == ["masked", "ref", "masked"]
