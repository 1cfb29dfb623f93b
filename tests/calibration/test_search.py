"""The greedy search: activation reuse chooses what the plain search chooses, at fewer passes."""
import pytest

from indexcache.offline.calibration import (CalibrationSet, all_full_pattern, candidates_total, flip, greedy_search,
                                    pattern_loss, plain_greedy_search, target_full_layers)
from indexcache.model.pattern import full_layers

# Reuse restarts at layer l from the very tensors a whole forward would compute there, so losses
# agree to rounding of the float64 sums; 1e-9 relative is far below any real loss difference (1e-4).
LOSS_RTOL = 1e-9


@pytest.fixture
def calib(make_tokens):
    return CalibrationSet.from_token_lists(make_tokens(12), batch_tokens=256)


def test_reuse_and_plain_choose_the_same_pattern_with_the_same_losses(family, make_model, calib):
    model = make_model(family, n_layers=8)
    reuse = greedy_search(model, calib, target=2)
    plain = plain_greedy_search(model, calib, target=2)
    assert reuse.pattern == plain.pattern
    assert reuse.flip_order == plain.flip_order
    assert reuse.loss_all_full == pytest.approx(plain.loss_all_full, rel=LOSS_RTOL)
    assert reuse.step_losses == pytest.approx(plain.step_losses, rel=LOSS_RTOL)
    for mine, ref in zip(reuse.candidate_losses, plain.candidate_losses):
        assert mine.keys() == ref.keys()
        assert [mine[l] for l in ref] == pytest.approx([ref[l] for l in ref], rel=LOSS_RTOL)
    # Passes: plain = N per candidate plus the all-F forward; reuse = N - l per candidate l, plus N - l*
    # to refresh the cache after each step, plus the initial all-F build.
    n = 8
    expected = n + sum(sum(n - l for l in step) + (n - flipped)
                       for step, flipped in zip(reuse.candidate_losses, reuse.flip_order))
    assert plain.passes == n * (1 + candidates_total(8, 2)) == reuse.plain_passes
    assert reuse.passes == expected < plain.passes


def test_each_step_keeps_the_cheapest_flip_and_layer_0_stays_full(make_model, calib):
    model = make_model("gqa", n_layers=8)
    result = greedy_search(model, calib, target=3)
    assert result.pattern[0] == "F" and result.pattern.count("F") == 3
    assert 0 not in result.flip_order and len(set(result.flip_order)) == 5
    pattern = "F" * 8
    for step, (flipped, loss, candidates) in enumerate(zip(result.flip_order, result.step_losses,
                                                           result.candidate_losses)):
        assert sorted(candidates) == full_layers(pattern)[1:]
        assert loss == min(candidates.values()) == candidates[flipped]
        pattern = flip(pattern, flipped)
        # the objective reported is the model's plain loss of that pattern, computed independently
        assert pattern_loss(model, calib, pattern) == pytest.approx(loss, rel=LOSS_RTOL)
    assert pattern == result.pattern


def test_layers_without_indexer_weights_start_and_stay_shared(make_model, calib):
    model = make_model("gqa", n_layers=6, indexer_layers={0, 1, 2, 4, 5})
    assert all_full_pattern(model) == "FFFSFF"
    result = greedy_search(model, calib, target=2)
    assert result.pattern[3] == "S" and result.pattern.count("F") == 2
    assert all(3 not in c for c in result.candidate_losses)


def test_target_fraction_rounds_to_a_layer_count_and_bad_targets_name_the_flag():
    assert target_full_layers(30, 0.25) == 8   # 7.5 rounds up
    assert target_full_layers(30, 0.5) == 15
    assert target_full_layers(8, 0.01) == 1    # layer 0 always stays
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--target-full"):
            target_full_layers(30, bad)


def test_calibration_set_batches_by_length_and_counts_targets(make_tokens):
    samples = [[5, 6], [7, 8, 9, 10], [11, 12, 13]]
    calib = CalibrationSet.from_token_lists(samples, batch_tokens=8)
    assert calib.num_samples == 3 and calib.num_tokens == 9 and calib.num_targets == 6
    assert [b.tokens.shape[0] for b in calib.batches] == [2, 1]  # 2 x 4 padded tokens fit, a third would not
    assert int(sum(b.target_mask().sum() for b in calib.batches)) == 6
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        CalibrationSet.from_token_lists([[1, 2], [3]])
    with pytest.raises(ValueError, match="no calibration samples"):
        CalibrationSet.from_token_lists([])


def test_padding_does_not_change_the_loss(make_model, make_tokens):
    """Batching pads short samples; the objective must be the same as one sample at a time."""
    model = make_model("gqa")
    samples = make_tokens(5)
    batched = CalibrationSet.from_token_lists(samples, batch_tokens=4096)
    single = CalibrationSet.from_token_lists(samples, batch_tokens=1)  # one sample per batch
    assert len(batched.batches) == 1 and len(single.batches) == 5
    pattern = "FSSFSS"
    assert pattern_loss(model, batched, pattern) == pytest.approx(pattern_loss(model, single, pattern), rel=1e-5)
