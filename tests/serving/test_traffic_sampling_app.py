"""Traffic sampling through the running app: sample_rate comes from IndexCacheServer's user_config (as the
operator sets it); kept requests (completions and chat, streaming or not) land in samples_dir as JSONL shards
in the calibration format, redacted, and `indexcache.serving.samples` reads them back; at rate 0 nothing lands."""
import json
from pathlib import Path

from indexcache.serving.samples import list_shards, read_samples

MODEL = "indexcache-tiny"


def test_sampled_requests_land_as_redacted_calibration_shards(serve_app, tokenizer):
    samples_dir = Path(serve_app.app_args["samples_dir"])
    client = serve_app.client()
    before = set(list_shards(samples_dir))

    # rate 0: requests are served, nothing is kept (a reconfigure flushes the buffer: still nothing)
    serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 40, "sample_rate": 0.0})
    client.completions.create(model=MODEL, prompt="not kept: bob@example.com", max_tokens=2)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "not kept"}], max_tokens=2)
    serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 41, "sample_rate": 0.0})
    assert set(list_shards(samples_dir)) == before

    # rate 1: every request is kept; turning sampling off flushes what was kept to the volume at once
    serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 42, "sample_rate": 1.0})
    client.completions.create(model=MODEL, prompt="mail jane.doe@example.com, call 555-123-4567", max_tokens=2)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "card 4111 1111 1111 1111?"}]
    list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True))
    serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 43, "sample_rate": 0.0})

    new = sorted(set(list_shards(samples_dir)) - before)
    assert new, "no sample shard was written"
    result = read_samples(samples_dir, tokenizer=tokenizer, tokenizer_name=tokenizer.name, max_tokens=256,
                          on_error="stop")   # every line is valid calibration input
    kept = [r.sample for r in result.samples if r.path in {str(p) for p in new}]
    assert [s.prompt for s in kept if s.prompt is not None] == ["mail <email>, call <number>"]
    assert [list(s.messages) for s in kept if s.messages is not None] == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "card <number>?"}]]
    assert all(s.ts is not None and s.id for s in kept)
    # nothing on disk keeps the secrets, in any field; the generated timestamp and id are left out of the
    # search, since their digits can spell "555" or "4111" by chance (seen in CI)
    lines = [json.loads(line) for p in new for line in p.read_text().splitlines()]
    text = json.dumps([{k: v for k, v in line.items() if k not in ("ts", "id")} for line in lines])
    assert "jane" not in text and "4111" not in text and "555" not in text
    assert not list(samples_dir.glob(".*"))   # no temporary file left next to the shards
    serve_app.deploy({"pattern": "FFFFFF", "pattern_version": 44})
