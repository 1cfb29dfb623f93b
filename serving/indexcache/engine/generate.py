"""Reference generation loops: a naive generate (recompute everything each step: obviously right) and the
cached, batched generate (preallocated KV cache, chunked prefill, one-token decode steps). The engine
is tested against both for equal tokens."""

from __future__ import annotations

import torch

from ..model.dsa import DSAForCausalLM, KVCache
from .sampling import SamplingParams, make_generator, sample_token


@torch.no_grad()
def naive_generate(model: DSAForCausalLM, prompt: list[int], params: SamplingParams, pattern: str | None = None) -> list[int]:
    """Reference: re-run the whole sequence for every new token, no cache."""
    device = model.lm_head.weight.device
    generator = make_generator(params.seed)
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        logits = model(torch.tensor([tokens], device=device), pattern=pattern)[0, -1]
        token = sample_token(logits, params.temperature, params.top_p, generator)
        out.append(token)
        tokens.append(token)
        if token in params.stop_token_ids:
            break
    return out


@torch.no_grad()
def prefill(model: DSAForCausalLM, cache: KVCache, slots: torch.Tensor, prompts: list[list[int]],
            pattern: str, chunk_size: int | None = None) -> torch.Tensor:
    """Write the prompts' KV (right-padded batch) into `slots`; return last-token logits (B, V).

    Chunks of `chunk_size` tokens give the same result as one chunk: each chunk's queries attend to
    (and its indexer scores) every cached key before them.
    """
    device = model.lm_head.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lengths.max())
    if width > cache.max_len:
        raise ValueError(f"prompt of {width} tokens exceeds the cache length {cache.max_len}")
    pad = 0
    tokens = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)  # (B, W)
    chunk_size = chunk_size or width
    last_logits = torch.zeros(len(prompts), model.args.vocab_size, device=device)
    for start in range(0, width, chunk_size):
        chunk = tokens[:, start:start + chunk_size]                                          # (B, C)
        last = (lengths - 1 - start).clamp(0, chunk.shape[1] - 1)                           # (B,)
        logits = model(chunk, start_pos=start, cache=cache, slots=slots, pattern=pattern, logits_at=last)
        ends_here = (lengths - 1 >= start) & (lengths - 1 < start + chunk.shape[1])
        last_logits[ends_here] = logits[ends_here]
    return last_logits


@torch.no_grad()
def decode_step(model: DSAForCausalLM, cache: KVCache, slots: torch.Tensor, tokens: torch.Tensor,
                positions: torch.Tensor, pattern: str) -> torch.Tensor:
    """One new token per sequence: tokens (B,) at positions (B,) -> next-token logits (B, V)."""
    return model(tokens[:, None], start_pos=positions, cache=cache, slots=slots, pattern=pattern,
                 logits_at=torch.zeros_like(positions))


@torch.no_grad()
def generate(model: DSAForCausalLM, prompts: list[list[int]], params: SamplingParams, pattern: str | None = None,
             chunk_size: int | None = None) -> list[list[int]]:
    """Cached batched generation: sequences of different lengths advance together, each at its own position."""
    pattern = model.check_pattern(pattern or model.default_pattern)
    device = model.lm_head.weight.device
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    cache = KVCache(model.args, len(prompts), max_len, pattern, dtype=model.lm_head.weight.dtype, device=device)
    slots = torch.arange(len(prompts), device=device)
    # sequence i samples from seed + i (a single prompt: exactly `seed`, as naive_generate)
    generators = [make_generator(None if params.seed is None else params.seed + i) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    if params.max_new_tokens == 0:
        return outputs
    logits = prefill(model, cache, slots, prompts, pattern, chunk_size)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    active = list(range(len(prompts)))
    while active:
        next_tokens = []
        for row, seq in enumerate(active):
            token = sample_token(logits[row], params.temperature, params.top_p, generators[seq])
            outputs[seq].append(token)
            next_tokens.append(token)
        still = [row for row, seq in enumerate(active)
                 if len(outputs[seq]) < params.max_new_tokens and outputs[seq][-1] not in params.stop_token_ids]
        if not still:
            break
        rows = torch.tensor(still, device=device)
        active = [active[r] for r in still]
        tokens = torch.tensor(next_tokens, device=device)[rows]
        logits = decode_step(model, cache, slots[active], tokens, positions[active], pattern)
        positions[active] += 1
    return outputs
