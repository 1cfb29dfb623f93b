"""Traffic sampling: keep a configured fraction of prompts as calibration samples (opt-in).

Off unless a directory and a rate > 0 are configured. Kept prompts are redacted (e-mail addresses and
long digit runs: phone, card and account numbers) by default, buffered, and written as JSONL shards in
the calibration sample format (samples.py) atomically. The directory (a volume in Kubernetes) is kept
within a size bound and an age bound by deleting the oldest shards.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .samples import Sample, list_shards, write_shard

log = logging.getLogger(__name__)

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def redact(text: str, min_digits: int = 6) -> str:
    """Replace e-mail addresses with <email> and runs of >= min_digits digits (spaces/dashes allowed
    between them, as in phone and card numbers) with <number>."""
    text = EMAIL.sub("<email>", text)
    digits = re.compile(r"\d(?:[ -]?\d){%d,}" % (min_digits - 1))
    return digits.sub("<number>", text)


@dataclass
class SamplerConfig:
    directory: str
    rate: float = 0.0                 # fraction of requests kept, 0..1
    redact: bool = True
    min_digits: int = 6               # digit runs this long or longer are redacted
    max_prompt_chars: int = 32_000    # longer prompts are not kept (calibration windows are shorter anyway)
    shard_samples: int = 256          # flush a shard at this many buffered samples ...
    flush_interval_s: float = 60.0    # ... or when the oldest buffered sample is this old
    max_bytes: int = 256 * 2**20      # the directory's bound: oldest shards deleted beyond it
    max_age_s: float = 7 * 86400      # shards older than this are deleted

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"sample_rate must be between 0 and 1, got {self.rate}")
        if self.min_digits < 2:
            raise ValueError(f"min_digits must be >= 2, got {self.min_digits}")
        for name in ("max_prompt_chars", "shard_samples", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TrafficSampler:
    def __init__(self, config: SamplerConfig, rng: random.Random | None = None, clock=time.time):
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock
        self.buffer: list[Sample] = []
        self.kept = 0
        self.dropped_too_long = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        Path(config.directory).mkdir(parents=True, exist_ok=True)

    def start(self) -> "TrafficSampler":
        """Flush on a timer too, so a quiet replica's buffered samples reach the volume within
        flush_interval_s (a daemon thread: it dies with the replica)."""
        def loop():
            while not self._stopped.wait(self.config.flush_interval_s):
                if self.buffer:
                    self.flush()
        threading.Thread(target=loop, name="indexcache-sampler", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.flush()

    def set_rate(self, rate: float) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"sample_rate must be between 0 and 1, got {rate}")
        self.config.rate = rate

    def offer(self, *, prompt: str | None = None, messages: list[dict] | None = None) -> bool:
        """Maybe keep this request's input; returns whether it was kept."""
        cfg = self.config
        if cfg.rate <= 0 or self.rng.random() >= cfg.rate:
            return False
        size = len(prompt) if prompt is not None else sum(len(str(m.get("content", ""))) for m in messages)
        if size > cfg.max_prompt_chars:
            self.dropped_too_long += 1
            return False
        clean = (lambda s: redact(s, cfg.min_digits)) if cfg.redact else (lambda s: s)
        if prompt is not None:
            sample = Sample(prompt=clean(prompt), ts=self.clock(), id=uuid.uuid4().hex)
        else:
            msgs = tuple({"role": str(m["role"]), "content": clean(str(m["content"]))} for m in messages)
            sample = Sample(messages=msgs, ts=self.clock(), id=uuid.uuid4().hex)
        with self._lock:
            self.buffer.append(sample)
            self.kept += 1
            due = (len(self.buffer) >= cfg.shard_samples
                   or self.clock() - self.buffer[0].ts >= cfg.flush_interval_s)
        if due:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write buffered samples as one shard (atomically), then enforce the directory's bounds."""
        with self._lock:
            batch, self.buffer = self.buffer, []
        path = None
        if batch:
            try:
                path = write_shard(self.config.directory, batch)
            except OSError:   # a full or broken volume must not fail requests: log and drop the batch
                log.exception("could not write a traffic sample shard to %s", self.config.directory)
        self.enforce_bounds()
        return path

    def enforce_bounds(self) -> list[Path]:
        """Delete shards older than max_age_s, then the oldest until the directory fits max_bytes."""
        removed = []
        now = self.clock()
        shards = list_shards(self.config.directory)           # name order = time order
        sizes = {p: p.stat().st_size for p in shards}
        for p in shards:
            if now - p.stat().st_mtime > self.config.max_age_s:
                removed.append(p)
        total = sum(sizes[p] for p in shards if p not in removed)
        for p in shards:
            if total <= self.config.max_bytes:
                break
            if p not in removed:
                removed.append(p)
                total -= sizes[p]
        for p in removed:
            p.unlink(missing_ok=True)
        return removed
