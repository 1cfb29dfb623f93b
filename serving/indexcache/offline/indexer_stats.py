"""How well a lightning indexer matches the attention it stands in for, in one place for the offline tools
(indexer training, evaluation, calibration, distillation, the bench probes):

  - the teacher pass: each layer's indexer input and dense head-summed attention (`layer_inputs_and_attention`);
  - one layer's index scores on given hidden states, with autograd (`layer_index_scores`);
  - KL(attention || softmax(index scores)) over one or several layers' attention (`multi_layer_kl`);
  - top-k agreement: recall of the dense top-k, overlap between layers (`topk_recall`, `overlap_matrix`,
    `index_overlap_counts`).

Shapes: B sequences, T queries, S keys; attention rows are L1-normalised over the visible keys (0 on the
others), index scores are -inf on keys a query cannot see.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..model.dsa import Capture, DSAForCausalLM, ForwardContext


# ---------------------------------------------------------------------------------------------------
# teacher pass and one layer's index scores
# ---------------------------------------------------------------------------------------------------
def layer_inputs_and_attention(model: DSAForCausalLM, tokens: torch.Tensor, layers=None):
    """Run the frozen LM densely; yield (layer, indexer input x (B, T, dim), head-summed attention (B, T, T),
    ctx) layer by layer, so a caller can train layer l before layer l+1 runs."""
    n = model.args.n_layers
    wanted = set(range(n)) if layers is None else set(layers)
    capture = Capture(attention=True, index_scores=False, layers=wanted)
    pattern = "F" * n
    with torch.no_grad():
        ctx, pattern = model.context(tokens, pattern=pattern, attention="dense", capture=capture)
        x = model.model.embed_tokens(tokens)
    for layer in range(max(wanted) + 1):
        block = model.model.layers[layer]
        with torch.no_grad():
            normed = block.input_layernorm(x)                                  # what the indexer reads
            x, _ = model.run_layers(x, ctx, pattern, start=layer, stop=layer + 1)
        if layer in wanted:
            yield layer, normed, capture.attn.pop(layer), ctx


def layer_index_scores(model: DSAForCausalLM, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Layer `layer`'s indexer scores (B, T, S) on x (B, T, dim), the normalised hidden state entering its
    attention, with autograd through the indexer."""
    attn = model.model.layers[layer].self_attn
    if attn.indexer is None:
        raise ValueError(f"layer {layer} is F in the pattern but has no indexer weights; mark it S")
    q_src = x if model.args.attention == "gqa" else attn.q_a_layernorm(attn.q_a_proj(x))   # MLA: the query latent
    q, k, weights = attn.indexer(x, q_src, ctx)
    return kernels.indexer_scores(q, k, weights, ctx.start_pos, ctx.kv_len)


# ---------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------
def multi_layer_kl(index_scores: torch.Tensor, attention: list[torch.Tensor],
                   rows: torch.Tensor | None = None, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over query rows of (1/m) sum_j KL(p_j || softmax(index_scores)).

    index_scores: (B, T, S) fp32, -inf at keys the query cannot see; attention: m tensors (B, T, S), each
    row a distribution over the visible keys; rows: (B, T) bool, the query rows that count (not padding);
    row_weights: (B, T) >= 0, a weighted mean sum_t w_t KL_t / sum_t w_t instead of the plain one.
    """
    visible = torch.isfinite(index_scores)
    log_q = torch.log_softmax(index_scores, dim=-1).masked_fill(~visible, 0.0)  # p is 0 there: no -inf * 0
    kl = 0.0
    for p in attention:
        p = p.float()
        log_p = torch.where(p > 0, p, torch.ones_like(p)).log()
        kl = kl + (p * (log_p - log_q)).sum(-1)                                    # (B, T)
    kl = kl / len(attention)                                                       # (B, T)
    if row_weights is not None:
        w = row_weights.to(kl.dtype) * (rows if rows is not None else 1)
        return (kl * w).sum() / w.sum()
    if rows is not None:
        return kl[rows].mean()
    return kl.mean()


def indexer_kl(attn: torch.Tensor, scores: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over queries of KL(attn || softmax(scores)): one layer's attention (B, T, S), its scores (B, T, S);
    row_weights (B, T): a weighted mean over the query rows instead."""
    return multi_layer_kl(scores, [attn], row_weights=row_weights)


# ---------------------------------------------------------------------------------------------------
# top-k agreement
# ---------------------------------------------------------------------------------------------------
def topk_members(values: torch.Tensor, k: int) -> torch.Tensor:
    """(..., S) bool: each row's k largest entries."""
    v = values.float()
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, v.topk(k, dim=-1).indices, True)


def set_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over rows of |a & b| / k, for two (..., S) top-k memberships."""
    return ((a & b).sum(-1).float() / k).mean().item()


def topk_sets(values: torch.Tensor, k: int, first_query: int) -> torch.Tensor:
    """(T', S) bool membership of each query's top-k keys, for queries first_query.. of batch row 0."""
    return topk_members(values[0, first_query:], k)


def topk_recall(attn: torch.Tensor, scores: torch.Tensor, k: int, first_query: int = 0) -> float:
    """Fraction of the dense top-k keys (by head-summed attention) that the indexer's top-k also picks,
    over queries first_query.. that see more than k keys (earlier ones trivially keep everything)."""
    start = max(first_query, k)
    if start >= attn.shape[1]:
        return float("nan")
    return set_overlap(topk_members(attn[:, start:], k), topk_members(scores[:, start:], k), k)


def overlap_matrix(sets: list[torch.Tensor], k: int) -> list[list[float]]:
    """Pairwise set_overlap of per-layer top-k memberships (1 on the diagonal)."""
    n = len(sets)
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            m[i][j] = m[j][i] = set_overlap(sets[i], sets[j], k)
    return m


def index_overlap_counts(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, n_keys: int) -> tuple[int, int]:
    """Shared entries of two top-k index sets over the valid query rows: (hits, total).
    a, b: (B, T, K) key indices, -1 padded; valid (B, T). Counts, so callers can pool batches."""
    a, b = a[valid].long(), b[valid].long()                                         # (n, K)
    hits = 0
    for r0 in range(0, a.shape[0], 1024):
        ar, br = a[r0:r0 + 1024], b[r0:r0 + 1024]
        member = torch.zeros(ar.shape[0], n_keys + 1, dtype=torch.bool, device=a.device)
        member.scatter_(1, ar.clamp(min=-1) % (n_keys + 1), True)  # -1 pads land in the spare column
        member[:, n_keys] = False
        hits += int(member.gather(1, br % (n_keys + 1)).sum())
    return hits, a.shape[0] * a.shape[1]
