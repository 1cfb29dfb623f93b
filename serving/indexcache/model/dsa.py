"""The DSA transformer with IndexCache, readable top to bottom.

One model, two attention families (config.py): MLA (DeepSeek-V3.2, GLM-5) and GQA (Llama-style, the
SmolLM2 DSA model). Every layer has the same sparse step:

    F layer:  q_I, k_I, w = indexer(x)                     # lightning indexer
              score[t, s] = sum_h w[t, h] * relu(q_I[t, h] . k_I[s])   (causal)
              indices = top-k(score)                        # (B, T, topk)
    S layer:  indices = indices of the nearest preceding F layer (IndexCache: no indexer, no indexer K cache)
    both:     out = softmax over the selected keys only (sparse attention)

The ops (indexer top-k, sparse attention) live in `indexcache.kernels`: plain PyTorch references on the
CPU, Triton kernels on CUDA, behind one switch.

Module names follow the Hugging Face checkpoints (`model.layers.{i}.self_attn.indexer.wq_b`, ...), so a
state dict loads without renaming (checkpoint.py handles DeepSeek's own `inference/` names too).

Training and analysis hooks: pass `capture=Capture(...)` to `forward` to receive, per layer, the
head-summed, L1-normalised dense attention (B, T, S) and the indexer's scores (B, T, S) (-inf where
masked), which is what the indexer KL warm-up (DSA training) and the overlap analysis need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import paged
from .config import ModelArgs
from .kv_cache import KVCache  # noqa: F401 (the model's cache; imported from here by callers)
from .pattern import validate_pattern


# ---------------------------------------------------------------------------------------------------
# rotary position embedding
# ---------------------------------------------------------------------------------------------------
def rope_frequencies(dim: int, args: ModelArgs) -> torch.Tensor:
    """Angles (max_seq_len, dim/2) in fp32; yarn-corrected when rope_factor > 1 (DeepSeek-V3.2)."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor > 1 and args.max_seq_len > args.original_seq_len:
        def correction_dim(rotations: float) -> float:
            return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))
        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)


def apply_rope(x: torch.Tensor, angles, interleaved: bool, offset: int = 0, rope_dim: int | None = None) -> torch.Tensor:
    """x: (B, T, H, D); angles: (B, T, rope_dim/2) fp32 radians, or their (cos, sin), which a forward
    computes once and shares with every layer. Rotates dims [offset, offset + rope_dim) (default: all of
    them) as interleaved pairs (DeepSeek) or rotate-half (Llama/HF) and copies the rest; a new tensor in
    x's dtype. The math is `kernels.reference.ref_rope`; on CUDA one fused kernel (kernels/fused.py)."""
    cos, sin = angles if isinstance(angles, tuple) else (angles.cos(), angles.sin())
    return kernels.rope(x, cos, sin, interleaved, offset, rope_dim)


# ---------------------------------------------------------------------------------------------------
# per-forward context: positions, cache slots, pattern, capture
# ---------------------------------------------------------------------------------------------------
@dataclass
class Capture:
    """What to record during a forward (for indexer training and layer-overlap analysis)."""
    attention: bool = True   # head-summed, L1-normalised attention probabilities per layer, (B, T, S)
    index_scores: bool = True  # indexer scores per F layer, (B, T, S), -inf where masked; keeps the graph
    layers: set[int] | None = None  # None = all layers
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclass
class ForwardContext:
    positions: torch.Tensor        # (B, T) absolute positions of the new tokens
    start_pos: torch.Tensor        # (B,) position of the first new token
    kv_len: torch.Tensor           # (B,) keys visible after this forward (start_pos + T)
    angles: dict[int, torch.Tensor]  # rope angles per rotary dim, (B, T, dim/2)
    attention: str                 # "sparse" or "dense"
    cache: "KVCache | None"
    slots: torch.Tensor | None     # (B,) cache rows of the batch
    capture: Capture | None
    kv_bound: int = 0              # host-side bound on kv_len: how many cache rows a read covers
    slot_range: tuple[int, int] | None = None  # slots are first..last contiguous (known on the host)
    in_place: bool = False         # sparse attention reads the cache pool itself (no copy of the prefix)
    # paged cache (model/paged.py): pool row of each visible logical position, and of each new token
    rows: torch.Tensor | None = None        # (B, kv_bound) int64
    new_rows: torch.Tensor | None = None    # (B, T) int64
    mapped: tuple | None = None             # (indices, their pool rows): S layers reuse the F layer's mapping


def write_cache(cache_tensor: torch.Tensor, new: torch.Tensor, ctx: ForwardContext) -> None:
    """Write new (B, T, ...) rows at their positions in the batch's slots (paged: at their pool rows)."""
    if ctx.new_rows is not None:
        return paged.write_rows(cache_tensor, new, ctx.new_rows)
    cache_tensor[ctx.slots[:, None], ctx.positions] = new.to(cache_tensor.dtype)


def read_cache(cache_tensor: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The visible prefix (B, kv_bound, ...) of the batch's slots: a view when the slots are one
    contiguous range (a prefill chunk, a one-request decode), else a gather (paged: through the rows)."""
    if ctx.rows is not None:
        return paged.gather_rows(cache_tensor, ctx.rows)
    if ctx.slot_range is not None:
        first, last = ctx.slot_range
        return cache_tensor[first:last + 1, : ctx.kv_bound]
    return cache_tensor[ctx.slots, : ctx.kv_bound]


def write_and_read(cache_tensor: torch.Tensor | None, new: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Write new (B, T, ...) rows at their positions; return the visible prefix (B, S, ...) of the batch.

    Without a cache (training, scoring a whole sequence) the new rows are all there is.
    """
    if cache_tensor is None:
        return new
    write_cache(cache_tensor, new, ctx)
    return read_cache(cache_tensor, ctx).to(new.dtype)


def pooled(q: torch.Tensor, cache_tensor: torch.Tensor, indices: torch.Tensor, ctx: ForwardContext):
    """Sparse attention straight over the cache, without copying any request's prefix: the whole cache is
    one sequence of n_slots * max_len rows, each request's top-k indices are shifted to its slot's rows
    (-1 stays -1, "no key"), and the B requests' T queries become one batch row of B*T queries.
    q (B, T, H, D), indices (B, T, K) -> q (1, B*T, H, D), pool (1, n_slots * max_len, ...), idx (1, B*T, K)."""
    B, T = q.shape[:2]
    if ctx.rows is not None:   # paged: logical top-k -> pool rows, once per F layer (S layers share it)
        if ctx.mapped is None or ctx.mapped[0] is not indices:
            ctx.mapped = (indices, paged.map_indices(indices, ctx.rows))
        return q.reshape(1, B * T, *q.shape[2:]), cache_tensor.flatten(0, 1)[None], ctx.mapped[1].reshape(1, B * T, -1)
    shift = (ctx.slots.to(torch.int64) * cache_tensor.shape[1])[:, None, None]    # (B, 1, 1) first row of each slot
    idx = torch.where(indices >= 0, indices.to(torch.int64) + shift, -1)
    pool = cache_tensor.flatten(0, 1)[None]
    return q.reshape(1, B * T, *q.shape[2:]), pool, idx.reshape(1, B * T, -1)


def causal_mask(ctx: ForwardContext, n_keys: int, device) -> torch.Tensor:
    """(B, T, S) bool: key s is visible to the query at position p iff s <= p and s < kv_len."""
    s = torch.arange(n_keys, device=device)
    return (s[None, None, :] <= ctx.positions[:, :, None]) & (s[None, None, :] < ctx.kv_len[:, None, None])


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: ForwardContext,
                    layer: int) -> torch.Tensor:
    """Full causal attention. q (B, T, H, Dq), k (B, S, H, Dq), v (B, S, H, Dv) -> (B, T, H, Dv)."""
    mask = causal_mask(ctx, k.shape[1], q.device)  # (B, T, S)
    capture = ctx.capture
    if capture is not None and capture.attention and capture.wants(layer):
        logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale
        probs = logits.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)  # (B, H, T, S)
        capture.attn[layer] = probs.sum(dim=1).detach() / probs.shape[1]  # head-summed, rows sum to 1
        return torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)  # (B, H, T, Dv)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, then the weight (kernels.ref_rms_norm)
        return kernels.rms_norm(x, self.weight, self.eps)


class Indexer(nn.Module):
    """DSA lightning indexer: H small heads of dim D score every earlier token against one shared key.

    q = wq_b(q_src) (q_src: MLA query latent, or the hidden state for GQA), k = LayerNorm(wk(x)),
    RoPE on the first `index_rope_head_dim` dims of both, w = weights_proj(x) * H^-0.5 * D^-0.5.
    (Production runs this in FP8 after a Hadamard rotation; the rotation leaves q.k unchanged.)
    """

    def __init__(self, args: ModelArgs, q_in_dim: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.index_rope_head_dim
        self.interleaved = args.attention == "mla" and args.rope_interleave
        self.wq_b = nn.Linear(q_in_dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.dim, self.n_heads, bias=False)

    def forward(self, x: torch.Tensor, q_src: torch.Tensor, ctx: ForwardContext):
        B, T, _ = x.shape
        q = self.wq_b(q_src).view(B, T, self.n_heads, self.head_dim)         # (B, T, H, D)
        k = self.k_norm(self.wk(x))                                          # (B, T, D)
        angles = ctx.angles[self.rope_dim]                                   # RoPE on the first rope_dim dims
        q = apply_rope(q, angles, self.interleaved, rope_dim=self.rope_dim)
        k = apply_rope(k[:, :, None], angles, self.interleaved, rope_dim=self.rope_dim)[:, :, 0]
        weights = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)  # (B, T, H)
        return q, k, weights


def select_indices(attn: nn.Module, x: torch.Tensor, q_src: torch.Tensor, ctx: ForwardContext, layer: int,
                   shared: torch.Tensor | None, topk: int) -> torch.Tensor:
    """The sparse step's first half: run this layer's indexer (F) or reuse the shared indices (S)."""
    if shared is not None:
        return shared  # S layer: IndexCache reuses the nearest preceding F layer's (B, T, topk) indices
    if attn.indexer is None:
        raise RuntimeError(f"layer {layer} is F in the pattern but the checkpoint has no indexer weights for it")
    q, k, weights = attn.indexer(x, q_src, ctx)
    cache, capture = ctx.cache, ctx.capture
    k_scale = k_slots = k_rows = None
    if cache is None:          # training, scoring a whole sequence: the new keys are all there is
        k_all = k
    else:
        if cache.indexer_fp8:  # e4m3 q and k, their positive scales pulled out of the ReLU
            q, k, weights, k_scale = kernels.quantize_indexer_fp8(q, k, weights)   # k (B, T, D), k_scale (B, T)
            write_cache(cache.indexer_k_scale[layer], k_scale, ctx)
        write_cache(cache.indexer_k[layer], k, ctx)
        k_scale = cache.indexer_k_scale.get(layer)
        if ctx.in_place and ctx.rows is None:   # every slot's first kv_bound keys, a view: each query row reads its own slot
            k_all, k_slots = cache.indexer_k[layer][:, : ctx.kv_bound], ctx.slots
            k_scale = None if k_scale is None else k_scale[:, : ctx.kv_bound]
        elif ctx.in_place:     # paged: the pool's rows (n_rows, D), read through the block tables in place
            k_all, k_rows = cache.indexer_k[layer].flatten(0, 1), ctx.rows
            k_scale = None if k_scale is None else k_scale.flatten(0, 1)
        else:                  # the batch's prefixes, (B, S, D) (paged: gathered through the block tables)
            k_all = read_cache(cache.indexer_k[layer], ctx)
            k_all = k_all if cache.indexer_fp8 else k_all.to(q.dtype)
            k_scale = None if k_scale is None else read_cache(k_scale, ctx)
    if capture is not None and capture.index_scores and capture.wants(layer):
        pick = k_slots if k_slots is not None else k_rows
        gathered = k_all if pick is None else k_all[pick]
        scale = k_scale if pick is None or k_scale is None else k_scale[pick]
        capture.scores[layer] = kernels.indexer_scores(q, gathered, weights, ctx.start_pos, ctx.kv_len, k_scale=scale)
    return kernels.indexer_topk(q, k_all, weights, topk, ctx.start_pos, ctx.kv_len, k_scale=k_scale,
                                k_slots=k_slots, **({} if k_rows is None else {"k_rows": k_rows}))  # (B, T, topk) int32


class GQAttention(nn.Module):
    """Llama-style grouped-query attention with a lightning indexer reading the hidden state."""

    def __init__(self, args: ModelArgs, layer: int, with_indexer: bool):
        super().__init__()
        self.layer, self.args = layer, args
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.indexer = Indexer(args, q_in_dim=args.dim) if with_indexer else None
        self.scale = args.head_dim ** -0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext, shared: torch.Tensor | None):
        B, T, _ = x.shape
        angles = ctx.angles[self.head_dim]
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), angles, False)     # (B, T, Hq, Dh)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), angles, False)  # (B, T, Hkv, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        layer_cache = ctx.cache.layers[self.layer] if ctx.cache is not None else {}
        if ctx.in_place and ctx.attention == "sparse":   # GPU: attend over the cache pool, no prefix copy
            write_cache(layer_cache["k"], k, ctx)
            write_cache(layer_cache["v"], v, ctx)
            indices = select_indices(self, x, x, ctx, self.layer, shared, self.args.index_topk)
            q1, k_pool, idx = pooled(q, layer_cache["k"], indices, ctx)
            out = kernels.sparse_attention_gqa(q1, k_pool, layer_cache["v"].flatten(0, 1)[None], idx, self.scale)
            return self.o_proj(out.view(B, T, -1)), indices
        k_all = write_and_read(layer_cache.get("k"), k, ctx)  # (B, S, Hkv, Dh)
        v_all = write_and_read(layer_cache.get("v"), v, ctx)
        if ctx.attention == "dense":
            groups = self.n_heads // self.n_kv_heads
            out = dense_attention(q, k_all.repeat_interleave(groups, 2), v_all.repeat_interleave(groups, 2),
                                  self.scale, ctx, self.layer)
            return self.o_proj(out.flatten(2)), None
        indices = select_indices(self, x, x, ctx, self.layer, shared, self.args.index_topk)
        out = kernels.sparse_attention_gqa(q, k_all, v_all, indices, self.scale)  # (B, T, Hq, Dh)
        return self.o_proj(out.flatten(2)), indices


def per_head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                    out_slice: slice | None = None) -> torch.Tensor:
    """Per-head products x (B, T, H, a) @ w (H, a, c) -> (B, T, H, c), the einsum "bthd,hdc->bthc".

    Outside autograd one batched GEMM writes straight into (B, T, H, ...) order, into
    out[..., out_slice] when given (no permute copy, no cat: both are strided operands to the GEMM);
    under autograd, the einsum. Returns `out` (or the new product)."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        product = torch.einsum("bthd,hdc->bthc", x, w.to(x.dtype))
        if out is None:
            return product
        return torch.cat([out[..., : out_slice.start], product, out[..., out_slice.stop:]], dim=-1)
    B, T, H, _ = x.shape
    if out is None:
        out, out_slice = x.new_empty(B, T, H, w.shape[-1]), slice(0, w.shape[-1])
    target = out[..., out_slice].flatten(0, 1).transpose(0, 1)                     # (H, B*T, c), strided
    torch.bmm(x.flatten(0, 1).transpose(0, 1), w.to(x.dtype), out=target)
    return out


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V3.2 / GLM-5), computed in the weight-absorbed form.

    The cache holds one latent row per token, [kv_norm(c_kv) (kv_lora_rank) | rope(k_pe) (rope_dim)];
    queries are absorbed into the latent space through kv_b_proj's key half, and the attention output
    leaves it through the value half. The naive per-head form gives the same numbers (tested).
    """

    def __init__(self, args: ModelArgs, layer: int, with_indexer: bool):
        super().__init__()
        self.layer, self.args = layer, args
        self.n_heads = args.n_heads
        self.nope, self.rope, self.v_dim, self.rank = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
        self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)
        self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        self.indexer = Indexer(args, q_in_dim=args.q_lora_rank) if with_indexer else None
        self.scale = (self.nope + self.rope) ** -0.5
        if args.rope_factor > 1 and args.max_seq_len > args.original_seq_len:
            mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.scale *= mscale * mscale

    def forward(self, x: torch.Tensor, ctx: ForwardContext, shared: torch.Tensor | None):
        B, T, _ = x.shape
        interleaved = self.args.rope_interleave
        angles = ctx.angles[self.rope]
        qr = self.q_a_layernorm(self.q_a_proj(x))                                   # (B, T, q_lora_rank)
        q = self.q_b_proj(qr).view(B, T, self.n_heads, self.nope + self.rope)
        q = apply_rope(q, angles, interleaved, offset=self.nope)                   # RoPE on the last rope dims
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)                      # (B, T, H, nope), (.., rope)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], -1)[:, :, None]      # (B, T, 1, rank + rope)
        latent = apply_rope(latent, angles, interleaved, offset=self.rank)[:, :, 0]  # (B, T, rank + rope)
        layer_cache = ctx.cache.layers[self.layer] if ctx.cache is not None else {}
        wkv_b = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        q_abs = q.new_empty(B, T, self.n_heads, self.rank + self.rope)             # (B, T, H, rank + rope)
        q_abs = per_head_matmul(q_nope, wkv_b[:, : self.nope], out=q_abs, out_slice=slice(0, self.rank))
        q_abs[..., self.rank:] = q_pe                                               # [q_nope W_UK | q_pe]
        if ctx.in_place and ctx.attention == "sparse":   # GPU: attend over the cache pool, no prefix copy
            write_cache(layer_cache["kv"], latent, ctx)
            indices = select_indices(self, x, qr, ctx, self.layer, shared, self.args.index_topk)
            q1, pool, idx = pooled(q_abs, layer_cache["kv"], indices, ctx)
            out_latent = kernels.sparse_attention_mla(q1, pool, idx, self.scale, self.rank).view(B, T, self.n_heads, -1)
            out = per_head_matmul(out_latent, wkv_b[:, self.nope:].transpose(1, 2))  # (B, T, H, v_dim)
            return self.o_proj(out.flatten(2)), indices
        kv_all = write_and_read(layer_cache.get("kv"), latent, ctx)                # (B, S, rank + rope)
        if ctx.attention == "dense":
            kv_heads = kv_all[:, :, None].expand(-1, -1, self.n_heads, -1)
            out_latent = dense_attention(q_abs, kv_heads, kv_heads[..., : self.rank], self.scale, ctx, self.layer)
            indices = None
        else:
            indices = select_indices(self, x, qr, ctx, self.layer, shared, self.args.index_topk)
            out_latent = kernels.sparse_attention_mla(q_abs, kv_all, indices, self.scale, self.rank)  # (B, T, H, rank)
        out = per_head_matmul(out_latent, wkv_b[:, self.nope:].transpose(1, 2))  # (B, T, H, v_dim)
        return self.o_proj(out.flatten(2)), indices


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """DeepSeek-V3 router: sigmoid scores, group-limited top-k (groups ranked by their top-2 biased
    scores), weights from the unbiased scores, normalised, times routed_scaling_factor."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts), requires_grad=False)

    def fp32_weight(self) -> torch.Tensor:
        """The router runs in fp32. A bf16 model keeps one fp32 copy (remade if the weight changes) instead
        of converting E x dim values every step; under autograd the conversion itself, differentiable."""
        w = self.weight
        if w.dtype == torch.float32 or (torch.is_grad_enabled() and w.requires_grad):
            return w.float()
        key = (w.data_ptr(), w._version, w.device)
        if getattr(self, "_fp32_key", None) != key:
            self._fp32_copy, self._fp32_key = w.detach().float(), key
        return self._fp32_copy

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        scores = F.linear(x.float(), self.fp32_weight()).sigmoid()                 # (N, E)
        biased = scores + self.e_score_correction_bias.float()
        if a.n_expert_groups > 1:
            grouped = biased.view(x.shape[0], a.n_expert_groups, -1)               # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                  # (N, G)
            keep = group_scores.topk(a.n_limited_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        experts = biased.topk(a.n_activated_experts, dim=-1).indices               # (N, k)
        weights = scores.gather(1, experts)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * a.route_scale, experts


class Experts(nn.Module):
    """The routed experts of one MoE layer, stacked so one kernel serves them all (kernels.moe_routed):
    gate_up_proj (E, 2I, D): expert e's gate_proj rows then its up_proj rows; down_proj (E, D, I).
    Checkpoints keep one matrix per expert (`mlp.experts.{e}.gate_proj.weight`, ...): checkpoint.py stacks
    them on load and splits them on save, so the files keep DeepSeek's and Hugging Face's names."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        nn.init.normal_(self.gate_up_proj, std=dim ** -0.5)
        nn.init.normal_(self.down_proj, std=inter_dim ** -0.5)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (N, dim), router weights (N, k) and expert ids (N, k) -> (N, dim) fp32. (FP8 checkpoints:
        fp8.FP8Experts, the same call on e4m3 experts with their block scales.)"""
        return kernels.moe_routed(x, weights, experts, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = MLP(args.dim, args.moe_inter_dim * args.n_shared_experts) if args.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                # (N, dim)
        weights, experts = self.gate(x)                                             # (N, k) fp32, (N, k) int64
        # sum_j weights[n, j] * expert_{experts[n, j]}(x[n]): sorted grouped GEMM (prefill) or a gather
        # GEMV over the selected experts only (decode); no host sync either way (kernels/moe.py)
        out = self.experts(x, weights, experts).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, with_indexer: bool):
        super().__init__()
        attention = GQAttention if args.attention == "gqa" else MLAttention
        self.self_attn = attention(args, layer, with_indexer)
        self.mlp = MoE(args) if args.is_moe_layer(layer) else MLP(args.dim, args.inter_dim)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, ctx, shared):
        h, indices = self.self_attn(self.input_layernorm(x), ctx, shared)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), indices


class DSAModel(nn.Module):
    def __init__(self, args: ModelArgs, indexer_layers: set[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, i in indexer_layers) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class DSAForCausalLM(nn.Module):
    """The whole model. `indexer_layers`: layers that carry indexer weights (default: all)."""

    def __init__(self, args: ModelArgs, indexer_layers: set[int] | None = None):
        super().__init__()
        self.args = args
        self.indexer_layers = set(range(args.n_layers)) if indexer_layers is None else set(indexer_layers)
        self.model = DSAModel(args, self.indexer_layers)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rope_dims = {args.index_rope_head_dim, args.head_dim if args.attention == "gqa" else args.qk_rope_head_dim}
        self.rope_dims = sorted(rope_dims)
        # Not buffers: `model.to(torch.bfloat16)` would round the angles (up to max_seq_len radians) to
        # 8 mantissa bits and scramble positions past a few hundred tokens. Kept fp32, per device.
        self._rope_angles: dict[tuple[int, str], torch.Tensor] = {}

    def rope_angles(self, dim: int, positions: torch.Tensor) -> torch.Tensor:
        """fp32 RoPE angles (B, T, dim/2) at the given positions."""
        key = (dim, str(positions.device))
        if key not in self._rope_angles:
            self._rope_angles[key] = rope_frequencies(dim, self.args).to(positions.device)
        return self._rope_angles[key][positions]

    def check_pattern(self, pattern: str) -> str:
        validate_pattern(pattern, self.args.n_layers)
        missing = [i for i, kind in enumerate(pattern) if kind == "F" and i not in self.indexer_layers]
        if missing:
            raise ValueError(
                f"pattern {pattern!r} marks layers {missing} F but the checkpoint has no indexer weights for them: "
                f"mark them S (they reuse the previous F layer's indices) or use a checkpoint with those indexers")
        return pattern

    @property
    def default_pattern(self) -> str:
        return self.args.pattern

    def context(self, tokens: torch.Tensor, *, start_pos: torch.Tensor | list[int] | int = 0,
                cache: KVCache | None = None, slots: torch.Tensor | list[int] | None = None,
                pattern: str | None = None, attention: str = "sparse", capture: Capture | None = None,
                kv_bound: int | None = None, block_tables: torch.Tensor | None = None) -> tuple[ForwardContext, str]:
        """Validate the arguments of a forward and build its context. Returns (ctx, pattern).

        start_pos / slots as host lists (what the engine passes) cost no device sync; as tensors, the
        bound on the keys to read is taken from the device once. `kv_bound` (a host int >= every
        start_pos + T) skips that and every other host-side check: what a CUDA-graph capture needs.
        `block_tables` (B, max_blocks) int: a paged cache (model/paged.py) read and written through each
        request's blocks; `slots` is then unused."""
        B, T = tokens.shape
        device = tokens.device
        if attention not in ("sparse", "dense"):
            raise ValueError(f"attention must be 'sparse' or 'dense', got {attention!r}")
        pattern = self.check_pattern(pattern or self.default_pattern)
        host_starts = [start_pos] * B if isinstance(start_pos, int) else (
            list(start_pos) if isinstance(start_pos, (list, tuple)) else None)
        start = torch.as_tensor(start_pos, dtype=torch.long, device=device).expand(B).contiguous()
        positions = start[:, None] + torch.arange(T, device=device)[None, :]      # (B, T)
        if kv_bound is None:
            if cache is None and (any(host_starts) if host_starts is not None else bool((start != 0).any())):
                raise ValueError("start_pos > 0 needs a KV cache holding the earlier tokens")
            kv_bound = (max(host_starts) if host_starts is not None else int(start.max())) + T
            if kv_bound > self.args.max_seq_len:
                raise ValueError(f"sequence of {kv_bound} tokens exceeds max_position_embeddings "
                                 f"({self.args.max_seq_len})")
        slot_range, in_place, rows = None, False, None
        if block_tables is not None:
            if not getattr(cache, "paged", False):
                raise ValueError("block_tables need a paged KV cache (model.paged.PagedKVCache)")
            if block_tables.shape[0] != B:
                raise ValueError(f"block_tables: expected {B} rows (one per request), got {block_tables.shape[0]}")
            if block_tables.shape[1] * cache.block_size < kv_bound:
                raise ValueError(f"block_tables cover {block_tables.shape[1] * cache.block_size} positions, "
                                 f"fewer than the {kv_bound} this forward reads: give each request enough blocks")
            cache.ensure_pattern(pattern)
            rows = paged.logical_rows(block_tables, cache.block_size, kv_bound)     # (B, kv_bound)
            in_place = kernels.backend(device) == "triton"
        elif getattr(cache, "paged", False):
            raise ValueError("a paged KV cache needs block_tables (each request's blocks)")
        elif cache is not None:
            cache.ensure_pattern(pattern)
            if slots is None:
                slot_range = (0, B - 1)
                slots = torch.arange(B, device=device)
            elif isinstance(slots, (list, tuple)):
                if list(slots) == list(range(slots[0], slots[0] + B)):
                    slot_range = (slots[0], slots[0] + B - 1)
                slots = torch.tensor(slots, device=device)
            in_place = kernels.backend(device) == "triton"
        angles = {}
        for d in self.rope_dims:    # cos and sin once per forward, shared by every layer's RoPE
            radians = self.rope_angles(d, positions)                                # (B, T, d/2) fp32
            angles[d] = (radians.cos(), radians.sin())
        ctx = ForwardContext(positions=positions, start_pos=start, kv_len=start + T, angles=angles,
                             attention=attention, cache=cache, slots=slots, capture=capture,
                             kv_bound=kv_bound, slot_range=slot_range, in_place=in_place, rows=rows,
                             new_rows=None if rows is None else rows.gather(1, positions))
        return ctx, pattern

    def run_layers(self, x: torch.Tensor, ctx: ForwardContext, pattern: str, start: int = 0, stop: int | None = None,
                   indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers start..stop-1 on hidden states x (B, T, dim). `indices`: the top-k indices entering
        layer `start` (those of the last F layer before it; needed when layer `start` is S).
        Returns (hidden states, the indices leaving the last layer). Calibration restarts here from
        cached activations instead of recomputing the unchanged layers before a flipped one."""
        stop = self.args.n_layers if stop is None else stop
        for layer in range(start, stop):
            shared = indices if pattern[layer] == "S" else None
            if shared is None and pattern[layer] == "S" and ctx.attention == "sparse":
                raise ValueError(f"layer {layer} is S but no indices were passed in from an earlier F layer")
            x, indices = self.model.layers[layer](x, ctx, shared)
            if ctx.capture is not None and indices is not None and ctx.capture.wants(layer):
                ctx.capture.indices[layer] = indices
        return x, indices

    def logits(self, x: torch.Tensor, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head: (B, T, dim) -> (B, T, V) fp32, or (B, V) at per-row positions logits_at."""
        x = self.model.norm(x)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]            # (B, dim)
        return self.lm_head(x).float()

    def forward(self, tokens: torch.Tensor, *, start_pos: torch.Tensor | list[int] | int = 0,
                cache: KVCache | None = None, slots: torch.Tensor | list[int] | None = None,
                pattern: str | None = None, attention: str = "sparse", capture: Capture | None = None,
                logits_at: torch.Tensor | None = None, kv_bound: int | None = None,
                block_tables: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, V) at the per-row positions `logits_at` (B,).

        start_pos: (B,) or int, position of tokens[:, 0]; with a cache, keys and values (and indexer keys
        of F layers) are written at start_pos + t into rows `slots` of the cache and attention reads the
        cache; without one, the forward sees only `tokens` (start_pos must be 0).
        pattern: F/S per layer (default: the checkpoint's); attention: "sparse" (DSA) or "dense".
        kv_bound: see `context` (CUDA-graph capture). block_tables: see `context` (paged cache).
        """
        ctx, pattern = self.context(tokens, start_pos=start_pos, cache=cache, slots=slots, pattern=pattern,
                                    attention=attention, capture=capture, kv_bound=kv_bound,
                                    block_tables=block_tables)
        x = self.model.embed_tokens(tokens)                                        # (B, T, dim)
        x, _ = self.run_layers(x, ctx, pattern)
        return self.logits(x, logits_at)
