"""The served fast path (Triton backend, `ctx.in_place`) on the paged KV cache against the same fast path on
the contiguous slot cache (itself tested against the reference in test_model_fast_path.py).

Paged, the sparse-attention kernels read the flat block pool with the top-k logical indices mapped to pool
rows (model/paged.py `map_indices`, SGLang's topk_transform), and the Triton indexer reads its keys through
the block tables in place (`k_rows`: pool row of each visible position). The same tokens must select the
same keys and give the same logits whatever the block layout. Marked gpu: natively on an H200, in CI under
Triton's interpreter (test_triton_interpreted.py). Tolerance: 1e-5 relative on the CPU (the same kernels
over the same values, only addressed differently); 1e-3 on CUDA (TF32 dots in another order).
"""
import pytest
import torch

from indexcache import kernels
from indexcache.model import KVCache
from indexcache.model.dsa import Capture
from indexcache.kernels.indexer import indexer_topk as triton_indexer_topk
from indexcache.model.paged import PagedKVCache, logical_rows
from tiny_models import random_model

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
TOL = 1e-3 if DEVICE == "cuda" else 1e-5
BLOCK = 4


def _run(model, paged: bool, indexer_fp8: bool, prompts, pattern, layout):
    """Chunked prefill (7-token chunks) of each request, then 3 batched decode steps.
    Returns (logits (N, V), top-k indices of every forward per layer)."""
    kernels.use_triton(True)
    try:
        if paged:
            cache = PagedKVCache(model.args, int(layout.max()) + 1, BLOCK, pattern, dtype=DTYPE, device=DEVICE,
                                 indexer_fp8=indexer_fp8)
        else:
            cache = KVCache(model.args, 4, 64, pattern, dtype=DTYPE, device=DEVICE, indexer_fp8=indexer_fp8)
        slots = [2, 0]

        def where(rows):
            if paged:
                return {"block_tables": layout[rows].to(DEVICE)}
            return {"slots": [slots[r] for r in rows]}

        outs, selections = [], []
        for i, prompt in enumerate(prompts):
            for c0 in range(0, len(prompt), 7):
                capture = Capture(attention=False, index_scores=False)
                chunk = torch.tensor([prompt[c0:c0 + 7]], device=DEVICE)
                outs.append(model(chunk, start_pos=[c0], cache=cache, pattern=pattern, capture=capture,
                                  **where([i]))[0].float())
                selections.append(capture.indices)
        lengths, nxt = [len(p) for p in prompts], [p[0] for p in prompts]
        for _ in range(3):
            capture = Capture(attention=False, index_scores=False)
            tokens = torch.tensor([[t] for t in nxt], device=DEVICE)
            outs.append(model(tokens, start_pos=lengths, cache=cache, pattern=pattern, capture=capture,
                              **where([0, 1]))[:, -1].float())
            selections.append(capture.indices)
            nxt = [(t * 7 + 3) % model.args.vocab_size for t in nxt]
            lengths = [n + 1 for n in lengths]
        return torch.cat(outs), selections, cache
    finally:
        kernels.use_triton(None)


# two of the four combinations (each ~35 s under the interpreter): GQA with float indexer keys, MLA with FP8
@pytest.mark.parametrize("family, indexer_fp8", [("gqa", False), ("mla", True)], ids=["gqa-float", "mla-fp8"])
def test_paged_pool_gives_the_slot_cache_results_on_a_random_block_layout(family, indexer_fp8):
    seed = int(torch.randint(0, 10_000, ()))
    model = random_model(family, seed=seed, projection_std=0.3, index_head_dim=32).to(DEVICE, DTYPE)
    n = model.args.n_layers
    pattern = "FSF" + "S" * (n - 3)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, model.args.vocab_size, (n_tok,), generator=g).tolist() for n_tok in (19, 11)]
    per_request = 64 // BLOCK
    layout = (torch.randperm(2 * per_request + 5, generator=g) + 1)[: 2 * per_request].view(2, per_request)
    slot_logits, slot_sel, _ = _run(model, False, indexer_fp8, prompts, pattern, layout)
    paged_logits, paged_sel, cache = _run(model, True, indexer_fp8, prompts, pattern, layout)
    for a, b in zip(slot_sel, paged_sel):
        assert a.keys() == b.keys()
        for layer in a:
            assert torch.equal(a[layer].cpu(), b[layer].cpu()), f"layer {layer} selected other keys (seed {seed})"
    err = (paged_logits - slot_logits).norm() / slot_logits.norm()
    assert err < TOL, f"relative error {err:.2e} (seed {seed})"
    assert sorted(cache.indexer_k) == [0, 2]    # S layers own no indexer-key blocks


@pytest.mark.parametrize("T", [1, 24], ids=["decode-kernel", "prefill-kernel"])
@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
def test_indexer_reads_keys_through_the_block_table_as_if_gathered(T, fp8):
    """indexer_topk(k_rows=) over a pool (n_rows, D) equals the same kernel on the keys gathered through
    the table (B, S, D): the same indices, on fresh random inputs and a random block layout."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    B, H, D, S, topk, n_blocks = 2, 4, 32, 40, 8, 30
    layout = (torch.randperm(n_blocks - 1, generator=g) + 1)[: B * (S // BLOCK)].view(B, -1)
    rows = logical_rows(layout, BLOCK, S).to(DEVICE)                                  # (B, S)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    pool = torch.randn(n_blocks * BLOCK, D, generator=g).to(DEVICE)
    w = torch.rand(B, T, H, generator=g).to(DEVICE)
    q_start = torch.tensor([S - T, S - T - 5], device=DEVICE)
    kv_len = q_start + T
    scale = None
    if fp8:
        q, k8, w, k_scale = kernels.quantize_indexer_fp8(q, pool[None], w)
        pool, scale = k8[0], k_scale[0]                                                  # (n_rows, D), (n_rows,)
    through_table = triton_indexer_topk(q, pool, w, topk, q_start, kv_len, k_scale=scale, k_rows=rows)
    gathered = triton_indexer_topk(q, pool[rows], w, topk, q_start, kv_len,
                                   k_scale=None if scale is None else scale[rows])
    assert torch.equal(through_table.cpu(), gathered.cpu())
    assert (through_table[:, :, 0] >= 0).all()
