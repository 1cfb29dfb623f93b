"""Sampling: the per-request parameters and how one token is drawn from a row of logits (greedy at
temperature 0, else nucleus sampling from a seeded generator). Shared by the engine and the
reference generate loops, so both draw the same tokens from the same logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None   # None: off; n: the chosen token's logprob and the n most likely (token, logprob)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 64:   # what torch.Generator takes
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits (V,) -> token id. Greedy at temperature 0; otherwise nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p       # the smallest prefix with mass >= top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """logits (V,) -> (log-probability of `token`, the n most likely (token id, logprob), best first).
    From the raw logits (before temperature and top-p), as vLLM reports them by default."""
    logp = torch.log_softmax(logits.float(), dim=-1)                     # (V,)
    top = [] if n == 0 else list(zip(*(t.tolist() for t in logp.topk(min(n, logp.shape[-1])))))
    return float(logp[token]), [(int(i), float(v)) for v, i in top]


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
