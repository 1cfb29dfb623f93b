"""The CPU fast forward of GQA DSA models (the bundled SmolLM2 DSA model): the same numbers as
`DSAForCausalLM.forward` with the engine's KV cache, in far fewer and larger operations.

What makes it fast on a CPU, where every PyTorch op costs microseconds of Python and dispatch:
  - weights prepacked once: q, k, v and the indexer's projections of the same normed hidden state in
    one GEMM per layer ([q | k | v | indexer k | indexer q | indexer weights] rows), gate and up in one;
  - RoPE from cos/sin tables computed once per forward and shared by all layers and both rotary dims;
  - K/V (and indexer keys) written into the preallocated cache in place, attention by one
    `scaled_dot_product_attention` per layer reading the cache (a view for one request);
  - the sparse step as a mask: while top-k >= the keys a query can see, the top-k selects every visible
    key and sparse attention is exactly dense causal attention, so the indexer scores nothing (F layers
    still write their indexer keys: later positions need them). Past top-k, each F layer scores and
    selects as the reference does (top-k over fp32 scores; the q . k products by one GEMM in the model
    dtype; with the C kernels the scores, top-k and mask are one call, `cpu_decode.index_select_bf16`,
    else `torch.topk`) and its selection, as an additive mask in the model dtype, serves the S layers
    that follow, with no index tensors in between;
  - in a prefill chunk from position 0, the queries that see at most top-k keys (the first top-k) attend
    by plain causal flash attention with no mask; only the rest read the (T - top-k, S) mask.

Measured on 2 shared cores (a 1K-token prefill of the bundled model, all F, top-512): the masked (T, S)
attention, `torch.topk` over the scored rows and the GEMMs dominate; a bool mask costs ~1.4x an additive
one in CPU flash attention and the fp32 indexer GEMM ~2.7x the bf16 one.

The reference (dsa.py, kernels/) stays the readable twin: `Engine(cpu_fast_path=False)` runs it, and
tests/model/test_cpu_forward.py compares both on fresh random models (logits and greedy tokens, fp32
and bf16). Supported: GQA attention, dense MLPs, bf16/fp32 weights, CPU tensors (`supports()`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_decode
from .dsa import DSAForCausalLM, KVCache, rope_frequencies
from .int8 import Int8Weight, linear, quantize_int8

log = logging.getLogger(__name__)
QUANTIZATIONS = ("none", "int8")
# decode rows (requests in a batched decode step) up to which bf16 projections run through the AVX-512 GEMV
# (kernels/cpu_decode.py) when AMX does not take them: the model's GEMVs at 1/2/4/8 rows took 13.1/14.0/16.1/
# 24.9 ms against F.linear's 20.8/23.7/22.4/23.4 (2 cores, best of 7, bench/results/cpu_decode.json); above it
# F.linear
GEMV_MAX_ROWS = 8
# decode rows from which projections run on AMX tiles where the CPU has them (kernels/cpu_decode.py, weights
# packed once at start, ~270 MB more for the bundled model): at 8 rows the AVX-512 GEMV is compute-bound on
# 2 hyperthreads, the AMX one streams the weights. The model's GEMVs at 1/2/4/8 rows, best of 7: AMX 12.2/12.6/
# 12.5/13.2 ms, AVX-512 13.1/14.0/16.1/24.9 (bench/results/cpu_decode.json); in the engine, 8 requests at ~64
# tokens 48.7 -> 29.5 ms/step. The AVX-512 GEMV serves weights whose rows are not whole 16-row tiles and CPUs
# without AMX.
AMX_MIN_ROWS = 1


def supports(model: DSAForCausalLM) -> str | None:
    """None when the fast forward can run this model; else why not."""
    a = model.args
    if a.attention != "gqa":
        return f"attention {a.attention!r} (the CPU fast forward is for GQA models)"
    if any(a.is_moe_layer(i) for i in range(a.n_layers)):
        return "MoE layers (the CPU fast forward runs dense MLPs only)"
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return f"weights on {weight.device} (the fast forward is for the CPU)"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {weight.dtype} (bf16 or fp32 only)"
    for name, p in model.named_parameters():
        if p.dtype != weight.dtype:
            return f"parameter {name} is {p.dtype}, the LM head {weight.dtype}"
    # a tensor-parallel shard (model/parallel.py) holds a slice of the heads, the MLP and the vocabulary
    att = model.model.layers[0].self_attn
    whole = {"lm_head": (model.lm_head, (a.vocab_size, a.dim)), "q_proj": (att.q_proj, (a.n_heads * a.head_dim, a.dim)),
             "o_proj": (att.o_proj, (a.dim, a.n_heads * a.head_dim))}
    for name, (module, shape) in whole.items():
        if type(module) is not nn.Linear or tuple(module.weight.shape) != shape:
            return f"{name} is a shard or a replaced module (tensor parallel), not the whole {shape} weight"
    if tuple(model.model.embed_tokens.weight.shape) != (a.vocab_size, a.dim) or type(model.model.embed_tokens) is not nn.Embedding:
        return "the embedding is a shard or a replaced module (tensor parallel)"
    return None


@dataclass
class PackedLayer:
    attn_norm: torch.Tensor          # (dim,)
    w_in: torch.Tensor | Int8Weight  # (Hq*Dh + 2*Hkv*Dh [+ Di + Hi*Di + Hi], dim): q|k|v[|ik|iq|iw]
    w_o: torch.Tensor | Int8Weight   # (dim, Hq*Dh)
    mlp_norm: torch.Tensor           # (dim,)
    w_gate_up: torch.Tensor | Int8Weight  # (2*I, dim)
    w_down: torch.Tensor | Int8Weight     # (dim, I)
    k_norm: tuple[torch.Tensor, torch.Tensor] | None   # the indexer's LayerNorm (weight, bias)


class CPUFastForward:
    """`fast(tokens, starts, slots, pattern, cache, logits_at)` -> (B, V) fp32 logits, writing the cache
    exactly where `model(tokens, start_pos=starts, cache=cache, slots=slots, ...)` writes it."""

    def __init__(self, model: DSAForCausalLM, quantization: str = "none", decode_kernels: bool | None = None):
        """quantization: "none" (the model's weights) or "int8" (weight-only int8 of every linear layer and
        the LM head, one scale per output channel: model/int8.py; norms and the embedding lookup unchanged).
        decode_kernels: decode positions (T = 1) through `_decode`, the C kernels of kernels/cpu_decode.py (a
        streaming GEMV for projections of at most GEMV_MAX_ROWS rows, fused RMSNorm / RoPE + cache write /
        attention / SiLU-multiply / residual adds); None = whenever they run here (bf16 weights, no
        quantization, the kernels built), False = never (the PyTorch path below, their slow twin), True =
        required (an error if they cannot run)."""
        why = supports(model)
        if why is not None:
            raise ValueError(f"the CPU fast forward cannot run this model: {why}; use Engine(cpu_fast_path=False)")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        self.quantization = quantization
        pack = quantize_int8 if quantization == "int8" else (lambda w: w)
        a = self.args = model.args
        self.model = model
        self.dtype = model.lm_head.weight.dtype
        self.hq, self.hkv, self.dh = a.n_heads, a.n_kv_heads, a.head_dim
        self.hi, self.di, self.ri = a.index_n_heads, a.index_head_dim, a.index_rope_head_dim
        self.q_end = self.hq * self.dh
        self.k_end = self.q_end + self.hkv * self.dh
        self.v_end = self.k_end + self.hkv * self.dh             # S layers: rows [0, v_end)
        self.ik_end = self.v_end + self.di                         # F layers before top-k binds: [0, ik_end)
        self.iq_end = self.ik_end + self.hi * self.di              # then iq, then iw (all rows)
        self.scale = self.dh ** -0.5
        self.w_scale = (self.hi ** -0.5) * (self.di ** -0.5)
        self.layers: list[PackedLayer] = []
        with torch.no_grad():
            for block in model.model.layers:
                att, mlp = block.self_attn, block.mlp
                rows = [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
                k_norm = None
                if att.indexer is not None:
                    ix = att.indexer
                    rows += [ix.wk.weight, ix.wq_b.weight, ix.weights_proj.weight]
                    k_norm = (ix.k_norm.weight.detach().clone(), ix.k_norm.bias.detach().clone())
                self.layers.append(PackedLayer(
                    attn_norm=block.input_layernorm.weight.detach().clone(),
                    w_in=pack(torch.cat(rows).contiguous()), w_o=pack(att.o_proj.weight.detach().clone()),
                    mlp_norm=block.post_attention_layernorm.weight.detach().clone(),
                    w_gate_up=pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()),
                    w_down=pack(mlp.down_proj.weight.detach().clone()), k_norm=k_norm))
            self.lm_head = pack(model.lm_head.weight.detach())    # int8: its own copy, even when tied
        self.embed = model.model.embed_tokens.weight.detach()    # a lookup reads a few rows: kept as is
        self.final_norm = model.model.norm.weight.detach()
        self.inter = self.layers[0].w_gate_up.shape[0] // 2
        # fp32 tables (max_seq_len, d) for the attention and the indexer rotary dims: [cos | cos] and
        # [-sin | sin], so that rotate-half RoPE is x * cos + swap_halves(x) * sin (exactly the reference's
        # x1 cos - x2 sin, x2 cos + x1 sin; fewer ops per layer)
        self.rope = {d: (torch.cat([ang.cos(), ang.cos()], -1), torch.cat([-ang.sin(), ang.sin()], -1))
                     for d in {self.dh, self.ri} for ang in [rope_frequencies(d, a)]}
        why_not = self._why_no_kernels() if decode_kernels is not False else "off"
        if decode_kernels and why_not is not None:
            raise ValueError(f"decode_kernels=True but the CPU decode kernels cannot run: {why_not}")
        self.decode_kernels = why_not is None
        self.gemv_max_rows = GEMV_MAX_ROWS
        self.amx_min_rows = AMX_MIN_ROWS
        self._checked_cache: KVCache | None = None
        # AMX tiles of each layer's [w_in (its longest prefix of whole 16-row blocks), w_o, w_gate_up, w_down]
        # and of the LM head; None where the weight's rows are not whole blocks (those take the AVX-512 GEMV)
        self.amx: list[list[torch.Tensor | None]] | None = None
        self.amx_lm_head: torch.Tensor | None = None
        if self.decode_kernels and cpu_decode.amx_available() is None:
            tiles = lambda w: cpu_decode.pack_amx(w[: w.shape[0] // 16 * 16]) if w.shape[0] >= 16 else None
            self.amx = [[tiles(w) for w in (p.w_in, p.w_o, p.w_gate_up, p.w_down)] for p in self.layers]
            self.amx_lm_head = tiles(self.lm_head) if self.lm_head.shape[0] % 16 == 0 else None
        # `_decode_on_tiles` runs decode steps when every layer has tiles for all its weights and its S-layer
        # rows (q|k|v) are whole tiles (F rows that are not, e.g. past top-k, take `_project` inside it)
        self.decode_on_tiles = self.amx is not None and all(
            all(t is not None for t in tiles) and self.v_end % 16 == 0 and self.v_end <= tiles[0].shape[0] * 16
            for tiles in self.amx)
        log.info("CPU decode kernels: %s", "on" if self.decode_kernels else f"off ({why_not})")
        self.threads = torch.get_num_threads()   # the replica's (configure_cpu); the engine thread's may differ

    def _why_no_kernels(self) -> str | None:
        if self.dtype != torch.bfloat16:
            return f"weights in {self.dtype} (the kernel is bf16)"
        if self.quantization != "none":
            return f"quantization {self.quantization!r}"
        weights = [self.lm_head] + [w for p in self.layers for w in (p.w_in, p.w_o, p.w_gate_up, p.w_down)]
        if any(w.shape[1] % cpu_decode.K_MULTIPLE for w in weights):
            return f"an input width not a multiple of {cpu_decode.K_MULTIPLE}"
        if not all(w.is_contiguous() for w in weights):   # the decode step passes them to the kernels unchecked
            return "a non-contiguous weight"
        if self.dh % 16 or self.dh > 256 or self.hq // self.hkv > 16:
            return f"head dim {self.dh} / GQA group {self.hq // self.hkv} (the attention kernel takes multiples of 16 up to 256, groups up to 16)"
        if self.inter % 16:
            return f"MLP width {self.inter} (SiLU-multiply takes multiples of 16)"
        return cpu_decode.available()

    def _linear(self, x: torch.Tensor, w: torch.Tensor | Int8Weight, tiles: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) @ w.T -> (..., N) in a prefill chunk: on AMX tiles (w's, packed at start) for
        amx_min_rows..64 rows (short prompts: the weights stream once for all their tokens), the AVX-512 GEMV
        up to gemv_max_rows rows, else F.linear / int8."""
        rows = x.numel() // x.shape[-1]
        if self.decode_kernels:
            n = w.shape[0]
            if (tiles is not None and self.amx_min_rows <= rows <= cpu_decode.AMX_MAX_ROWS and n % 16 == 0
                    and n <= tiles.shape[0] * 16):
                y = cpu_decode.amx_gemv_bf16(x.reshape(rows, x.shape[-1]), tiles[: n // 16], self.threads)
                return y.view(*x.shape[:-1], n)
            if rows <= self.gemv_max_rows:
                return cpu_decode.gemv_bf16(x, w, self.threads)
        return linear(x, w)

    # ---------------------------------------------------------------------------------------- helpers
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.args.norm_eps).to(x.dtype) * w

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, S) bool -> (B, 1, T, S) additive mask in the model dtype (0 where allowed, -inf elsewhere):
        CPU flash attention reads it as is, where a bool mask is first converted on every call."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
        return mask[:, None]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                n_causal: int) -> torch.Tensor:
        """q (B, Hq, T, Dh), k/v (B, Hkv, S, Dh) -> (B, Hq, T, Dh). Queries [0, n_causal) attend causally to
        keys [0, n_causal) (B == 1, the chunk starts at 0); the rest to the keys `allowed` (B, 1, T-n_causal,
        S) admits, or to every key when it is None (one decode position, all keys visible)."""
        T = q.shape[2]
        attend = lambda q_, k_, v_, **kw: F.scaled_dot_product_attention(q_, k_, v_, scale=self.scale,
                                                                          enable_gqa=True, **kw)
        if n_causal == 0:
            return attend(q, k, v, attn_mask=allowed)
        head = attend(q[:, :, :n_causal], k[:, :, :n_causal], v[:, :, :n_causal], is_causal=True)
        if n_causal == T:
            return head
        return torch.cat([head, attend(q[:, :, n_causal:], k, v, attn_mask=allowed)], 2)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in fp32 on x (B, T, H, d) -> fp32; cos = [cos | cos], sin = [-sin | sin]
        (B, T, 1, d)."""
        xf = x.float()
        swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)                          # [x2 | x1]
        return xf * cos + swapped * sin

    # ---------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, starts: list[int], slots: list[int], pattern: str,
                 cache: KVCache, logits_at: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at positions starts[b] + t of cache rows slots[b]; B == 1 or T == 1 (what the
        engine runs: one prefill chunk, or one decode position for a batch). Returns (B, V) fp32 logits
        at the per-row positions logits_at (B,)."""
        B, T = tokens.shape
        if B > 1 and T > 1:
            raise ValueError("the CPU fast forward runs one request's chunk (B=1) or one decode position (T=1)")
        pattern = self.model.check_pattern(pattern)
        cache.ensure_pattern(pattern)
        if T == 1 and self.decode_kernels:
            return self._decode(tokens, starts, slots, pattern, cache)
        a, dt = self.args, self.dtype
        kv_lens = [s + T for s in starts]
        S = max(kv_lens)
        if S > a.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_position_embeddings ({a.max_seq_len})")
        positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]              # (B, T)
        cos, sin = (t[positions][:, :, None, :] for t in self.rope[self.dh])             # (B, T, 1, Dh)
        icos, isin = (t[positions][:, :, None, :] for t in self.rope[self.ri])           # (B, T, 1, Ri)
        one = B == 1
        slot_t = torch.tensor(slots)
        # keys a query may see: s <= its position (and < its kv_len)
        keys = torch.arange(S)
        visible = keys[None, None, :] <= positions[:, :, None]                           # (B, T, S)
        # the sparse step selects every visible key while top-k >= the keys any query sees
        dense = S <= a.index_topk
        # one request's chunk from position 0: its first `n_causal` queries see at most top-k keys, so they
        # attend causally to the first n_causal keys (flash attention with no mask); the rest use `allowed`
        n_causal = min(T, a.index_topk) if one and starts[0] == 0 and T > 1 else 0
        if dense:   # every visible key: no mask for a chunk from 0 or one decode position, else `visible`
            allowed = None if n_causal == T or (one and T == 1) else self._additive(visible)  # (B, 1, T, S)
        else:       # past top-k: the first F layer's selection
            allowed = None
        # a prefill chunk with the C kernels: RMSNorm, RoPE + K/V cache write and SiLU-multiply as row-parallel C
        # calls (kernels/cpu_decode.py) instead of ~10 ATen ops each; GEMMs and attention stay oneDNN / SDPA
        fused = self.decode_kernels and one
        if fused:
            self._check_kernel_cache(cache, starts, slots, S)
            chunk_pos, chunk_slot = positions[0], torch.full((T,), slots[0])               # (T,) int64
            cos_t, sin_t = self.rope[self.dh]
        x = self.embed[tokens]                                                            # (B, T, dim)
        for layer, (p, kind) in enumerate(zip(self.layers, pattern)):
            kc, vc = cache.layers[layer]["k"], cache.layers[layer]["v"]
            tiles = self.amx[layer] if self.amx is not None else (None, None, None, None)
            h = self._rms(x, p.attn_norm) if not fused else \
                cpu_decode.rms_norm_bf16(x[0], p.attn_norm, a.norm_eps, check=False, threads=self.threads)[None]
            is_f = kind == "F"
            rows = self.v_end if not is_f else (self.ik_end if dense else p.w_in.shape[0])
            w_in = p.w_in.rows(rows) if isinstance(p.w_in, Int8Weight) else p.w_in[:rows]
            proj = self._linear(h, w_in, tiles[0])                                                        # (B, T, rows)
            if fused:   # q rotated; k rotated and v written into the cache
                q = cpu_decode.rope_qkv_bf16(proj[0], self.hq, self.hkv, cos_t, sin_t, chunk_pos, chunk_slot, kc, vc,
                                             check=False, threads=self.threads).view(1, T, self.hq, self.dh)
                k_all, v_all = kc[slots[0]: slots[0] + 1, :S], vc[slots[0]: slots[0] + 1, :S]  # (1, S, Hkv, Dh)
            else:
                qk = self._rotate(proj[..., : self.k_end].view(B, T, self.hq + self.hkv, self.dh),
                                  cos, sin).to(dt)                                        # (B, T, Hq+Hkv, Dh)
                q, k = qk[:, :, : self.hq], qk[:, :, self.hq:]
                v = proj[..., self.k_end: self.v_end].view(B, T, self.hkv, self.dh)
                if one:
                    kc[slots[0], starts[0]: starts[0] + T] = k[0]
                    vc[slots[0], starts[0]: starts[0] + T] = v[0]
                    k_all, v_all = kc[slots[0]: slots[0] + 1, :S], vc[slots[0]: slots[0] + 1, :S]  # (1, S, Hkv, Dh)
                else:
                    kc[slot_t, positions[:, 0]] = k[:, 0]
                    vc[slot_t, positions[:, 0]] = v[:, 0]
                    k_all, v_all = kc[slot_t, :S], vc[slot_t, :S]                        # (B, S, Hkv, Dh)
            if is_f:
                if p.k_norm is None:
                    raise RuntimeError(f"layer {layer} is F in the pattern but the checkpoint has no "
                                       "indexer weights for it")
                selected = self._indexer(proj, p, layer, cache, B, T, starts, slots, slot_t, positions,
                                         icos, isin, visible, dense, n_causal, additive=True)
                if not dense:
                    allowed = selected                                                    # (B, 1, T', S)
            elif not dense and allowed is None:
                raise ValueError(f"layer {layer} is S but no indices were passed in from an earlier F layer")
            out = self._attend(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), allowed,
                               n_causal)                                                  # (B, Hq, T, Dh)
            x = x + self._linear(out.transpose(1, 2).reshape(B, T, self.q_end), p.w_o, tiles[1])
            if fused:
                x = self._mlp_rows(x[0], p, tiles)[None]
                continue
            h = self._rms(x, p.mlp_norm)
            gu = self._linear(h, p.w_gate_up, tiles[2])                                                   # (B, T, 2I)
            x = x + self._linear(F.silu(gu[..., : self.inter]) * gu[..., self.inter:], p.w_down, tiles[3])
        x = x[torch.arange(B), logits_at]                                                 # (B, dim)
        return self._linear(self._rms(x, self.final_norm), self.lm_head).float()               # (B, V)

    def _mlp_rows(self, x: torch.Tensor, p: PackedLayer, tiles) -> torch.Tensor:
        """x (N, dim) + MLP(RMSNorm(x)) for the rows of prefill chunks: RMSNorm and SiLU-multiply as row-parallel
        C calls, the GEMMs by `_linear`."""
        th = self.threads
        h = cpu_decode.rms_norm_bf16(x, p.mlp_norm, self.args.norm_eps, check=False, threads=th)
        act = cpu_decode.silu_mul_bf16(self._linear(h, p.w_gate_up, tiles[2]), check=False, threads=th)   # (N, I)
        return x + self._linear(act, p.w_down, tiles[3])

    def can_pack(self, start: int, n: int) -> bool:
        """Whether a prefill chunk of n tokens from `start` may go into `prefill_packed`."""
        return self.decode_kernels and n >= 1 and start + n <= self.args.index_topk

    @torch.no_grad()
    def prefill_packed(self, chunks: list[tuple[list[int], int, int]], pattern: str, cache: KVCache) -> torch.Tensor:
        """The prefill chunks of several requests in one forward: chunks [(token ids, start, slot)], each within
        top-k (`can_pack`: dense attention; F layers only write their indexer keys). All their tokens go
        through each GEMM as one (N, dim) matrix, so the weights are read once for all the requests instead of
        once per request; RMSNorm, RoPE + K/V cache write and SiLU-multiply run on all rows at once (C kernels);
        attention per chunk over its slot's cache. Returns (len(chunks), V) fp32 logits at each chunk's last
        token; the cache ends as `__call__` on each chunk alone leaves it (the twin, tests/model)."""
        a, th = self.args, self.threads
        starts, slots = [c[1] for c in chunks], [c[2] for c in chunks]
        lens = [len(c[0]) for c in chunks]
        if not chunks or not all(self.can_pack(s, n) for s, n in zip(starts, lens)):
            raise ValueError("prefill_packed takes non-empty chunks within top-k (start + length <= index_topk) "
                             "and needs the C kernels")
        pattern = self.model.check_pattern(pattern)
        cache.ensure_pattern(pattern)
        self._check_kernel_cache(cache, starts, slots, max(s + n for s, n in zip(starts, lens)))
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])                    # (N,) int64
        slot_of_row = torch.cat([torch.full((n,), slot) for n, slot in zip(lens, slots)])          # (N,) int64
        ends = torch.tensor(lens).cumsum(0).tolist()
        cos_t, sin_t = self.rope[self.dh]
        icos, isin = (t[pos][None, :, None, :] for t in self.rope[self.ri])                       # (1, N, 1, Ri)
        # a chunk from position 0 attends causally with no mask; one after a cached prefix, to keys <= its position
        masks = [None if s == 0 else self._additive((torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None])[None])
                 for s, n in zip(starts, lens)]                                                # (1, 1, n, s + n)
        x = self.embed[torch.tensor([t for ids, _, _ in chunks for t in ids])]                   # (N, dim)
        for layer, (p, kind) in enumerate(zip(self.layers, pattern)):
            kc, vc = cache.layers[layer]["k"], cache.layers[layer]["v"]
            tiles = self.amx[layer] if self.amx is not None else (None, None, None, None)
            is_f = kind == "F"
            if is_f and p.k_norm is None:
                raise RuntimeError(f"layer {layer} is F in the pattern but the checkpoint has no indexer weights for it")
            h = cpu_decode.rms_norm_bf16(x, p.attn_norm, a.norm_eps, check=False, threads=th)
            proj = self._linear(h, p.w_in[: self.ik_end if is_f else self.v_end], tiles[0])       # (N, rows)
            q = cpu_decode.rope_qkv_bf16(proj, self.hq, self.hkv, cos_t, sin_t, pos, slot_of_row, kc, vc,
                                         check=False, threads=th)                              # (N, Hq*Dh)
            if is_f:   # the indexer's keys, which later positions score (within top-k nothing is scored)
                cache.indexer_k[layer][slot_of_row, pos] = self._indexer_key(proj[None], p, icos, isin, cache)[0]
            out = torch.empty_like(q)                                                          # (N, Hq*Dh)
            for s, n, slot, end, mask in zip(starts, lens, slots, ends, masks):
                qi = q[end - n: end].view(1, n, self.hq, self.dh).transpose(1, 2)               # (1, Hq, n, Dh)
                ki, vi = (c[slot: slot + 1, : s + n].transpose(1, 2) for c in (kc, vc))          # (1, Hkv, s+n, Dh)
                oi = self._attend(qi, ki, vi, mask, n if s == 0 else 0)                          # (1, Hq, n, Dh)
                out[end - n: end] = oi.transpose(1, 2).reshape(n, self.q_end)
            x = self._mlp_rows(x + self._linear(out, p.w_o, tiles[1]), p, tiles)
        last = x[torch.tensor(ends) - 1]                                                       # (n, dim)
        return self._linear(self._rms(last, self.final_norm), self.lm_head).float()              # (n, V)

    def _decode(self, tokens: torch.Tensor, starts: list[int], slots: list[int], pattern: str,
                cache: KVCache) -> torch.Tensor:
        """One decode position per row (tokens (B, 1)) through the C kernels: per layer RMSNorm, one GEMV,
        RoPE + K/V cache write, attention over the slot's cache (every visible key while top-k >= the keys,
        else the F layer's selection), GEMV + residual, RMSNorm, GEMV, SiLU-multiply, GEMV + residual. The
        indexer (F layers: its keys; past top-k, its selection) is `_indexer`, shared with the path above.
        Returns (B, V) fp32 logits."""
        a, B = self.args, tokens.shape[0]
        kv_lens = [s + 1 for s in starts]
        S = max(kv_lens)
        self._check_kernel_cache(cache, starts, slots, S)
        if self.decode_on_tiles and self.amx_min_rows <= B <= cpu_decode.AMX_MAX_ROWS:
            return self._decode_on_tiles(tokens, starts, slots, pattern, cache)
        pos, slot_t, lens = torch.tensor(starts), torch.tensor(slots), torch.tensor(kv_lens)        # (B,) int64
        cos, sin = self.rope[self.dh]
        icos, isin = (t[pos][:, None, None, :] for t in self.rope[self.ri])                     # (B, 1, 1, Ri)
        visible = torch.arange(S)[None, None, :] <= pos[:, None, None]                         # (B, 1, S)
        dense = S <= a.index_topk
        eps, th = a.norm_eps, self.threads
        allowed = None                      # (B, S) bool past top-k: the last F layer's selection
        x = self.embed[tokens[:, 0]]                                                            # (B, dim)
        for layer, (p, kind) in enumerate(zip(self.layers, pattern)):
            kc, vc = cache.layers[layer]["k"], cache.layers[layer]["v"]
            is_f = kind == "F"
            rows = self.v_end if not is_f else (self.ik_end if dense else p.w_in.shape[0])
            h = cpu_decode.rms_norm_bf16(x, p.attn_norm, eps, check=False)                      # (B, dim)
            tiles = self.amx[layer] if self.amx is not None else (None, None, None, None)
            proj = self._project(h, p.w_in, tiles[0], rows)                                     # (B, rows)
            q = cpu_decode.rope_qkv_bf16(proj, self.hq, self.hkv, cos, sin, pos, slot_t, kc, vc,
                                         check=False)                                   # (B, Hq*Dh)
            if is_f:
                if p.k_norm is None:
                    raise RuntimeError(f"layer {layer} is F in the pattern but the checkpoint has no "
                                       "indexer weights for it")
                selected = self._indexer(proj[:, None], p, layer, cache, B, 1, starts, slots, slot_t, pos[:, None],
                                         icos, isin, visible, dense, 0)
                if not dense:
                    allowed = selected[:, 0]                                                    # (B, S)
            elif not dense and allowed is None:
                raise ValueError(f"layer {layer} is S but no indices were passed in from an earlier F layer")
            out = cpu_decode.attend_bf16(q, kc, vc, slot_t, lens, allowed, self.scale, th, check=False)  # (B, Hq*Dh)
            self._project(out, p.w_o, tiles[1], p.w_o.shape[0], residual=x)                    # x += out @ w_o.T
            h = cpu_decode.rms_norm_bf16(x, p.mlp_norm, eps, check=False)
            gu = self._project(h, p.w_gate_up, tiles[2], p.w_gate_up.shape[0])                   # (B, 2I)
            act = cpu_decode.silu_mul_bf16(gu, check=False)                                     # (B, I)
            self._project(act, p.w_down, tiles[3], p.w_down.shape[0], residual=x)              # x += act @ w_down.T
        h = cpu_decode.rms_norm_bf16(x, self.final_norm, eps, check=False)
        logits = self._project(h, self.lm_head, self.amx_lm_head, self.lm_head.shape[0])         # (B, V)
        return logits.float()                                                                   # (B, V)

    def _decode_on_tiles(self, tokens: torch.Tensor, starts: list[int], slots: list[int], pattern: str,
                         cache: KVCache) -> torch.Tensor:
        """`_decode` when every projection runs on AMX tiles: the same kernels in the same order on the same
        operands (so the same logits, bit for bit: tests/model), called straight through ctypes on pointers
        taken once per step into buffers reused by all the layers. The ~270 kernel calls of a step cost ~5 ms
        of a ~21 ms step through `_decode`'s per-call wrappers (1 request, 2 cores)."""
        a, B, lib, th = self.args, tokens.shape[0], cpu_decode._lib, self.threads
        kv_lens = [s + 1 for s in starts]
        S = max(kv_lens)
        dense = S <= a.index_topk
        f_rows = self.ik_end if dense else max(p.w_in.shape[0] for p in self.layers)   # an F layer's w_in rows
        pos, slot_t, lens = torch.tensor(starts), torch.tensor(slots), torch.tensor(kv_lens)        # (B,) int64
        cos, sin = self.rope[self.dh]
        icos, isin = (t[pos][:, None, None, :] for t in self.rope[self.ri])                     # (B, 1, 1, Ri)
        visible = torch.arange(S)[None, None, :] <= pos[:, None, None]                         # (B, 1, S)
        eps, D, I, hq, hkv, dh = a.norm_eps, a.dim, self.inter, self.hq, self.hkv, self.dh
        bf = dict(dtype=torch.bfloat16)
        x = self.embed[tokens[:, 0]].contiguous()                                               # (B, dim)
        h, q, out = torch.empty(B, D, **bf), torch.empty(B, hq * dh, **bf), torch.empty(B, hq * dh, **bf)
        proj_buf = torch.empty(B * max(f_rows, self.v_end), **bf)
        gu, act = torch.empty(B, 2 * I, **bf), torch.empty(B, I, **bf)
        xp, hp, qp, outp, projp, gup, actp = (t.data_ptr() for t in (x, h, q, out, proj_buf, gu, act))
        cosp, sinp, posp, slotp, lensp = (t.data_ptr() for t in (cos, sin, pos, slot_t, lens))
        max_len = cache.layers[0]["k"].shape[1]
        allowed = None   # (B, S) bool past top-k: the last F layer's selection
        scratch = torch.empty(B * hq, S, dtype=torch.float32)
        for layer, (p, kind, tiles) in enumerate(zip(self.layers, pattern, self.amx)):
            kc, vc = cache.layers[layer]["k"], cache.layers[layer]["v"]
            kcp, vcp = kc.data_ptr(), vc.data_ptr()
            is_f = kind == "F"
            rows = (self.ik_end if dense else p.w_in.shape[0]) if is_f else self.v_end
            lib.rms_norm_bf16(xp, B, D, p.attn_norm.data_ptr(), eps, hp, 1)
            if rows % 16 == 0 and rows <= tiles[0].shape[0] * 16:
                proj = proj_buf[: B * rows].view(B, rows)
                lib.amx_gemv_bf16(hp, B, D, tiles[0].data_ptr(), rows, projp, 0, th)             # proj (B, rows)
            else:   # F rows past top-k that are not whole tiles: as `_decode` projects them
                proj = self._project(h, p.w_in, tiles[0], rows)
            lib.rope_qkv_bf16(proj.data_ptr(), B, rows, hq, hkv, dh, cosp, sinp, posp, slotp, max_len, qp, kcp, vcp, 1)
            if is_f:
                if p.k_norm is None:
                    raise RuntimeError(f"layer {layer} is F in the pattern but the checkpoint has no "
                                       "indexer weights for it")
                proj = proj.view(B, 1, rows)
                selected = self._indexer(proj, p, layer, cache, B, 1, starts, slots, slot_t, pos[:, None],
                                         icos, isin, visible, dense, 0)
                if not dense:
                    allowed = selected[:, 0].contiguous()                                        # (B, S)
            elif not dense and allowed is None:
                raise ValueError(f"layer {layer} is S but no indices were passed in from an earlier F layer")
            lib.attend_bf16(qp, B, hq, hkv, dh, kcp, vcp, max_len, slotp, lensp,
                            allowed.data_ptr() if allowed is not None else None, S if allowed is not None else 0,
                            self.scale, outp, scratch.data_ptr(), S, th)
            lib.amx_gemv_bf16(outp, B, hq * dh, tiles[1].data_ptr(), D, xp, 1, th)              # x += out @ w_o.T
            lib.rms_norm_bf16(xp, B, D, p.mlp_norm.data_ptr(), eps, hp, 1)
            lib.amx_gemv_bf16(hp, B, D, tiles[2].data_ptr(), 2 * I, gup, 0, th)                 # gu (B, 2I)
            lib.silu_mul_bf16(gup, B, I, actp, 1)
            lib.amx_gemv_bf16(actp, B, I, tiles[3].data_ptr(), D, xp, 1, th)                    # x += act @ w_down.T
        lib.rms_norm_bf16(xp, B, D, self.final_norm.data_ptr(), eps, hp, 1)
        logits = self._project(h, self.lm_head, self.amx_lm_head, self.lm_head.shape[0])         # (B, V)
        return logits.float()                                                                   # (B, V)

    def _check_kernel_cache(self, cache: KVCache, starts: list[int], slots: list[int], S: int) -> None:
        """What the C kernels index memory with unchecked: positions up to S and slots inside the cache, whose
        K/V tensors are contiguous bf16 (slots, len, Hkv, Dh) (checked once per cache: a cache keeps them)."""
        if S > min(self.args.max_seq_len, cache.layers[0]["k"].shape[1]):
            raise ValueError(f"sequence of {S} tokens exceeds max_position_embeddings ({self.args.max_seq_len}) or the cache")
        if min(starts) < 0 or not 0 <= min(slots) <= max(slots) < cache.layers[0]["k"].shape[0]:
            raise ValueError(f"positions {starts} or slots {slots} outside the cache")
        if cache is not self._checked_cache:
            shape = (cache.layers[0]["k"].shape[0], cache.layers[0]["k"].shape[1], self.hkv, self.dh)
            if any(t.dtype != torch.bfloat16 or not t.is_contiguous() or t.shape != shape
                   for kv in cache.layers for t in (kv["k"], kv["v"])):
                raise ValueError("the decode kernels need the KV cache as contiguous bf16 (slots, len, Hkv, Dh) tensors")
            self._checked_cache = cache

    def _project(self, x: torch.Tensor, w: torch.Tensor, tiles: torch.Tensor | None, rows: int,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, K) @ w[:rows].T -> (B, rows), or residual (B, rows) += that, in place: on AMX tiles for
        amx_min_rows..16 rows when the first `rows` rows are whole packed blocks, else the AVX-512 GEMV up to
        gemv_max_rows rows, else F.linear. Operands checked at init (weights) or made by `_decode`."""
        B, th = x.shape[0], self.threads
        if tiles is not None and self.amx_min_rows <= B <= cpu_decode.AMX_MAX_ROWS and rows % 16 == 0 \
                and rows <= tiles.shape[0] * 16:
            return cpu_decode.amx_gemv_bf16(x, tiles[: rows // 16], th, residual=residual, check=False)
        w = w[:rows]
        if B <= self.gemv_max_rows:
            if residual is not None:
                return cpu_decode.gemv_add_bf16(x, w, residual, th, check=False)
            return cpu_decode.gemv_bf16(x, w, th, check=False)
        return residual.add_(F.linear(x, w)) if residual is not None else F.linear(x, w)

    def _indexer_key(self, proj: torch.Tensor, p: PackedLayer, icos: torch.Tensor, isin: torch.Tensor,
                     cache: KVCache) -> torch.Tensor:
        """An F layer's indexer keys from its projection proj (B, T, rows): LayerNorm, then RoPE on the first Ri
        dims (icos/isin (B, T, 1, Ri)) -> (B, T, Di) in the model dtype."""
        if cache.indexer_fp8:
            raise ValueError("the CPU fast forward keeps bf16/fp32 indexer keys; build the cache without indexer_fp8")
        ri = self.ri
        ik = F.layer_norm(proj[..., self.v_end: self.ik_end], (self.di,), *p.k_norm, eps=1e-6)  # (B, T, Di)
        return torch.cat([self._rotate(ik[:, :, None, :ri], icos, isin)[:, :, 0].to(self.dtype), ik[..., ri:]], -1)

    def _indexer(self, proj, p: PackedLayer, layer: int, cache: KVCache, B: int, T: int, starts, slots, slot_t,
                 positions, icos, isin, visible, dense: bool, n_causal: int, additive: bool = False) -> torch.Tensor | None:
        """Write this F layer's indexer keys; past top-k, return its selection for the queries from n_causal on (the
        first n_causal attend causally, see `_attend`): (B, T - n_causal, S) bool, or with additive the mask
        attention adds, (B, 1, T - n_causal, S) in the model dtype."""
        dt, ri = self.dtype, self.ri
        ik = self._indexer_key(proj, p, icos, isin, cache)                                # (B, T, Di)
        ikc = cache.indexer_k[layer]
        S = visible.shape[-1]
        if B == 1:
            ikc[slots[0], starts[0]: starts[0] + T] = ik[0]
            k_all = ikc[slots[0]: slots[0] + 1, :S]                                       # (1, S, Di)
        else:
            ikc[slot_t, positions[:, 0]] = ik[:, 0]
            k_all = ikc[slot_t, :S]
        if dense:
            return None
        # queries that see at most top-k keys select them all; only the rest are scored (in a prefill chunk
        # from position 0 that is every query past top-k, about half of a 1K prompt)
        topk = self.args.index_topk
        first = max(0, topk - starts[0]) if B == 1 else 0                                # first row scored
        if first >= T:
            selected = visible[:, n_causal:]
            return self._additive(selected) if additive else selected.clone()
        rows, t = slice(first, T), T - first
        iq = proj[:, rows, self.ik_end: self.iq_end].view(B, t, self.hi, self.di)
        iq = torch.cat([self._rotate(iq[..., :ri], icos[:, rows], isin[:, rows]).to(dt), iq[..., ri:]], -1)
        w = proj[:, rows, self.iq_end:].float() * self.w_scale                            # (B, t, Hi)
        # score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]); q . k as one GEMM in the model
        # dtype (bf16: fp32 accumulation, the product rounded to bf16 once; the reference multiplies in fp32,
        # DeepSeek's indexer in FP8), weights, sum and top-k in fp32
        logits = torch.matmul(iq.flatten(1, 2), k_all.transpose(1, 2))                    # (B, t*Hi, S)
        if self.decode_kernels:
            # the scores, their top-k and the mask in one C call (kernels/cpu_decode.c index_select_bf16, ~1.5 ms
            # for a 1K prompt's 488 scored queries where the ops below took ~8); ties at the k-th score go to the
            # lowest key index, where torch.topk picks any
            out = torch.empty(B, T - n_causal, S, dtype=dt if additive else torch.bool)
            if first > n_causal:
                head = visible[:, n_causal:first]
                out[:, : first - n_causal] = self._additive(head)[:, 0] if additive else head
            n_visible = (positions[:, rows] + 1).reshape(-1)                              # (B*t,)
            cpu_decode.index_select_bf16(logits.view(B * t, self.hi, S), w.view(B * t, self.hi), n_visible, topk,
                                         self.threads, additive=additive,
                                         out=out[:, first - n_causal:].view(B * t, S))
            return out[:, None] if additive else out
        logits = logits.float().relu_().view(B, t, self.hi, S)
        scores = (logits.mul_(w[..., None])).sum(2)                                       # (B, t, S)
        scores = scores.masked_fill_(~visible[:, rows], float("-inf"))
        values, idx = scores.topk(min(topk, S), dim=-1, sorted=False)                     # (B, t, k)
        chosen = torch.zeros(B, t, S, dtype=torch.bool)
        chosen.scatter_(2, idx, values != float("-inf"))
        selected = visible[:, n_causal:].clone()                                          # (B, T - n_causal, S)
        selected[:, first - n_causal:] = chosen
        return self._additive(selected) if additive else selected
