"""Memory planner: what one replica of N GPUs holds per GPU, and how many tokens of KV cache fit.

`indexcache plan --model DIR | --config JSON --gpus N --gpu-memory 141GB --max-model-len L [--pattern ...]`

Weights per rank are counted, not estimated: the model is built on the meta device (no memory), its FP8
weights swapped for FP8 modules as the loader does (fp8.keep_fp8: e4m3 + fp32 128x128 block scales;
`kv_b_proj` dequantised to bf16), and sharded as rank 0 of N would be (parallel.shard_model): the sum
of its parameters' bytes is what the loader puts on that GPU.

KV bytes per token per rank, as KVCache allocates them: MLA one latent row (kv_lora_rank + rope dims)
per layer, the same on every rank (tensor parallelism splits heads, and MLA's latent is shared by all
heads: each rank keeps all of it); GQA k and v of the rank's kv heads per layer; plus, in F layers only,
one indexer key (index_head_dim e4m3 bytes + one fp32 scale with the FP8 indexer, the GPU default; the
indexer is replicated, so on every rank). S layers hold no indexer keys: that is the pattern's saving.

Free memory per rank = gpu_memory x utilization - weights - reserve (CUDA context, NCCL buffers, one
prefill chunk's activations, CUDA-graph pools); tokens = free / KV bytes per token.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ModelArgs
from .pattern import resolve_pattern, validate_pattern

GIB = 2 ** 30
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(GiB|GB|G|TiB|TB|MiB|MB)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GIB, "gb": 10 ** 9, "g": 10 ** 9, "tib": 2 ** 40, "tb": 10 ** 12, "mib": 2 ** 20, "mb": 10 ** 6,
          None: 10 ** 9}


def parse_size(text: str, field: str = "--gpu-memory") -> int:
    """'141GB' (10^9, as GPU vendors count), '80GiB', '141' (GB) -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{field}: {text!r} is not a size: write e.g. 141GB or 80GiB")
    unit = m.group(2).lower() if m.group(2) else None
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class Plan:
    model: str
    gpus: int
    gpu_memory: int               # bytes per GPU
    utilization: float
    reserve: int                  # bytes per GPU kept for activations, context, NCCL, graphs
    max_model_len: int
    pattern: str
    weights_per_rank: int         # bytes
    kv_per_token_all_f: int       # bytes per token per rank
    kv_per_token_pattern: int

    def free(self) -> int:
        return int(self.gpu_memory * self.utilization) - self.weights_per_rank - self.reserve

    def tokens(self, per_token: int) -> int:
        return max(self.free(), 0) // per_token

    def to_json(self) -> dict:
        all_f, pat = self.tokens(self.kv_per_token_all_f), self.tokens(self.kv_per_token_pattern)
        return {"model": self.model, "gpus": self.gpus, "gpu_memory_gb": self.gpu_memory / 1e9,
                "utilization": self.utilization, "reserve_gib": self.reserve / GIB,
                "weights_per_rank_gib": round(self.weights_per_rank / GIB, 2),
                "free_for_kv_gib": round(self.free() / GIB, 2), "pattern": self.pattern,
                "full_layers": self.pattern.count("F"), "layers": len(self.pattern),
                "kv_bytes_per_token_all_f": self.kv_per_token_all_f,
                "kv_bytes_per_token_pattern": self.kv_per_token_pattern,
                "tokens_all_f": all_f, "tokens_pattern": pat, "max_model_len": self.max_model_len,
                "sequences_at_max_len_all_f": all_f // self.max_model_len,
                "sequences_at_max_len_pattern": pat // self.max_model_len,
                "fits": self.free() > 0 and pat >= self.max_model_len}


def weights_per_rank(args: ModelArgs, world: int, fp8: bool, dtype_bytes: int = 2) -> int:
    """Bytes of rank 0's parameters (the most any rank holds) after FP8 swap and sharding."""
    import torch

    from .dsa import DSAForCausalLM
    from .fp8 import FP8_CHECKPOINT_WEIGHTS, keep_fp8
    from .parallel import ParallelContext, shard_model

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DSAForCausalLM(args)
    finally:
        torch.set_default_dtype(default)
    if fp8:   # the names a DeepSeek-V3.2 / GLM-5 FP8 release stores e4m3 (routed experts: one per expert)
        names = set()
        for name in model.state_dict(keep_vars=True):
            m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
            if m:
                names |= {f"{m.group(1)}.{e}.{w}.weight" for e in range(args.n_routed_experts)
                          for w in ("gate_proj", "up_proj", "down_proj")}
            elif FP8_CHECKPOINT_WEIGHTS.match(name):
                names.add(name)
        keep_fp8(model, names)
    shard_model(model, ParallelContext(rank=0, world=world))
    return sum(p.numel() * p.element_size() for p in model.state_dict(keep_vars=True).values()) - (
        0 if not args.tie_word_embeddings else model.lm_head.weight.numel() * model.lm_head.weight.element_size())


def kv_bytes_per_token(args: ModelArgs, world: int, pattern: str, dtype_bytes: int = 2,
                       indexer_fp8: bool = True) -> int:
    """KV cache bytes per token on one rank, as KVCache allocates them."""
    from .parallel import check_tensor_parallel, kv_heads_of
    check_tensor_parallel(args, world)
    if args.attention == "mla":
        per_layer = (args.kv_lora_rank + args.qk_rope_head_dim) * dtype_bytes
    else:
        kv_heads = kv_heads_of(args, 0, world)[1]
        per_layer = 2 * kv_heads * args.head_dim * dtype_bytes
    indexer_key = args.index_head_dim + 4 if indexer_fp8 else args.index_head_dim * dtype_bytes
    return args.n_layers * per_layer + pattern.count("F") * indexer_key


def plan(args: ModelArgs, *, name: str, gpus: int, gpu_memory: int, max_model_len: int, pattern: str | None = None,
         fp8: bool = True, utilization: float = 0.9, reserve: int = 4 * GIB) -> Plan:
    pattern = pattern or args.pattern
    validate_pattern(pattern, args.n_layers)
    if not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if max_model_len > args.max_seq_len:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                         f"({args.max_seq_len})")
    return Plan(model=name, gpus=gpus, gpu_memory=gpu_memory, utilization=utilization, reserve=reserve,
                max_model_len=max_model_len, pattern=pattern, weights_per_rank=weights_per_rank(args, gpus, fp8),
                kv_per_token_all_f=kv_bytes_per_token(args, gpus, "F" * args.n_layers),
                kv_per_token_pattern=kv_bytes_per_token(args, gpus, pattern))


def load_config(model: str | None, config: str | None) -> tuple[ModelArgs, str, bool]:
    """(args, name, whether the checkpoint stores FP8 weights) from a model directory or a config.json."""
    path = Path(config) if config else Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give --model DIR (with config.json) or --config FILE")
    raw = json.loads(path.read_text())
    fp8 = (raw.get("quantization_config") or {}).get("quant_method") == "fp8"
    return ModelArgs.from_hf_config(raw), raw.get("_name", path.parent.name if not config else path.stem), fp8


def table(plans: list[Plan]) -> str:
    """A markdown table of plans."""
    head = ("| model | GPUs | weights / GPU | free for KV / GPU | KV / token all-F | KV / token pattern (F layers) "
            "| tokens all-F | tokens pattern | sequences at max len (all-F / pattern) |")
    rows = [head, "|" + "---|" * 9]
    for p in plans:
        j = p.to_json()
        rows.append(f"| {p.model} | {p.gpus} x {p.gpu_memory / 1e9:.0f} GB | {j['weights_per_rank_gib']:.1f} GiB "
                    f"| {j['free_for_kv_gib']:.1f} GiB | {p.kv_per_token_all_f:,} B | {p.kv_per_token_pattern:,} B "
                    f"({j['full_layers']}/{j['layers']}) | {j['tokens_all_f']:,} | {j['tokens_pattern']:,} "
                    f"| {j['sequences_at_max_len_all_f']} / {j['sequences_at_max_len_pattern']} at {p.max_model_len:,} |")
    return "\n".join(rows)


def main_plan(a) -> int:
    args, name, fp8 = load_config(a.model, a.config)
    if a.fp8 is not None:
        fp8 = a.fp8 == "keep"
    pattern = a.pattern or (resolve_pattern(args.n_layers, freq=a.freq, offset=2 if a.offset is None else a.offset)
                            if a.freq else None)
    p = plan(args, name=name, gpus=a.gpus, gpu_memory=parse_size(a.gpu_memory), max_model_len=a.max_model_len,
             pattern=pattern, fp8=fp8, utilization=a.gpu_memory_utilization,
             reserve=parse_size(a.reserve, "--reserve"))
    print(json.dumps(p.to_json(), indent=1) if a.json else table([p]))
    return 0 if p.to_json()["fits"] else 1


def add_plan_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (its config.json is read; no weights)")
    src.add_argument("--config", help="an HF config.json")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per replica (gpusPerReplica, the tensor-parallel size)")
    p.add_argument("--gpu-memory", required=True, help="memory per GPU, e.g. 141GB (H200) or 80GB")
    p.add_argument("--max-model-len", type=int, required=True, help="longest sequence a request may reach")
    p.add_argument("--pattern", help="IndexCache F/S pattern (default: the checkpoint's)")
    p.add_argument("--freq", type=int, help="or: index_topk_freq (every freq-th layer F after the offset)")
    p.add_argument("--offset", type=int, help="index_skip_topk_offset with --freq (default 2)")
    p.add_argument("--fp8", choices=("keep", "dequantize"), help="FP8 weights kept e4m3 or dequantised "
                   "(default: keep when config.json has an fp8 quantization_config)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of each GPU's memory to use")
    p.add_argument("--reserve", default="4GiB", help="per GPU, for activations, CUDA context, NCCL and graphs")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
