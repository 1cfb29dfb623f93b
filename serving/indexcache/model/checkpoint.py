"""Load and save HF-format checkpoint directories: config.json + safetensors (single or sharded).

Tensor names: the Hugging Face names used by DeepSeek-V3.2 and GLM-5 (`glm_moe_dsa`) releases
(`model.layers.{i}.self_attn.q_a_proj.weight`, `...self_attn.indexer.wq_b.weight`, ...) and DeepSeek's
own `inference/` names (`layers.{i}.attn.wq_a.weight`, ...). FP8 block-quantised weights
(`weight_scale_inv`, 128x128 blocks) are dequantised on load. Multi-token-prediction layers beyond
`num_hidden_layers` are ignored. A checkpoint whose shared layers carry no indexer weights (GLM-5.2)
loads when the pattern marks those layers S.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelArgs
from .dsa import DSAForCausalLM
from .pattern import resolve_pattern

# One table of name pairs, (DeepSeek inference/ name, HF name); both rename directions are built from it.
# Whole names first, then the parts after `layers.{i}.` / `model.layers.{i}.`; {e} stands for the expert
# prefix (`experts.{j}.`, `shared_experts.` or nothing), which both namings keep.
_WHOLE_NAMES = [("embed.weight", "model.embed_tokens.weight"), ("head.weight", "lm_head.weight"),
                ("norm.weight", "model.norm.weight")]
_LAYER_PARTS = [
    ("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
    ("attn.indexer.", "self_attn.indexer."), ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_layernorm."), ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."), ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.{e}w1.", "mlp.{e}gate_proj."), ("ffn.{e}w3.", "mlp.{e}up_proj."), ("ffn.{e}w2.", "mlp.{e}down_proj."),
]
_EXPERT_PREFIX = r"(experts\.\d+\.|shared_experts\.|)"


def _rename_table(src: int, layer_src: str, layer_dst: str) -> list[tuple[str, str]]:
    """Regex rules renaming side `src` (0 DeepSeek, 1 HF) of the pairs into the other side."""
    dst = 1 - src
    table = [("^" + re.escape(pair[src]) + "$", pair[dst]) for pair in _WHOLE_NAMES]
    for pair in _LAYER_PARTS:
        pattern = "^" + layer_src + re.escape(pair[src]).replace(re.escape("{e}"), _EXPERT_PREFIX)
        table.append((pattern, layer_dst + pair[dst].replace("{e}", r"\2")))
    return table


_DEEPSEEK_TO_HF = _rename_table(0, r"layers\.(\d+)\.", r"model.layers.\1.")
_HF_TO_DEEPSEEK = _rename_table(1, r"model\.layers\.(\d+)\.", r"layers.\1.")  # writing test checkpoints
_INDEXER_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
FP8_BLOCK = 128


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def to_hf_name(name: str) -> str:
    return name if name.startswith(("model.", "lm_head.")) else _rename(name, _DEEPSEEK_TO_HF)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or model.safetensors.index.json) in {path}")
    return files


def read_state_dict(path: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """All tensors under HF names, FP8 blocks dequantised, MTP layers (>= n_layers) dropped."""
    raw: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                raw[to_hf_name(name)] = f.get_tensor(name)
    state = {}
    for name, tensor in raw.items():
        m = _LAYER_RE.match(name)
        if (m and int(m.group(1)) >= n_layers) or name.endswith("weight_scale_inv"):
            continue
        scale = raw.get(name + "_scale_inv") if name.endswith(".weight") else None
        if scale is not None:
            tensor = dequant_fp8_blocks(tensor, scale)
        state[name] = tensor
    return state


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight (M, N) fp8 with one fp32 scale per 128x128 block (ceil(M/128), ceil(N/128)) -> fp32."""
    m, n = weight.shape
    full = scale.float().repeat_interleave(FP8_BLOCK, 0)[:m].repeat_interleave(FP8_BLOCK, 1)[:, :n]
    return weight.float() * full


def load_checkpoint(path: str | Path, *, pattern: str | None = None, freq: int | None = None,
                    offset: int | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", extra_state: dict[str, torch.Tensor] | None = None
                    ) -> tuple[DSAForCausalLM, str]:
    """Build the model from a checkpoint directory. Returns (model, the IndexCache pattern to run).

    The pattern is `pattern` if given, else resolved from `freq`/`offset` if given, else the
    checkpoint's own (config keys). `extra_state` overrides tensors (e.g. trained indexer weights).
    """
    path = Path(path)
    args = ModelArgs.from_dir(path)
    if pattern is None and (freq is not None or offset is not None):
        pattern = resolve_pattern(args.n_layers, freq=freq or 1, offset=offset or args.index_skip_topk_offset)
    state = read_state_dict(path, args.n_layers)
    if extra_state:
        state.update(extra_state)
    indexer_layers = {int(m.group(1)) for name in state if (m := _INDEXER_RE.match(name))}
    model = DSAForCausalLM(args, indexer_layers=indexer_layers)
    run_pattern = model.check_pattern(pattern or args.pattern)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if args.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config.json: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, tensor in state.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype).eval(), run_pattern


def save_checkpoint(model: DSAForCausalLM, path: str | Path, *, naming: str = "hf",
                    max_shard_bytes: int | None = None, drop_indexers: set[int] = frozenset(),
                    config_overrides: dict | None = None) -> Path:
    """Write the model as config.json + safetensors (sharded with an index when over max_shard_bytes)."""
    if naming not in ("hf", "deepseek"):
        raise ValueError("naming must be 'hf' or 'deepseek'")
    config = model.args.to_hf_config()
    config.update(config_overrides or {})
    tensors = {}
    for name, tensor in model.state_dict().items():
        m = _INDEXER_RE.match(name)
        if (m and int(m.group(1)) in drop_indexers) or (model.args.tie_word_embeddings and name == "lm_head.weight"):
            continue
        out_name = _rename(name, _HF_TO_DEEPSEEK) if naming == "deepseek" else name
        tensors[out_name] = tensor.detach().contiguous().cpu()
    return write_checkpoint(path, config, tensors, max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: str | Path, config: dict, tensors: dict[str, torch.Tensor], *,
                     metadata: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """The one checkpoint writer (save_checkpoint for a built model; `convert smollm2` for tensors it
    converted without building one): config.json + model.safetensors, or shards + an index when over
    max_shard_bytes. Each file is written under a temporary name and renamed, so an interrupted run
    never leaves a truncated checkpoint file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    if max_shard_bytes is None:
        _save_atomic(tensors, path / "model.safetensors", metadata)
    else:
        shards, current, size = [], {}, 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_atomic(shard, path / file, metadata)
            weight_map.update({name: file for name in shard})
        _write_text_atomic(path / "model.safetensors.index.json",
                           json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    _write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return path


def _save_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(file)
