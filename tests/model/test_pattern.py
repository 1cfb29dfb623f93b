import pytest

from indexcache.model.pattern import (full_layers, pattern_from_indexer_types, resolve_pattern, source_layers,
                                uniform_pattern)


def test_design_examples():
    p = resolve_pattern(47, freq=4, offset=2)
    assert full_layers(p) == [0, 1] + list(range(5, 47, 4))
    assert len(full_layers(p)) == 13
    p = resolve_pattern(78, freq=4, offset=3)
    assert full_layers(p) == [0, 1, 2] + list(range(6, 78, 4))
    assert len(full_layers(p)) == 21


def test_defaults_are_all_full_and_explicit_pattern_wins():
    assert resolve_pattern(5) == "FFFFF"
    assert resolve_pattern(4, freq=2, pattern="FSSF") == "FSSF"


def test_layer_zero_is_always_full():
    for freq in range(1, 6):
        for offset in range(1, 6):
            assert resolve_pattern(12, freq=freq, offset=offset)[0] == "F"


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern="FSF"), "has 3 entries but the model has 4 layers"),
    (dict(pattern="FSXF"), "only 'F'"),
    (dict(pattern="SFFF"), "must start with 'F'"),
    (dict(pattern=""), "non-empty"),
    (dict(freq=0), "index_topk_freq"),
    (dict(offset=0), "index_skip_topk_offset"),
])
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_pattern(4, **kwargs)


def test_source_layers_point_at_nearest_preceding_full_layer():
    assert source_layers("FSSFSF") == [0, 0, 0, 3, 3, 5]


def test_indexer_types_and_uniform():
    assert pattern_from_indexer_types(["full", "shared", "shared", "full"]) == "FSSF"
    with pytest.raises(ValueError, match="full"):
        pattern_from_indexer_types(["full", "sparse"])
    u = uniform_pattern(12, 3)
    assert u.count("F") == 3 and u[0] == "F" and full_layers(u) == [0, 4, 8]
