"""Tensor and expert parallelism over the GPUs of one node: a built `DSAForCausalLM` becomes one rank's shard.

The reference model (dsa.py) stays free of parallelism (gpt-fast's split): `shard_model` slices the
parameters of a built model (or of one built on the meta device, for sharded loading) and adds the
collectives as module hooks, so every module keeps its name and the checkpoint's tensor names still apply.

What each rank holds (H attention heads, E routed experts, V vocabulary rows, `world` ranks):

  - MLA: `q_b_proj` and `kv_b_proj` column-parallel by heads (H/world heads each: the rows of whole heads),
    `o_proj` row-parallel (the columns of those heads) with an all-reduce of its output. `q_a_proj`,
    `kv_a_proj_with_mqa` and their norms are replicated, so the latent KV cache row (kv_lora_rank + rope)
    is the same on every rank: each rank keeps the whole latent cache, as DeepSeek's `inference/` and vLLM
    do (MLA's one latent head cannot be split by heads).
  - GQA: q by heads (H/world each); k/v heads split when n_kv_heads >= world (n_kv_heads/world each),
    else replicated: world must then be a multiple of n_kv_heads and rank r holds kv head
    r // (world / n_kv_heads), the one its q heads read (vLLM's rule). `o_proj` row-parallel + all-reduce.
  - Dense FFN (and the MoE's shared expert): gate/up column-parallel, down row-parallel. The dense MLP's
    output is all-reduced; the shared expert's partial sum joins the routed experts' before one all-reduce.
  - MoE: experts partitioned, rank r holds experts [r E/world, (r+1) E/world). The router is replicated, so
    every rank routes every token identically; each rank computes its own experts' contributions for all
    tokens (pairs routed elsewhere get weight 0) and the partial sums are all-reduced with the attention
    and FFN ones. This is the all-gather / reduce-scatter flavour of expert parallelism with the gather
    free: under tensor-parallel attention every rank already holds every token's hidden state, so no
    dispatch is needed, and the combine is the all-reduce the FFN needs anyway. An all-to-all dispatch
    pays off when tokens are sharded over ranks (data-parallel attention across nodes); inside one node
    with TP attention it would only add a second collective per layer.
    Cost, stated: the kernels have no "skip this pair", so each rank runs the pairs it does not own on a
    local expert with weight 0: the routed GEMM work is not divided by world (memory is).
  - Vocabulary-parallel embedding (rank r holds rows [r Vp, (r+1) Vp), Vp = ceil(V / world), the last
    rank's padding rows zero; the lookup is masked and all-reduced) and LM head (the same rows, logits
    all-gathered and cut back to V).
  - The lightning indexer is replicated (every rank holds all its heads and runs it on the same hidden
    states). Why: its weights are small (DeepSeek-V3.2: ~14 M parameters a layer, under 1 GB over 61
    layers in FP8); the top-k must be identical on every rank so that S layers reuse the same indices
    everywhere, and a replicated indexer on bit-identical inputs (all-reduce results are the same on every
    rank) gives that with no collective at all; splitting its heads would need an all-reduce of the
    (T, S) head-summed scores before top-k, as many bytes per (query, key) pair as the split saves FLOPs
    at NVLink speed (64 heads x 128 dims in FP8 against 4 bytes of fp32 score). The indexer's quadratic
    work is therefore not divided by world; at long context the better split is by keys (each rank scores
    its share of the positions, local top-k, all-gather of the world x k candidates, a final top-k), not
    built here. IndexCache already removes it from the S layers.
  - Norms, `q_a_proj`, `kv_a_proj_with_mqa`, the router: replicated.

`check_tensor_parallel` rejects a world size that does not divide what must be divided, naming the
deployment field (`gpusPerReplica`) and the fix.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import FP8_BLOCK
from .config import ModelArgs

FIELD = "gpusPerReplica"   # the IndexCacheDeployment field that sets the tensor-parallel size


# ---------------------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------------------
@dataclass
class ParallelContext:
    """One rank of a tensor-parallel group: collectives are no-ops when world == 1."""
    rank: int = 0
    world: int = 1
    group: object | None = None   # a torch.distributed ProcessGroup (None: the default group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n) on each rank -> (..., world * n), rank order."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int, world: int, address: str, port: int, backend: str | None = None,
                  device_index: int | None = None) -> ParallelContext:
    """Join the group `tcp://address:port` as `rank` of `world`: NCCL when CUDA is there, else gloo.
    device_index: this rank's GPU (default: the rank, one process per GPU)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank if device_index is None else device_index)
    if world > 1 and not dist.is_initialized():
        if address.startswith("127.") and backend == "gloo":   # gloo would pick the host name's interface
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)
    return ParallelContext(rank=rank, world=world, group=None)


# ---------------------------------------------------------------------------------------------------
# which world sizes a model admits
# ---------------------------------------------------------------------------------------------------
def _problems(args: ModelArgs, world: int) -> list[str]:
    problems = []
    if args.n_heads % world:
        problems.append(f"num_attention_heads={args.n_heads}")
    if args.attention == "gqa" and args.n_kv_heads % world and world % args.n_kv_heads:
        problems.append(f"num_key_value_heads={args.n_kv_heads} (it must divide {FIELD} or be divided by it)")
    has_dense = args.attention == "gqa" or not args.n_routed_experts or args.first_k_dense > 0
    if has_dense and args.inter_dim % world:
        problems.append(f"intermediate_size={args.inter_dim}")
    if args.n_routed_experts:
        if args.n_routed_experts % world:
            problems.append(f"n_routed_experts={args.n_routed_experts}")
        if (args.moe_inter_dim * args.n_shared_experts) % world:
            problems.append(f"moe_intermediate_size x n_shared_experts={args.moe_inter_dim * args.n_shared_experts}")
    return problems


def tensor_parallel_sizes(args: ModelArgs, up_to: int = 8) -> list[int]:
    """World sizes in 1..up_to that split this model."""
    return [n for n in range(1, up_to + 1) if not _problems(args, n)]


def check_tensor_parallel(args: ModelArgs, world: int) -> None:
    """Raise ValueError naming `gpusPerReplica` when `world` ranks cannot split this model."""
    if world < 1:
        raise ValueError(f"{FIELD} must be >= 1, got {world}")
    problems = _problems(args, world)
    if problems:
        sizes = ", ".join(map(str, tensor_parallel_sizes(args)))
        raise ValueError(f"{FIELD}={world} does not divide the model's {', '.join(problems)}: set {FIELD} to "
                         f"a tensor-parallel size that does ({sizes} among 1-8)")


# ---------------------------------------------------------------------------------------------------
# what each rank holds: one slice per parameter, by name (HF names, as the model's state dict has them)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slice:
    """Rows or columns [start, stop) of `axis`; rows past the tensor's end (vocabulary padding) are zeros.
    Block-scaled FP8 scales take the same slice divided by 128 (`scale_slice`)."""
    axis: int
    start: int
    stop: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        full = t.shape[self.axis]
        part = t.narrow(self.axis, self.start, min(self.stop, full) - self.start)
        if self.stop > full:   # padding (vocabulary rows of the last rank)
            pad_shape = list(t.shape)
            pad_shape[self.axis] = self.stop - full
            part = torch.cat([part, torch.zeros(pad_shape, dtype=t.dtype, device=t.device)], dim=self.axis)
        return part

    def scale_slice(self, name: str) -> "Slice":
        if self.start % FP8_BLOCK or self.stop % FP8_BLOCK:
            raise ValueError(f"{name}: tensor parallelism cuts it at [{self.start}, {self.stop}) on axis "
                             f"{self.axis}, not at multiples of the FP8 block ({FP8_BLOCK}): set {FIELD} so "
                             f"that each rank's share is whole 128-wide blocks, or load with fp8='dequantize'")
        return Slice(self.axis, self.start // FP8_BLOCK, self.stop // FP8_BLOCK)


def kv_heads_of(args: ModelArgs, rank: int, world: int) -> tuple[int, int]:
    """GQA: (first kv head, count) that rank holds: split when n_kv_heads >= world, else one replicated head."""
    if args.n_kv_heads >= world:
        count = args.n_kv_heads // world
        return rank * count, count
    return rank // (world // args.n_kv_heads), 1


def vocab_rows(args: ModelArgs, world: int) -> int:
    return -(-args.vocab_size // world)


def param_slice(name: str, args: ModelArgs, rank: int, world: int) -> Slice | None:
    """The slice of parameter `name` (HF name, stacked experts as the model has them; FP8 `_scale_inv`
    names map to their weight's slice, the caller divides by the block) that `rank` holds; None: replicated."""
    base = name[: -len("_scale_inv")] if name.endswith("_scale_inv") else name
    h = args.n_heads // world

    def even(axis: int, size: int) -> Slice:
        part = size // world
        return Slice(axis, rank * part, (rank + 1) * part)

    if base in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = vocab_rows(args, world)
        return Slice(0, rank * rows, (rank + 1) * rows)
    if ".self_attn.indexer." in base or ".mlp.gate." in base:
        return None
    if args.attention == "mla":
        if base.endswith("self_attn.q_b_proj.weight"):
            d = args.qk_nope_head_dim + args.qk_rope_head_dim
            return Slice(0, rank * h * d, (rank + 1) * h * d)
        if base.endswith("self_attn.kv_b_proj.weight"):
            d = args.qk_nope_head_dim + args.v_head_dim
            return Slice(0, rank * h * d, (rank + 1) * h * d)
        if base.endswith("self_attn.o_proj.weight"):
            return Slice(1, rank * h * args.v_head_dim, (rank + 1) * h * args.v_head_dim)
    else:
        d = args.head_dim
        if base.endswith("self_attn.q_proj.weight"):
            return Slice(0, rank * h * d, (rank + 1) * h * d)
        if base.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            first, count = kv_heads_of(args, rank, world)
            return Slice(0, first * d, (first + count) * d)
        if base.endswith("self_attn.o_proj.weight"):
            return Slice(1, rank * h * d, (rank + 1) * h * d)
    if ".mlp.experts." in base:   # stacked (E, ...): whole experts
        return even(0, args.n_routed_experts)
    if ".mlp.shared_experts." in base or ".mlp." in base:
        inter = args.moe_inter_dim * args.n_shared_experts if ".shared_experts." in base else args.inter_dim
        if base.endswith(("gate_proj.weight", "up_proj.weight")):
            return even(0, inter)
        if base.endswith("down_proj.weight"):
            return even(1, inter)
    return None


def shard_tensor(name: str, t: torch.Tensor, args: ModelArgs, rank: int, world: int) -> torch.Tensor:
    """Rank's part of a full model tensor (a weight or its FP8 block scale). Stacked expert scales are
    sliced by expert like their weights."""
    piece = param_slice(name, args, rank, world)
    if piece is None:
        return t
    if name.endswith("_scale_inv") and ".mlp.experts." not in name:
        piece = piece.scale_slice(name)
    return piece.of(t)


# ---------------------------------------------------------------------------------------------------
# the modules that need more than a slice
# ---------------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; other ids give zeros, and the all-reduce sums the
    one rank's row that is non-zero (exact)."""

    def __init__(self, weight: nn.Parameter, start: int, ctx: ParallelContext):
        super().__init__()
        self.weight, self.start, self.ctx = weight, start, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight)                # (B, T, dim)
        return self.ctx.all_reduce(out * mine[..., None].to(out.dtype))


class ParallelLMHead(nn.Module):
    """Rows [start, start + rows) of the LM head; logits all-gathered in rank order, cut to vocab_size."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, ctx: ParallelContext):
        super().__init__()
        self.weight, self.vocab_size, self.ctx = weight, vocab_size, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather_last(F.linear(x, self.weight))[..., : self.vocab_size]   # (..., V)


def _all_reduce_output(ctx: ParallelContext):
    def hook(module, inputs, output):
        return ctx.all_reduce(output)
    return hook


def _local_experts(first: int, count: int):
    """Router hook: global expert ids -> this rank's local ids; pairs routed to other ranks get weight 0."""
    def hook(module, inputs, output):
        weights, experts = output                                                  # (N, k), (N, k)
        local = experts - first
        mine = (local >= 0) & (local < count)
        return weights * mine, torch.where(mine, local, torch.zeros_like(local))
    return hook


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))


@torch.no_grad()
def shard_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Turn a built DSAForCausalLM (on any device, meta included) into rank ctx.rank's shard, in place.

    `model.args` becomes the rank's view (its attention heads and, for GQA, its kv heads: what KVCache
    sizes itself by); `model.full_args` keeps the whole model's. Returns the model."""
    from .dsa import MLP, GQAttention, MLAttention, MoE

    args, rank, world = model.args, ctx.rank, ctx.world
    check_tensor_parallel(args, world)
    model.full_args, model.parallel = args, ctx
    if world == 1:
        return model
    tied = args.tie_word_embeddings
    for name, param in list(model.named_parameters()):
        if tied and name == "lm_head.weight":
            continue
        if param_slice(name, args, rank, world) is not None:
            _set_param(model, name, shard_tensor(name, param.data, args, rank, world))
    embed = model.model.embed_tokens
    rows = vocab_rows(args, world)
    model.model.embed_tokens = VocabParallelEmbedding(embed.weight, rank * rows, ctx)
    head_weight = model.model.embed_tokens.weight if tied else model.lm_head.weight
    model.lm_head = ParallelLMHead(head_weight, args.vocab_size, ctx)

    h = args.n_heads // world
    kv_first, kv_count = kv_heads_of(args, rank, world) if args.attention == "gqa" else (0, 0)
    for block in model.model.layers:
        attn = block.self_attn
        attn.n_heads = h
        if isinstance(attn, GQAttention):
            attn.n_kv_heads = kv_count
        assert isinstance(attn, (GQAttention, MLAttention))
        attn.o_proj.register_forward_hook(_all_reduce_output(ctx))
        if isinstance(block.mlp, MoE):
            per_rank = args.n_routed_experts // world
            block.mlp.gate.register_forward_hook(_local_experts(rank * per_rank, per_rank))
        else:
            assert isinstance(block.mlp, MLP)
        # dense MLP: its down_proj's partial sums; MoE: the local experts' plus the shared expert's share
        block.mlp.register_forward_hook(_all_reduce_output(ctx))
    model.args = args.replace(n_heads=h, n_kv_heads=kv_count if args.attention == "gqa" else args.n_kv_heads)
    return model


# ---------------------------------------------------------------------------------------------------
# sharded loading: each rank reads only its slices of the safetensors files
# ---------------------------------------------------------------------------------------------------
def routed_experts_of(args: ModelArgs, ctx: ParallelContext) -> range:
    per_rank = args.n_routed_experts // ctx.world
    return range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


def read_shard(f, raw_name: str, name: str, args: ModelArgs, ctx: ParallelContext) -> torch.Tensor:
    """Rank ctx.rank's part of file tensor `raw_name` (HF name `name`, a weight or its `_scale_inv`) from an
    open safetensors file `f`, read through `get_slice`: only those bytes leave the file. Per-expert file
    tensors are whole (the loader skips other ranks' experts)."""
    piece = None if ctx.world == 1 or ".mlp.experts." in name else param_slice(name, args, ctx.rank, ctx.world)
    if piece is None:
        return f.get_tensor(raw_name)
    if name.endswith("_scale_inv"):
        piece = piece.scale_slice(name[: -len("_scale_inv")])
    part = f.get_slice(raw_name)
    shape = part.get_shape()
    stop = min(piece.stop, shape[piece.axis])
    index = [slice(None)] * len(shape)
    index[piece.axis] = slice(piece.start, stop)
    t = part[tuple(index)]
    if piece.stop > stop:   # vocabulary padding rows of the last rank
        pad = list(t.shape)
        pad[piece.axis] = piece.stop - stop
        t = torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim=piece.axis)
    return t
