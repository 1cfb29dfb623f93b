"""train-indexer --break-row-weight: the KL weighted toward the query rows that break a periodic stretch
(issue 23; the passkey miss is decided by the needle's and the question's rows, not the filler's)."""
import json
import random

import pytest
import torch

from indexcache.offline import train_indexer
from indexcache.offline.indexer_stats import indexer_kl
from indexcache.offline.train_indexer import break_row_weights, periodic_break_rows, periodic_rows


def passkey_like(seed=0, unit_len=20, n_filler=1000, needle_at=500):
    """Random intro (50) + a 20-token unit repeated (filler) with a random 30-token needle inside + a random
    15-token question; returns the ids (1, T) and the positions of each part."""
    rng = random.Random(seed)
    word = lambda n: [rng.randrange(100, 50_000) for _ in range(n)]  # noqa: E731
    intro, unit, needle, question = word(50), word(unit_len), word(30), word(15)
    filler = (unit * (n_filler // unit_len + 1))[:n_filler]
    ids = intro + filler[:needle_at] + needle + filler[needle_at:] + question
    parts = {"intro": range(0, 50), "needle": range(50 + needle_at, 80 + needle_at),
             "question": range(len(ids) - 15, len(ids))}
    return torch.tensor([ids]), parts


def test_the_needle_and_the_question_break_the_filler():
    ids, parts = passkey_like()
    rows = periodic_break_rows(ids)[0]
    marked = set(torch.nonzero(rows).flatten().tolist())
    assert set(parts["needle"]) <= marked and set(parts["question"]) <= marked
    assert not marked & set(parts["intro"])
    # besides them only the filler right after the needle, until it is periodic again: one 20-token unit
    # before a token repeats the one 20 back, then a run of 2 units
    after_needle = set(range(parts["needle"].stop, parts["needle"].stop + 60))
    assert marked - set(parts["needle"]) - set(parts["question"]) <= after_needle
    assert len(marked) < 0.1 * ids.shape[1]


def test_natural_text_has_no_break_rows():
    rng = random.Random(1)
    ids = torch.tensor([[rng.randrange(100, 50_000) for _ in range(800)]])
    assert not periodic_rows(ids).any() and not periodic_break_rows(ids).any()
    assert break_row_weights(ids, 0.0) is None
    assert torch.equal(break_row_weights(ids, 4.0), torch.ones(1, 800))


def slow_periodic_rows(ids: list[int], max_period=64, min_run=32) -> list[bool]:
    """The definition, one position and period at a time."""
    out = []
    for t in range(len(ids)):
        hit = False
        for p in range(1, max_period + 1):
            need = max(min_run, 2 * p)
            if t - need + 1 - p >= 0 and all(ids[s] == ids[s - p] for s in range(t - need + 1, t + 1)):
                hit = True
        out.append(hit)
    return out


def test_periodic_rows_match_the_slow_definition_on_random_planted_repeats():
    rng = random.Random(7)
    for trial in range(3):
        ids = [rng.randrange(0, 30) for _ in range(400)]
        for _ in range(3):                        # plant periodic stretches of random units
            unit = [rng.randrange(0, 30) for _ in range(rng.randint(1, 24))]
            start, length = rng.randrange(0, 300), rng.randint(20, 100)
            ids[start:start + length] = (unit * (length // len(unit) + 1))[:length]
        ids = ids[:400]
        fast = periodic_rows(torch.tensor([ids]), max_period=30, min_run=12)[0].tolist()
        assert fast == slow_periodic_rows(ids, max_period=30, min_run=12), trial
        slow = slow_periodic_rows(ids, max_period=30, min_run=12)
        breaks = periodic_break_rows(torch.tensor([ids]), reach=40, max_period=30, min_run=12)[0].tolist()
        assert breaks == [not slow[t] and any(slow[max(0, t - 40):t]) for t in range(400)]


def test_weighted_kl_is_the_weighted_mean_of_the_row_kls():
    g = torch.Generator().manual_seed(0)
    B, T = 2, 24
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = torch.randn(B, T, T, generator=g).masked_fill(~causal, float("-inf"))
    attn = torch.softmax(torch.randn(B, T, T, generator=g).masked_fill(~causal, float("-inf")), dim=-1)
    w = torch.rand(B, T, generator=g) * 3
    rows = []
    for b in range(B):
        for t in range(T):
            p, q = attn[b, t, :t + 1], torch.log_softmax(scores[b, t, :t + 1], dim=-1)
            rows.append((p * (p.log() - q)).sum())
    per_row = torch.stack(rows).view(B, T)
    torch.testing.assert_close(indexer_kl(attn, scores, row_weights=w), (per_row * w).sum() / w.sum(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(indexer_kl(attn, scores, row_weights=torch.ones(B, T)), per_row.mean(),
                               rtol=1e-5, atol=1e-6)


def test_train_indexer_records_the_row_weight(small_checkpoint, tmp_path, capsys):
    base = ["--model", str(small_checkpoint), "--seq-len", "160", "--warmup", "1", "--lm-dtype", "float32",
            "--device", "cpu", "--no-progress", "--steps", "2", "--periodic-every", "1"]
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "w"), "--break-row-weight", "4"]) == 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["break_row_weight"] == 4.0 and "weighted 1 + 4 on rows that break" in manifest["loss"]
    assert manifest["kl_first"] > 0
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "bad"), "--break-row-weight", "-1"]) == 2
    assert "--break-row-weight must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("weight", [0.0, 4.0])
def test_weighting_changes_the_loss_only_where_rows_break(weight):
    """On a window with no periodic stretch the weighted loss is the plain one, whatever the weight."""
    rng = random.Random(3)
    ids = torch.tensor([[rng.randrange(100, 50_000) for _ in range(64)]])
    g = torch.Generator().manual_seed(1)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    scores = torch.randn(1, 64, 64, generator=g).masked_fill(~causal, float("-inf"))
    attn = torch.softmax(torch.randn(1, 64, 64, generator=g).masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(indexer_kl(attn, scores, row_weights=break_row_weights(ids, weight)),
                               indexer_kl(attn, scores))
