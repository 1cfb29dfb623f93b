"""The traffic sample format: what the sampler writes, calibration reads back, bad lines reported by number."""
import json
import re
import os

import pytest

from indexcache.serving.samples import Sample, SampleError, list_shards, read_samples, write_shard


class WordTokenizer:
    """One token per whitespace-separated word; chat = role + content words."""

    def encode(self, text):
        return [len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [1 for m in messages for _ in [m["role"], *m["content"].split()]]


def test_written_shard_reads_back_identically(tmp_path):
    samples = [Sample(prompt="hello there", ts=1.5, id="a"),
               Sample(messages=({"role": "user", "content": "hi"},)),
               Sample(token_ids=(5, 6, 7), tokenizer="smollm2")]
    path = write_shard(tmp_path, samples)
    assert path.parent == tmp_path and path.name.endswith(".jsonl")
    result = read_samples(tmp_path, tokenizer_name="smollm2")
    assert [r.sample for r in result.samples] == samples
    assert [r.line for r in result.samples] == [1, 2, 3]
    assert result.errors == []


def test_bad_lines_are_reported_by_number_and_skipped_with_counts(tmp_path):
    lines = ['{"prompt": "one two three"}',
             '{"prompt": "unterminated',
             '',
             '{"prompt": "   "}',
             '{"token_ids": [1, 2], "tokenizer": "gpt2"}',
             '{"prompt": "a b c d e f g h i j k"}',
             '{"promt": "typo"}',
             '{"messages": [{"role": "user", "content": "fine words"}]}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    result = read_samples(tmp_path / "s.jsonl", tokenizer=WordTokenizer(), tokenizer_name="smollm2", max_tokens=8)
    assert [r.line for r in result.samples] == [1, 8]
    assert result.samples[0].token_ids == [3, 3, 5]
    assert [(e.line, e.reason) for e in result.errors] == [
        (2, "malformed_json"), (3, "empty"), (4, "empty"), (5, "wrong_tokenizer"), (6, "over_context"),
        (7, "invalid")]
    assert "11 tokens, the context is 8" in str(result.errors[4])
    assert "promt" in str(result.errors[5])
    assert result.skipped["empty"] == 2
    assert "2 samples read; skipped 6 lines" in result.summary()


def test_stop_mode_raises_at_the_first_bad_line(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n{"prompt": "never reached"}\n')
    with pytest.raises(SampleError) as exc:
        read_samples(tmp_path, on_error="stop")
    assert exc.value.line == 2 and exc.value.reason == "invalid"
    assert "'prompt' must be a string" in str(exc.value)


def test_readers_never_see_temporary_files_of_a_crashed_writer(tmp_path):
    write_shard(tmp_path, [Sample(prompt="kept")])
    (tmp_path / ".samples-999.jsonl.abcd.tmp").write_text('{"prompt": "half wri')   # a crash mid-write
    (tmp_path / "notes.txt").write_text("not a shard")
    assert len(list_shards(tmp_path)) == 1
    assert [r.sample.prompt for r in read_samples(tmp_path).samples] == ["kept"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def boom():
        yield Sample(prompt="first")
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError):
        write_shard(tmp_path, boom())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("obj, field", [
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ({"token_ids": [1, 2]}, "'tokenizer'"),
    ({"token_ids": [1, -2], "tokenizer": "x"}, "'token_ids'"),
    ({"messages": [{"role": "user"}]}, "'messages[0]'"),
    ({"prompt": "a", "ts": "yesterday"}, "'ts'"),
])
def test_invalid_objects_name_the_field(obj, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Sample.from_json(json.loads(json.dumps(obj)))


def test_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory of shards"):
        read_samples(tmp_path / "nope")


def test_shards_written_in_one_millisecond_sort_in_write_order(tmp_path):
    """The directory's bounds delete the oldest shards by name: names must sort in write order even when
    a busy replica flushes several shards within one millisecond."""
    from indexcache.serving.samples import Sample, list_shards, read_samples, shard_name, write_shard

    for i in range(50):
        write_shard(tmp_path, [Sample(prompt=f"shard {i}", ts=0.0, id=str(i))], name=shard_name(now=1234.5))
    prompts = [r.sample.prompt for r in read_samples(tmp_path).samples]
    assert prompts == [f"shard {i}" for i in range(50)]
    assert len(list_shards(tmp_path)) == 50
