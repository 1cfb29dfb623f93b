"""Training-free IndexCache calibration: greedy choice of the layers that keep their indexer (F).

The search (IndexCache paper; docs/calibration.md):

    objective(pattern) = mean LM loss (nats/token) of the calibration samples under the sparse DSA
                         forward with that pattern
    start all-F (every layer that has indexer weights); at each step try flipping every remaining F
    layer except layer 0 to S, keep the flip with the lowest objective; stop at the target F count.

Activation reuse: flipping layer l from F to S leaves layers < l unchanged, so the search keeps, per
batch, the hidden state entering every layer and the top-k indices entering it (those of the last F
layer before it) for the current pattern, and evaluates the candidate "flip l" by restarting at layer
l (`model.run_layers(x_l, ctx, candidate, start=l, indices=idx_l)`). `plain_greedy_search` is the
reference without reuse: one whole forward per candidate. Both choose the same pattern (tested).

Cost is counted in passes: one pass = one layer's forward over the whole calibration set. The plain
search spends N passes per candidate; the reuse search N - l for candidate l, plus N - l* to refresh
the cache after choosing l*. The LM head runs once per candidate in both and is not counted.

Long runs: a tqdm bar (step, best loss, ETA), an atomic checkpoint after every step, resume from it
(same final pattern), and determinism for a seed (the seed picks the sample subset; ties between
candidates go to the lowest layer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import __version__
from ..model.dsa import Capture, DSAForCausalLM
from ..model.pattern import full_layers, source_layers, uniform_pattern, validate_pattern
from .indexer_stats import index_overlap_counts

CHECKPOINT_KIND = "indexcache-calibration-checkpoint"
LOGITS_CHUNK = 1024  # tokens per LM-head chunk: (chunk, vocab) fp32 logits stay small at 4K+ contexts


# ---------------------------------------------------------------------------------------------------
# the calibration set: samples as right-padded batches
# ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    tokens: torch.Tensor   # (B, T) int64, right-padded with 0
    lengths: torch.Tensor  # (B,) true lengths; positions >= length are padding
    # Right padding is harmless: attention and the indexer are causal, so a real token never sees a pad.

    def target_mask(self) -> torch.Tensor:
        """(B, T-1) bool: position t predicts token t+1 and both are real tokens."""
        t = torch.arange(self.tokens.shape[1] - 1, device=self.tokens.device)
        return t[None, :] < (self.lengths[:, None] - 1)


@dataclass
class CalibrationSet:
    batches: list[Batch]
    num_samples: int
    num_tokens: int          # tokens in all samples
    num_targets: int         # predicted tokens (each sample's length - 1): the loss denominator
    samples_id: str          # hash of the token ids, so a checkpoint cannot resume on other samples

    @classmethod
    def from_token_lists(cls, samples: Sequence[Sequence[int]], *, batch_tokens: int = 8192,
                         device: str | torch.device = "cpu") -> "CalibrationSet":
        """Group samples (token-id lists) into batches of at most batch_tokens (B x T_max) tokens."""
        samples = [list(map(int, s)) for s in samples]
        short = [i for i, s in enumerate(samples) if len(s) < 2]
        if short:
            raise ValueError(f"samples {short[:5]} have fewer than 2 tokens: there is nothing to predict; "
                             "drop them before calibrating")
        if not samples:
            raise ValueError("no calibration samples: give at least one sample of 2 or more tokens")
        if batch_tokens < 1:
            raise ValueError(f"--batch-tokens must be >= 1, got {batch_tokens}")
        digest = hashlib.sha256()
        for s in samples:
            digest.update(json.dumps(s).encode())
        # Longest first so each batch pads little; the sort is stable, so the grouping is deterministic.
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
        batches, group = [], []
        for i in order:
            t_max = len(samples[group[0]]) if group else len(samples[i])
            if group and (len(group) + 1) * t_max > batch_tokens:
                batches.append(cls._pad(samples, group, device))
                group = []
            group.append(i)
        batches.append(cls._pad(samples, group, device))
        return cls(batches=batches, num_samples=len(samples), num_tokens=sum(map(len, samples)),
                   num_targets=sum(len(s) - 1 for s in samples), samples_id="sha256:" + digest.hexdigest()[:16])

    @staticmethod
    def _pad(samples, group, device) -> Batch:
        t_max = max(len(samples[i]) for i in group)
        tokens = torch.zeros(len(group), t_max, dtype=torch.long)
        for row, i in enumerate(group):
            tokens[row, : len(samples[i])] = torch.tensor(samples[i])
        lengths = torch.tensor([len(samples[i]) for i in group])
        return Batch(tokens.to(device), lengths.to(device))


@dataclass
class LoadedSamples:
    token_lists: list[list[int]]
    skipped: int
    summary: str  # "N samples read; skipped M lines (...)", for the log


def load_samples(paths: Sequence[str | Path], *, tokenizer=None, tokenizer_name: str | None, max_tokens: int,
                 vocab_size: int, on_error: str = "skip") -> LoadedSamples:
    """Token ids of every usable sample in the JSONL files / shard directories `paths`.

    Bad lines (malformed JSON, empty, over the context, wrong tokenizer, text without a tokenizer,
    ids outside the vocabulary, fewer than 2 tokens) are skipped and counted (on_error="skip") or stop the
    run naming file and line (on_error="stop"). No usable sample at all is an error, never an all-F result.
    """
    from ..serving.samples import SampleError, read_samples

    token_lists, errors, read = [], [], 0
    for path in paths:
        result = read_samples(path, tokenizer=tokenizer, tokenizer_name=tokenizer_name, max_tokens=max_tokens,
                              on_error=on_error)
        errors += result.errors
        for rs in result.samples:
            read += 1
            ids = rs.token_ids if rs.token_ids is not None else \
                (list(rs.sample.token_ids) if rs.sample.token_ids is not None else None)
            problem = None
            if ids is None:
                problem = SampleError(rs.path, rs.line, "invalid", f"a {rs.sample.kind} sample needs the model's "
                                      "tokenizer (tokenizer.json in the checkpoint directory); store token_ids "
                                      "or calibrate a checkpoint that has a tokenizer")
            elif any(t >= vocab_size for t in ids):
                problem = SampleError(rs.path, rs.line, "invalid", f"token id {max(ids)} is outside the model's "
                                      f"vocabulary (size {vocab_size}): the ids come from another tokenizer")
            elif len(ids) < 2:
                problem = SampleError(rs.path, rs.line, "empty", "fewer than 2 tokens: nothing to predict")
            if problem is not None:
                if on_error == "stop":
                    raise problem
                errors.append(problem)
                continue
            token_lists.append(ids)
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    summary = f"{len(token_lists)} usable samples" + (f"; skipped {len(errors)} lines ({detail})" if errors else "")
    if not token_lists:
        first = "; ".join(str(e) for e in errors[:3])
        where = ", ".join(map(str, paths))
        raise ValueError(f"no usable calibration samples in {where}: {summary}"
                         + (f". First problems: {first}" if first else ": the files hold no samples")
                         + ". Calibrating on nothing would silently keep every layer F; give samples of this model")
    return LoadedSamples(token_lists, len(errors), summary)


def select_samples(samples: list[list[int]], max_samples: int | None, seed: int) -> list[list[int]]:
    """A seeded random subset of at most max_samples (all of them, in file order, when None)."""
    if max_samples is None or max_samples >= len(samples):
        return samples
    if max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    keep = sorted(random.Random(seed).sample(range(len(samples)), max_samples))
    return [samples[i] for i in keep]


# ---------------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------------
def nll_sum(model: DSAForCausalLM, hidden: torch.Tensor, batch: Batch) -> float:
    """Summed next-token NLL (nats) of a batch from the last layer's hidden states (B, T, dim)."""
    targets = batch.tokens[:, 1:]
    mask = batch.target_mask()
    total = 0.0
    for t0 in range(0, targets.shape[1], LOGITS_CHUNK):
        t1 = min(t0 + LOGITS_CHUNK, targets.shape[1])
        logits = model.logits(hidden[:, t0:t1])                                    # (B, chunk, V) fp32
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, t0:t1].flatten(), reduction="none")
        total += float(nll.view(targets.shape[0], -1)[mask[:, t0:t1]].double().sum())
    return total


@torch.no_grad()
def pattern_loss(model: DSAForCausalLM, calib: CalibrationSet, pattern: str) -> float:
    """Mean LM loss (nats/token) of the calibration set under `pattern`: one plain sparse forward."""
    total = 0.0
    for batch in calib.batches:
        ctx, pattern = model.context(batch.tokens, pattern=pattern)
        x, _ = model.run_layers(model.model.embed_tokens(batch.tokens), ctx, pattern)
        total += nll_sum(model, x, batch)
    return total / calib.num_targets


def all_full_pattern(model: DSAForCausalLM) -> str:
    """Every layer with indexer weights F (a checkpoint may lack some: those stay S)."""
    pattern = "".join("F" if l in model.indexer_layers else "S" for l in range(model.args.n_layers))
    validate_pattern(pattern, model.args.n_layers)
    return pattern


def target_full_layers(num_layers: int, target_full: float) -> int:
    """The F count for a target fraction: round(fraction * N), at least 1 (layer 0)."""
    if not (isinstance(target_full, (int, float)) and 0 < target_full <= 1):
        raise ValueError(f"--target-full must be a fraction in (0, 1] of the layers to keep F "
                         f"(0.25 keeps 1/4), got {target_full!r}")
    return max(1, math.floor(target_full * num_layers + 0.5))


def flip(pattern: str, layer: int) -> str:
    return pattern[:layer] + "S" + pattern[layer + 1:]


# ---------------------------------------------------------------------------------------------------
# search state, checkpoint, progress
# ---------------------------------------------------------------------------------------------------
@dataclass
class SearchState:
    """Everything needed to continue a search; written after every step."""
    fingerprint: dict
    pattern: str
    loss_all_full: float
    steps: list[dict] = field(default_factory=list)  # {"flipped": l, "loss": best, "candidates": {l: loss}}
    passes: int = 0
    elapsed_s: float = 0.0

    @property
    def step_losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def to_json(self) -> dict:
        return {"kind": CHECKPOINT_KIND, "version": __version__, "fingerprint": self.fingerprint,
                "pattern": self.pattern, "loss_all_full": self.loss_all_full, "steps": self.steps,
                "passes": self.passes, "elapsed_s": self.elapsed_s}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write to a temporary file in the same directory, fsync, rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint_state(path: str | Path, fingerprint: dict) -> SearchState | None:
    """The saved state if `path` holds a checkpoint of this same search; None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"calibration checkpoint {path} is not valid JSON ({exc}); delete it or pass --fresh")
    if data.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a calibration checkpoint; choose another --checkpoint path")
    if data.get("fingerprint") != fingerprint:
        theirs = data.get("fingerprint") or {}
        diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        raise ValueError(f"calibration checkpoint {path} belongs to a different search (differs in {diff}); "
                         "delete it, pass --fresh to start over, or point --checkpoint elsewhere")
    return SearchState(fingerprint=data["fingerprint"], pattern=data["pattern"],
                       loss_all_full=data["loss_all_full"], steps=data["steps"], passes=data["passes"],
                       elapsed_s=data["elapsed_s"])


class Progress:
    """tqdm over candidate evaluations (their number is known up front, so the ETA is meaningful)."""

    def __init__(self, total: int, done: int, steps_total: int, enabled: bool):
        self.bar = None
        self.steps_total = steps_total
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc="calibrate", unit="cand", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, step: int, best: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {step}/{self.steps_total}, best loss "
                                     + ("-" if best is None else f"{best:.4f}"), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def candidates_total(start_full: int, target: int) -> int:
    """Candidate evaluations of a search from start_full to target F layers (layer 0 never a candidate)."""
    return sum(f - 1 for f in range(target + 1, start_full + 1))


# ---------------------------------------------------------------------------------------------------
# the search with activation reuse
# ---------------------------------------------------------------------------------------------------
class ActivationCache:
    """Per batch, the hidden state and top-k indices entering every layer under the current pattern.

    Memory: n_layers x tokens x dim floats (the indices of S layers are the same tensor as their
    source's, so they cost nothing extra).
    """

    def __init__(self, model: DSAForCausalLM, calib: CalibrationSet):
        self.model, self.calib = model, calib
        self.ctx = [model.context(b.tokens, pattern=all_full_pattern(model))[0] for b in calib.batches]
        self.hidden: list[list[torch.Tensor | None]] = []
        self.loss = float("nan")
        self.indices: list[list[torch.Tensor | None]] = []

    @torch.no_grad()
    def rebuild(self, pattern: str, start: int = 0) -> int:
        """Recompute layers start..N-1 under `pattern`, storing their inputs. Returns passes spent and
        leaves the objective of `pattern` in self.loss (the LM head runs on the last layer's output)."""
        n = self.model.args.n_layers
        total = 0.0
        for b, batch in enumerate(self.calib.batches):
            if start == 0:
                if len(self.hidden) <= b:
                    self.hidden.append([None] * n)
                    self.indices.append([None] * n)
                x, idx = self.model.model.embed_tokens(batch.tokens), None
            else:
                x, idx = self.hidden[b][start], self.indices[b][start]
            for layer in range(start, n):
                self.hidden[b][layer], self.indices[b][layer] = x, idx
                x, idx = self.model.run_layers(x, self.ctx[b], pattern, layer, layer + 1, idx)
            total += nll_sum(self.model, x, batch)
        self.loss = total / self.calib.num_targets
        return n - start

    @torch.no_grad()
    def loss_from(self, pattern: str, start: int) -> float:
        """Objective of `pattern`, which agrees with the cached one before layer `start`."""
        total = 0.0
        for b, batch in enumerate(self.calib.batches):
            x, _ = self.model.run_layers(self.hidden[b][start], self.ctx[b], pattern, start, None,
                                         self.indices[b][start])
            total += nll_sum(self.model, x, batch)
        return total / self.calib.num_targets


@dataclass
class SearchResult:
    pattern: str
    loss_all_full: float
    step_losses: list[float]
    flip_order: list[int]
    candidate_losses: list[dict[int, float]]
    passes: int
    plain_passes: int  # what the plain search spends on the same steps (N per candidate, N for all-F)
    resumed_at_step: int = 0

    @property
    def loss(self) -> float:
        return self.step_losses[-1] if self.step_losses else self.loss_all_full


def plain_passes_for(num_layers: int, start_full: int, target: int) -> int:
    return num_layers * (1 + candidates_total(start_full, target))


def greedy_search(model: DSAForCausalLM, calib: CalibrationSet, target: int, *,
                  checkpoint: str | Path | None = None, fingerprint: dict | None = None, fresh: bool = False,
                  progress: bool = False, on_step: Callable[[SearchState], None] | None = None) -> SearchResult:
    """The greedy search with activation reuse, checkpointed after every step when `checkpoint` is set.

    target: the F count to stop at. fingerprint: what identifies this search (model, samples, target,
    ...); a checkpoint with another fingerprint is refused rather than silently resumed.
    """
    n = model.args.n_layers
    start_pattern = all_full_pattern(model)
    start_full = start_pattern.count("F")
    if not 1 <= target <= start_full:
        raise ValueError(f"target F count {target} must be in 1..{start_full} (the layers with indexer weights)")
    fingerprint = dict(fingerprint or {}, target_full_layers=target, start_pattern=start_pattern)
    t0 = time.monotonic()
    state = None if (checkpoint is None or fresh) else load_checkpoint_state(checkpoint, fingerprint)
    resumed_at = len(state.steps) if state else 0
    cache = ActivationCache(model, calib)
    if state is None:
        passes = cache.rebuild(start_pattern)
        state = SearchState(fingerprint=fingerprint, pattern=start_pattern, loss_all_full=cache.loss,
                            passes=passes)
        if checkpoint is not None:
            write_json_atomic(checkpoint, state.to_json())
    else:
        state.passes += cache.rebuild(state.pattern)  # resuming costs one full rebuild, counted honestly
    steps_total = start_full - target
    bar = Progress(candidates_total(start_full, target), candidates_total(start_full, state.pattern.count("F")),
                   steps_total, progress)
    elapsed_before = state.elapsed_s
    try:
        while state.pattern.count("F") > target:
            step = len(state.steps) + 1
            losses: dict[int, float] = {}
            for layer in full_layers(state.pattern)[1:]:  # layer 0 stays F
                losses[layer] = cache.loss_from(flip(state.pattern, layer), layer)
                state.passes += n - layer
                bar.update(step, min(losses.values()))
            best = min(losses, key=lambda l: (losses[l], l))  # ties: the lowest layer, deterministically
            state.pattern = flip(state.pattern, best)
            state.passes += cache.rebuild(state.pattern, best)
            state.steps.append({"flipped": best, "loss": losses[best],
                                "candidates": {str(l): v for l, v in losses.items()}})
            state.elapsed_s = elapsed_before + time.monotonic() - t0
            if checkpoint is not None:
                write_json_atomic(checkpoint, state.to_json())
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
    return SearchResult(pattern=state.pattern, loss_all_full=state.loss_all_full,
                        step_losses=state.step_losses, flip_order=[s["flipped"] for s in state.steps],
                        candidate_losses=[{int(l): v for l, v in s["candidates"].items()} for s in state.steps],
                        passes=state.passes, plain_passes=plain_passes_for(n, start_full, target),
                        resumed_at_step=resumed_at)


def plain_greedy_search(model: DSAForCausalLM, calib: CalibrationSet, target: int, *,
                        on_step: Callable[[str, int], None] | None = None) -> SearchResult:
    """The reference: the same search with one whole forward per candidate, no reuse, no checkpoint.
    on_step(pattern, passes) runs after every step (benchmarks time the steps with it)."""
    n = model.args.n_layers
    pattern = all_full_pattern(model)
    start_full = pattern.count("F")
    if not 1 <= target <= start_full:
        raise ValueError(f"target F count {target} must be in 1..{start_full} (the layers with indexer weights)")
    loss_all_full, passes = pattern_loss(model, calib, pattern), n
    step_losses, order, candidate_losses = [], [], []
    while pattern.count("F") > target:
        losses = {}
        for layer in full_layers(pattern)[1:]:
            losses[layer] = pattern_loss(model, calib, flip(pattern, layer))
            passes += n
        best = min(losses, key=lambda l: (losses[l], l))
        pattern = flip(pattern, best)
        step_losses.append(losses[best])
        order.append(best)
        candidate_losses.append(losses)
        if on_step is not None:
            on_step(pattern, passes)
    return SearchResult(pattern=pattern, loss_all_full=loss_all_full, step_losses=step_losses, flip_order=order,
                        candidate_losses=candidate_losses, passes=passes,
                        plain_passes=plain_passes_for(n, start_full, target))


# ---------------------------------------------------------------------------------------------------
# overlap statistics
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def overlap_statistics(model: DSAForCausalLM, calib: CalibrationSet, pattern: str) -> dict:
    """How much each S layer's own top-k (all-F forward) agrees with the indices it reuses under
    `pattern`, and how much adjacent layers agree. Only queries with more than top-k earlier tokens
    count: shorter ones select every key, which would overlap trivially."""
    n, topk = model.args.n_layers, model.args.index_topk
    sources = source_layers(pattern)
    allf = all_full_pattern(model)
    hits = {l: [0, 0] for l in range(1, n)}      # layer -> [hits, total] against its source
    adjacent = {l: [0, 0] for l in range(1, n)}  # layer -> [hits, total] against layer l-1
    for batch in calib.batches:
        capture = Capture(attention=False, index_scores=False)
        model(batch.tokens, pattern=allf, capture=capture)
        positions = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)
        valid = (positions[None, :] >= topk) & (positions[None, :] < batch.lengths[:, None])
        for l in range(1, n):
            if l not in capture.indices or l - 1 not in capture.indices:
                continue  # a layer without indexer weights has no own selection to compare
            if pattern[l] == "S":
                h, t = index_overlap_counts(capture.indices[l], capture.indices[sources[l]], valid, batch.tokens.shape[1])
                hits[l][0] += h
                hits[l][1] += t
            h, t = index_overlap_counts(capture.indices[l], capture.indices[l - 1], valid, batch.tokens.shape[1])
            adjacent[l][0] += h
            adjacent[l][1] += t
    per_layer = [{"layer": l, "source": sources[l], "overlap": round(h / t, 4)}
                 for l, (h, t) in hits.items() if t]
    adj = [h / t for h, t in adjacent.values() if t]
    if not adj:
        return {"measured_on": "all-F forward", "note": f"no sample is longer than index_topk ({topk}) tokens; "
                "overlap is undefined"}
    shared = [p["overlap"] for p in per_layer]
    return {"measured_on": "all-F forward", "topk": topk,
            "shared_mean": round(sum(shared) / len(shared), 4) if shared else None,
            "shared_min": min(shared) if shared else None,
            "adjacent_mean": round(sum(adj) / len(adj), 4),
            "per_layer": per_layer}


# ---------------------------------------------------------------------------------------------------
# identity, the whole job, the summary
# ---------------------------------------------------------------------------------------------------
def checkpoint_identity(path: str | Path) -> str:
    """sha256 over config.json and every weight file of a checkpoint directory (streamed)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / "config.json"] + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def model_identity(model: DSAForCausalLM) -> str:
    """sha256 over the config and the weights of an in-memory model."""
    digest = hashlib.sha256(json.dumps(model.args.to_hf_config(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def calibrate(model: DSAForCausalLM, calib: CalibrationSet, target_full: float, *, model_id: str,
              seed: int = 0, checkpoint: str | Path | None = None, fresh: bool = False, progress: bool = False,
              skipped_samples: int = 0, on_step=None, reuse: bool = True) -> dict:
    """Run the search and measure the result: the JSON of docs/contracts.md ("Calibration result").

    reuse=False runs the plain reference search (no activation reuse, no checkpoint) for comparison."""
    t0 = time.monotonic()
    torch.manual_seed(seed)
    n = model.args.n_layers
    target = target_full_layers(n, target_full)
    fingerprint = {"model_id": model_id, "samples_id": calib.samples_id, "seed": seed, "version": __version__}
    if reuse:
        search = greedy_search(model, calib, target, checkpoint=checkpoint, fingerprint=fingerprint, fresh=fresh,
                               progress=progress, on_step=on_step)
    else:
        search = plain_greedy_search(model, calib, target)
    uniform = uniform_pattern(n, search.pattern.count("F"))
    uniform_ok = all(l in model.indexer_layers for l in full_layers(uniform))
    uniform_loss = pattern_loss(model, calib, uniform) if uniform_ok else None
    return {
        "pattern": search.pattern,
        "full_layers": search.pattern.count("F"),
        "num_layers": n,
        "target_full": float(target_full),
        "loss_all_full": search.loss_all_full,
        "loss": search.loss,
        "loss_delta": search.loss - search.loss_all_full,
        "step_losses": search.step_losses,
        "flip_order": search.flip_order,
        "uniform_pattern": uniform,
        "uniform_loss": uniform_loss,
        "uniform_loss_delta": None if uniform_loss is None else uniform_loss - search.loss_all_full,
        "overlap": overlap_statistics(model, calib, search.pattern),
        "num_samples": calib.num_samples,
        "num_tokens": calib.num_tokens,
        "skipped_samples": skipped_samples,
        "model_id": model_id,
        "seed": seed,
        "duration_s": round(time.monotonic() - t0, 3),
        "passes": search.passes,
        "passes_saved": search.plain_passes - search.passes,
        "activation_reuse": reuse,
        "resumed_at_step": search.resumed_at_step,
        "version": __version__,
    }


def format_summary(result: dict) -> str:
    """The table printed at the end of `indexcache calibrate`."""
    def ppl(loss):
        return "-" if loss is None else f"{math.exp(min(loss, 50)):.3f}"

    def delta(d):
        return "-" if d is None else f"{d:+.4f}"

    rows = [("all-F", f"{result['num_layers']}/{result['num_layers']}", result["loss_all_full"], 0.0),
            ("greedy", f"{result['full_layers']}/{result['num_layers']}", result["loss"], result["loss_delta"]),
            ("uniform", f"{result['uniform_pattern'].count('F')}/{result['num_layers']}", result["uniform_loss"],
             result["uniform_loss_delta"])]
    lines = [f"{'pattern':<8} {'F layers':>9} {'loss':>9} {'delta':>9} {'ppl':>9}"]
    for name, count, loss, d in rows:
        lines.append(f"{name:<8} {count:>9} {'-' if loss is None else f'{loss:.4f}':>9} {delta(d):>9} {ppl(loss):>9}")
    ov = result["overlap"]
    lines += ["",
              f"greedy pattern  {result['pattern']}",
              f"uniform pattern {result['uniform_pattern']}",
              f"flip order      {result['flip_order']}",
              f"samples {result['num_samples']} ({result['num_tokens']} tokens, {result['skipped_samples']} skipped); "
              f"passes {result['passes']} (saved {result['passes_saved']} by activation reuse); "
              f"{result['duration_s']:.1f} s",
              "overlap (all-F top-k): " + (f"S layers vs their source {ov['shared_mean']}, adjacent layers "
                                          f"{ov['adjacent_mean']}" if "adjacent_mean" in ov else ov.get("note", "-")),
              f"model {result['model_id']}  indexcache {result['version']}"]
    return "\n".join(lines)
