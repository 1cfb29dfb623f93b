"""FLOP accounting behind indexcache_indexer_flops_* and the money-saved metric."""
from indexcache.serving.metrics import FlopModel, ServingMetrics, sparse_pairs, visible_pairs


def test_pair_counts_match_a_brute_force_count():
    for start in (0, 3, 17):
        for n in (1, 5, 40):
            positions = range(start, start + n)
            assert visible_pairs(start, n) == sum(p + 1 for p in positions)
            for topk in (1, 8, 30):
                assert sparse_pairs(start, n, topk) == sum(min(topk, p + 1) for p in positions)


def test_skipped_indexer_flops_scale_with_s_layers_and_price_the_saving(model):
    flops = FlopModel.of(model.args)
    rows = [(0, 20), (35, 1)]
    pairs = visible_pairs(0, 20) + visible_pairs(35, 1)
    per_pair = 2 * model.args.index_n_heads * model.args.index_head_dim
    computed, skipped, total = flops.forward(rows, n_full=2, logits_rows=2)
    assert computed == 2 * per_pair * pairs and skipped == 4 * per_pair * pairs
    assert total > computed
    all_full = flops.forward(rows, n_full=6, logits_rows=2)
    assert all_full[1] == 0
    m = ServingMetrics("tiny", "t", 6, gpu_hourly_usd=3600.0)   # 1 USD per second
    m.observe_forward(2.0, computed, skipped, total)
    m.observe_forward(2.0, *all_full)
    assert m.cost._value.get() == 4.0
    assert abs(m.cost_saved._value.get() - 2.0 * skipped / total) < 1e-12
