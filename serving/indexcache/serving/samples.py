"""Traffic samples: the JSONL format the sampler writes and calibration reads.

One JSON object per line, one of three shapes (docs/contracts.md):

    {"prompt": "text"}
    {"messages": [{"role": "user", "content": "..."}, ...]}
    {"token_ids": [1, 2, 3], "tokenizer": "<name>"}

each with optional "ts" (unix seconds) and "id" (string). Files are shards named `*.jsonl` in one
directory; names starting with "." are in-progress temporary files and are never read.

Writing is atomic: a shard is written to a hidden temporary file in the same directory, fsynced, then
renamed into place, so a crash never leaves a half-written shard where a reader looks.

Reading reports every bad line by file and line number with a reason (`malformed_json`, `empty`,
`invalid`, `over_context`, `wrong_tokenizer`); `on_error="skip"` skips and counts them,
`on_error="stop"` raises `SampleError` at the first one.
"""
from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

SHARD_SUFFIX = ".jsonl"
REASONS = ("malformed_json", "empty", "invalid", "over_context", "wrong_tokenizer")


class Tokenizer(Protocol):
    """What reading needs to count tokens (indexcache.model.tokenizer.CheckpointTokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...


class SampleError(ValueError):
    """One bad line: where it is and why, in words a user can act on."""

    def __init__(self, path: str | Path, line: int, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = str(path), line, reason, detail
        super().__init__(f"{path}:{line}: {reason}: {detail}")


@dataclass(frozen=True)
class Sample:
    """One calibration sample: exactly one of prompt / messages / token_ids is set."""
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    tokenizer: str | None = None   # name of the tokenizer that produced token_ids
    ts: float | None = None        # unix seconds when the request arrived
    id: str | None = None

    def __post_init__(self):
        given = [k for k in ("prompt", "messages", "token_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a sample needs exactly one of 'prompt', 'messages' or 'token_ids'"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.token_ids is not None and not self.tokenizer:
            raise ValueError("'token_ids' needs 'tokenizer' (the name of the tokenizer that produced them)")

    @property
    def kind(self) -> str:
        return "prompt" if self.prompt is not None else "messages" if self.messages is not None else "token_ids"

    def to_json(self) -> dict:
        out: dict = {}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        elif self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["token_ids"] = list(self.token_ids)
            out["tokenizer"] = self.tokenizer
        if self.ts is not None:
            out["ts"] = self.ts
        if self.id is not None:
            out["id"] = self.id
        return out

    @classmethod
    def from_json(cls, obj) -> "Sample":
        """Validate one decoded line; ValueError names the field and what it must be."""
        if not isinstance(obj, dict):
            raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"prompt", "messages", "token_ids", "tokenizer", "ts", "id"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: prompt, messages, token_ids, "
                             "tokenizer, ts, id")
        prompt, messages, token_ids = obj.get("prompt"), obj.get("messages"), obj.get("token_ids")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list of {role, content} objects")
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise ValueError(f"'messages[{i}]' must be an object with string 'role' and 'content'")
            messages = tuple(messages)
        if token_ids is not None:
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          and t >= 0 for t in token_ids):
                raise ValueError("'token_ids' must be a list of non-negative integers")
            token_ids = tuple(token_ids)
        tokenizer = obj.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ValueError("'tokenizer' must be a string (the tokenizer's name)")
        ts = obj.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise ValueError("'ts' must be a number (unix seconds)")
        sid = obj.get("id")
        if sid is not None and not isinstance(sid, str):
            raise ValueError("'id' must be a string")
        return cls(prompt=prompt, messages=messages, token_ids=token_ids, tokenizer=tokenizer,
                   ts=None if ts is None else float(ts), id=sid)

    def is_empty(self) -> bool:
        if self.prompt is not None:
            return not self.prompt.strip()
        if self.messages is not None:
            return not any(m["content"].strip() for m in self.messages)
        return not self.token_ids

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids of this sample (token_ids as given; text through the tokenizer or its chat template)."""
        if self.token_ids is not None:
            return list(self.token_ids)
        if self.prompt is not None:
            return tokenizer.encode(self.prompt)
        return tokenizer.apply_chat_template([dict(m) for m in self.messages], add_generation_prompt=False)


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
_shard_sequence = itertools.count()


def shard_name(now: float | None = None) -> str:
    """Sortable by time, unique across replicas writing to one volume. Within one process a sequence
    number keeps shards written in the same millisecond in write order (the bounds delete the oldest by
    name); across replicas the random part only makes names unique."""
    now = time.time() if now is None else now
    return f"samples-{int(now * 1000):015d}-{next(_shard_sequence):09d}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"


def write_shard(directory: str | Path, samples: Iterable[Sample], name: str | None = None) -> Path:
    """Write samples as one JSONL shard, atomically; return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / (name or shard_name())
    if not final.name.endswith(SHARD_SUFFIX) or final.name.startswith("."):
        raise ValueError(f"shard name {final.name!r} must end in {SHARD_SUFFIX} and not start with '.'")
    tmp = directory / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX within one filesystem
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a crash
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return final


def list_shards(path: str | Path) -> list[Path]:
    """A file, or a directory's visible `*.jsonl` shards in name (= time) order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"samples path {path} does not exist; give a .jsonl file or a directory of shards")
    return sorted(p for p in path.iterdir()
                  if p.is_file() and p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
@dataclass
class ReadSample:
    sample: Sample
    path: str
    line: int
    token_ids: list[int] | None = None  # set when read with a tokenizer


@dataclass
class ReadResult:
    samples: list[ReadSample] = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)

    @property
    def skipped(self) -> Counter:
        """Skipped lines per reason."""
        return Counter(e.reason for e in self.errors)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{len(self.samples)} samples read" + (f"; skipped {len(self.errors)} lines ({skipped})"
                                                       if self.errors else "")


def iter_samples(path: str | Path, *, tokenizer: Tokenizer | None = None, tokenizer_name: str | None = None,
                 max_tokens: int | None = None, on_error: str = "skip",
                 errors: list[SampleError] | None = None) -> Iterator[ReadSample]:
    """Yield valid samples from a file or shard directory.

    tokenizer: encode text samples (and check their length); tokenizer_name: token_ids samples must carry
    this name (otherwise they are `wrong_tokenizer`); max_tokens: the model context, longer samples are
    `over_context`. Bad lines go to `errors` (on_error="skip") or raise SampleError (on_error="stop").
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")

    def bad(p, n, reason, detail):
        err = SampleError(p, n, reason, detail)
        if on_error == "stop":
            raise err
        if errors is not None:
            errors.append(err)

    for shard in list_shards(path):
        with open(shard, encoding="utf-8", errors="replace") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    bad(shard, n, "empty", "blank line")
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    bad(shard, n, "malformed_json", f"{exc.msg} at column {exc.colno}")
                    continue
                try:
                    sample = Sample.from_json(obj)
                except ValueError as exc:
                    bad(shard, n, "invalid", str(exc))
                    continue
                if sample.is_empty():
                    bad(shard, n, "empty", f"the {sample.kind} has no content")
                    continue
                if sample.token_ids is not None and tokenizer_name is not None and sample.tokenizer != tokenizer_name:
                    bad(shard, n, "wrong_tokenizer",
                        f"token_ids come from tokenizer {sample.tokenizer!r}, this model uses {tokenizer_name!r}; "
                        "resample with this model or store text instead of token_ids")
                    continue
                ids = None
                if sample.token_ids is not None:
                    ids = list(sample.token_ids)
                elif tokenizer is not None:
                    try:
                        ids = sample.encode(tokenizer)
                    except ValueError as exc:  # e.g. a tokenizer without a chat template
                        bad(shard, n, "invalid", str(exc))
                        continue
                if max_tokens is not None and ids is not None and len(ids) > max_tokens:
                    bad(shard, n, "over_context", f"{len(ids)} tokens, the context is {max_tokens}")
                    continue
                yield ReadSample(sample, str(shard), n, ids if tokenizer is not None else None)


def read_samples(path: str | Path, **kwargs) -> ReadResult:
    """All valid samples plus the skipped lines (see iter_samples for the arguments)."""
    result = ReadResult()
    result.samples = list(iter_samples(path, errors=result.errors, **kwargs))
    return result
