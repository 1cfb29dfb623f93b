"""Traffic sampling: opt-in fraction, redaction, shards calibration can read, size and age bounds."""
import os
import random

import pytest

from indexcache.serving.sampler import SamplerConfig, TrafficSampler, redact
from indexcache.serving.samples import read_samples


def test_redaction_hides_emails_and_long_numbers_but_keeps_text():
    text = "Mail jane.doe+x@example.co.uk or call 555-123-4567, card 4111 1111 1111 1111, in 2024 room 12."
    out = redact(text)
    assert "jane" not in out and "4111" not in out and "555" not in out
    assert out == "Mail <email> or call <number>, card <number>, in 2024 room 12."


def test_a_configured_fraction_is_kept_and_read_back_by_calibration(tmp_path):
    sampler = TrafficSampler(SamplerConfig(str(tmp_path), rate=0.25, shard_samples=1000), rng=random.Random(0))
    kept = sum(sampler.offer(prompt=f"question {i}: my mail is a{i}@b.com") for i in range(2000))
    assert 400 < kept < 600
    sampler.offer(messages=[{"role": "user", "content": "id 123456789"}])
    path = sampler.flush()
    assert path is not None
    result = read_samples(tmp_path)
    assert not result.errors and len(result.samples) == sampler.kept
    assert all("@" not in r.sample.prompt for r in result.samples if r.sample.prompt)


def test_rate_zero_writes_nothing_and_bad_rates_are_refused(tmp_path):
    sampler = TrafficSampler(SamplerConfig(str(tmp_path), rate=0.0))
    assert not any(sampler.offer(prompt="x") for _ in range(100))
    sampler.flush()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="sample_rate"):
        SamplerConfig(str(tmp_path), rate=1.5)
    with pytest.raises(ValueError, match="sample_rate"):
        sampler.set_rate(-0.1)


def test_redaction_can_be_turned_off_and_long_prompts_are_not_kept(tmp_path):
    sampler = TrafficSampler(SamplerConfig(str(tmp_path), rate=1.0, redact=False, max_prompt_chars=50))
    assert sampler.offer(prompt="reach me at a@b.com")
    assert not sampler.offer(prompt="y" * 51)
    sampler.flush()
    assert [r.sample.prompt for r in read_samples(tmp_path).samples] == ["reach me at a@b.com"]


def test_shards_flush_by_count_and_the_directory_stays_within_its_bounds(tmp_path):
    now = [1_000_000.0]
    sampler = TrafficSampler(SamplerConfig(str(tmp_path), rate=1.0, shard_samples=10, max_bytes=3000,
                                           max_age_s=3600), clock=lambda: now[0])
    for i in range(100):
        sampler.offer(prompt=f"prompt number {i} " + "x" * 20)
    shards = sorted(os.listdir(tmp_path))
    total = sum(os.path.getsize(tmp_path / s) for s in shards)
    assert 0 < total <= 3000 and len(shards) < 10
    # the newest samples survive, the oldest were dropped
    prompts = [r.sample.prompt for r in read_samples(tmp_path).samples]
    assert prompts[-1].startswith("prompt number 99 ") and not any(p.startswith("prompt number 0 ") for p in prompts)
    # age bound: everything older than max_age_s goes
    now[0] += 7200
    for s in shards:
        os.utime(tmp_path / s, (now[0] - 7200, now[0] - 7200))
    sampler.enforce_bounds()
    assert os.listdir(tmp_path) == []
