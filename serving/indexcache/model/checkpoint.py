"""Load and save HF-format checkpoint directories: config.json + safetensors (single or sharded).

Tensor names: the Hugging Face names used by DeepSeek-V3.2 and GLM-5 (`glm_moe_dsa`) releases
(`model.layers.{i}.self_attn.q_a_proj.weight`, `...self_attn.indexer.wq_b.weight`, ...) and DeepSeek's
own `inference/` names (`layers.{i}.attn.wq_a.weight`, ...). FP8 block-quantised weights (e4m3 with a
`weight_scale_inv`, DeepSeek's `scale`, of 128x128 blocks) stay FP8 in memory (`fp8="keep"`, the default:
fp8.py swaps in FP8 modules; `kv_b_proj` alone is dequantised, see fp8.py) or are dequantised to the
model dtype on load (`fp8="dequantize"`). Loading streams one tensor at a time from
the shards straight into the model's parameters (built without memory, in the target dtype on the target
device), so host memory never holds the whole state dict; the loader reports its peak host memory and the
weight memory, kept and as it would be dequantised.
Routed experts are stored one matrix per expert in the files and stacked per layer in the model
(`mlp.experts.gate_up_proj` (E, 2I, D), `mlp.experts.down_proj` (E, D, I), FP8 scales likewise:
`mlp.experts.gate_up_proj_scale_inv`, `mlp.experts.down_proj_scale_inv`). Multi-token-prediction layers beyond
`num_hidden_layers` are ignored. A checkpoint whose shared layers carry no indexer weights (GLM-5.2)
loads when the pattern marks those layers S.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelArgs
from .dsa import DSAForCausalLM
from .fp8 import keep_fp8, weight_bytes
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
# one routed expert's matrix (or its FP8 block scale) in a file: (layer prefix, expert, which, scale)
_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
FP8_BLOCK = 128
FP8_MODES = ("keep", "dequantize")
log = logging.getLogger(__name__)


def expert_target(name: str, inter_dim: int) -> tuple[str, int, slice] | None:
    """Where a per-expert file tensor goes in the stacked model parameter: (parameter name, expert, rows).
    FP8 scales go to the stacked scales, gate_proj's block rows then up_proj's (fp8.FP8Experts)."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    prefix, e, which, scale = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    if which == "down_proj":
        return f"{prefix}.down_proj{scale}", e, slice(None)
    rows = -(-inter_dim // FP8_BLOCK) if scale else inter_dim       # gate's rows (or row blocks) come first
    return f"{prefix}.gate_up_proj{scale}", e, slice(0, rows) if which == "gate_proj" else slice(rows, 2 * rows)


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stacked expert parameters (and FP8 scales) of a model state dict as per-expert tensors under the
    files' names."""
    out = {}
    for name, tensor in state.items():
        m = re.match(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)(_scale_inv)?$", name)
        if m is None:
            out[name] = tensor
            continue
        base, which, scale = m.group(1), m.group(2), m.group(3) or ""
        for e in range(tensor.shape[0]):
            if which == "down_proj":
                out[f"{base}{e}.down_proj.weight{scale}"] = tensor[e].clone()
            else:
                half = tensor.shape[1] // 2                              # rows, or row blocks of the scales
                out[f"{base}{e}.gate_proj.weight{scale}"] = tensor[e, :half].clone()
                out[f"{base}{e}.up_proj.weight{scale}"] = tensor[e, half:].clone()
    return out


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def to_hf_name(name: str) -> str:
    if name.startswith(("model.", "lm_head.")):
        return name
    if name.endswith(".scale"):           # DeepSeek inference/ naming of a weight's FP8 block scales
        return _rename(name[: -len("scale")] + "weight", _DEEPSEEK_TO_HF) + "_scale_inv"
    return _rename(name, _DEEPSEEK_TO_HF)


def to_deepseek_name(name: str) -> str:
    if name.endswith(".weight_scale_inv"):
        return _rename(name[: -len("_scale_inv")], _HF_TO_DEEPSEEK)[: -len("weight")] + "scale"
    return _rename(name, _HF_TO_DEEPSEEK)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or model.safetensors.index.json) in {path}")
    return files


def checkpoint_entries(path: Path, n_layers: int) -> dict[str, tuple[Path, str, str | None]]:
    """HF name -> (file, name in the file, name of its FP8 block scale or None), from the shard headers
    alone (nothing is read). MTP layers (>= n_layers) and the scales themselves are left out."""
    names: dict[str, tuple[Path, str]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                names[to_hf_name(name)] = (file, name)
    entries = {}
    for name, (file, raw_name) in names.items():
        m = _LAYER_RE.match(name)
        if (m and int(m.group(1)) >= n_layers) or name.endswith("weight_scale_inv"):
            continue
        scale = names.get(name + "_scale_inv") if name.endswith(".weight") else None
        if scale is not None and scale[0] != file:
            raise ValueError(f"{name}: its weight_scale_inv is in {scale[0].name}, not beside it in {file.name}")
        entries[name] = (file, raw_name, scale[1] if scale else None)
    return entries


def read_state_dict(path: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """All tensors under HF names (per expert, as in the files), FP8 blocks dequantised (tools and tests;
    the model loader streams instead)."""
    state = {}
    for name, (file, raw_name, scale_name) in checkpoint_entries(path, n_layers).items():
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(raw_name)
            state[name] = dequant_fp8_blocks(tensor, f.get_tensor(scale_name)) if scale_name else tensor
    return state


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight (M, N) fp8 with one fp32 scale per 128x128 block (ceil(M/128), ceil(N/128)) -> fp32."""
    m, n = weight.shape
    full = scale.float().repeat_interleave(FP8_BLOCK, 0)[:m].repeat_interleave(FP8_BLOCK, 1)[:, :n]
    return weight.float() * full


def load_checkpoint(path: str | Path, *, pattern: str | None = None, freq: int | None = None,
                    offset: int | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", extra_state: dict[str, torch.Tensor] | None = None,
                    fp8: str = "keep", parallel=None) -> tuple[DSAForCausalLM, str]:
    """Build the model from a checkpoint directory. Returns (model, the IndexCache pattern to run).

    The pattern is `pattern` if given, else resolved from `freq`/`offset` if given, else the
    checkpoint's own (config keys). `extra_state` overrides tensors (e.g. trained indexer weights).
    dtype: the weights' dtype; default bf16 on CUDA, fp32 on the CPU. fp8: what happens to FP8
    block-scaled weights: "keep" (e4m3 + fp32 block scales in memory, FP8 GEMMs; fp8.py) or "dequantize"
    (to dtype at load). Tensors stream one at a time from the shards into the parameters;
    `model.load_stats` holds the seconds, the peak host memory and the weight memory (`weights_mib`, and
    `weights_mib_dequantized`: what the same weights take with every FP8 one dequantised to dtype).
    parallel: a parallel.ParallelContext: build rank parallel.rank's shard (parallel.shard_model) and read
    only its slices of the files (its heads, FFN columns, experts, vocabulary rows; FP8 scales with them).
    """
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8={fp8!r}: use 'keep' (FP8 weights stay e4m3 in memory) or 'dequantize'")
    t0 = time.monotonic()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = Path(path)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args = ModelArgs.from_dir(path)
    if pattern is None and (freq is not None or offset is not None):
        pattern = resolve_pattern(args.n_layers, freq=freq or 1, offset=offset or args.index_skip_topk_offset)
    entries = checkpoint_entries(path, args.n_layers)
    extra_state = dict(extra_state or {})
    provided = set(entries) | set(extra_state)
    indexer_layers = {int(m.group(1)) for name in provided if (m := _INDEXER_RE.match(name))}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)      # parameters are born in the target dtype, without memory
    try:
        with torch.device("meta"):
            model = DSAForCausalLM(args, indexer_layers=indexer_layers)
    finally:
        torch.set_default_dtype(default)
    run_pattern = model.check_pattern(pattern or args.pattern)
    kept_fp8: set[str] = set()          # file weights loaded as e4m3 with their scales (FP8 modules)
    if fp8 == "keep":
        kept_fp8 = keep_fp8(model, {n for n, e in entries.items() if e[2] is not None and n not in extra_state})
    tp = parallel is not None and parallel.world > 1
    if tp:   # slice the (meta) parameters; keep only this rank's routed experts among the file tensors
        from .parallel import routed_experts_of, shard_model
        shard_model(model, parallel)
        mine = routed_experts_of(args, parallel)
        entries = {n: e for n, e in entries.items() if (t := expert_target(n, args.moe_inter_dim)) is None or t[1] in mine}
        extra_state = {n: e for n, e in extra_state.items() if (t := expert_target(n, args.moe_inter_dim)) is None or t[1] in mine}
        kept_fp8 = {n for n in kept_fp8 if n in entries}
    params = model.state_dict(keep_vars=True)
    if args.tie_word_embeddings:   # lm_head is embed_tokens: a file's lm_head.weight is not read
        params.pop("lm_head.weight", None)
        entries.pop("lm_head.weight", None)
        extra_state.pop("lm_head.weight", None)
    # every file tensor (and kept FP8 scale) maps to one parameter (or one expert's rows of a stacked one):
    # check names first
    sources = set(entries) | set(extra_state) | {name + "_scale_inv" for name in kept_fp8}
    targets = {}
    for name in sources:
        target = expert_target(name, args.moe_inter_dim)
        if target is not None and tp:   # stacked rank-locally: expert e is row e - first
            target = (target[0], target[1] - mine.start, target[2])
        targets[name] = target if target is not None else (name, None, None)
    covered = {t[0] for t in targets.values()}
    missing = sorted(set(params) - covered)
    unexpected = sorted(name for name, t in targets.items() if t[0] not in params)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config.json: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = model.state_dict(keep_vars=True)
    if args.tie_word_embeddings:   # filled through embed_tokens, the same tensor
        params.pop("lm_head.weight", None)
    filled: dict[str, int] = {}
    if tp:
        from .parallel import read_shard, shard_tensor

        def read(f, raw_name, name):
            return read_shard(f, raw_name, name, args, parallel)
    else:
        def read(f, raw_name, name):
            return f.get_tensor(raw_name)
    with torch.no_grad():
        def put(name: str, tensor: torch.Tensor) -> None:
            pname, expert, rows = targets[name]
            param = params[pname]
            dst = param if expert is None else param[expert, rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[pname] = filled.get(pname, 0) + tensor.numel()

        by_file: dict[Path, list[str]] = {}
        for name, (file, _, _) in entries.items():
            if name not in extra_state:
                by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    _, raw_name, scale_name = entries[name]
                    tensor = read(f, raw_name, name)
                    if name in kept_fp8:
                        put(name + "_scale_inv", read(f, scale_name, name + "_scale_inv"))
                    elif scale_name is not None:
                        tensor = dequant_fp8_blocks(tensor, read(f, scale_name, name + "_scale_inv"))
                    put(name, tensor)
        for name, tensor in extra_state.items():
            put(name, tensor if not tp or ".mlp.experts." in name else shard_tensor(name, tensor, args, parallel.rank, parallel.world))
    partial = sorted(n for n, p in params.items() if filled.get(n, 0) != p.numel())
    if partial:
        raise ValueError(f"checkpoint {path}: tensors {partial[:8]} are only partly given "
                         f"(e.g. some routed experts are missing)")
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = weight_bytes(model, dtype)
    model.load_stats = {"seconds": time.monotonic() - t0, "peak_host_rss_mib": rss1 / 1024,
                        "host_rss_growth_mib": (rss1 - rss0) / 1024, "fp8": fp8,
                        "weights_mib": memory["weights"] / 2 ** 20,
                        "weights_mib_dequantized": memory["dequantized"] / 2 ** 20,
                        "fp8_weights_mib": memory["fp8"] / 2 ** 20}
    log.info("loaded %s: %.0f MiB of weights (%s on %s; %.0f MiB of them FP8, %.0f MiB dequantised) in %.1f s, "
             "peak host memory %.0f MiB", path, model.load_stats["weights_mib"], dtype, device,
             model.load_stats["fp8_weights_mib"], model.load_stats["weights_mib_dequantized"],
             model.load_stats["seconds"], rss1 / 1024)
    return model.eval(), run_pattern


def save_checkpoint(model: DSAForCausalLM, path: str | Path, *, naming: str = "hf",
                    max_shard_bytes: int | None = None, drop_indexers: set[int] = frozenset(),
                    config_overrides: dict | None = None) -> Path:
    """Write the model as config.json + safetensors (sharded with an index when over max_shard_bytes).
    A model loaded with FP8 weights kept writes them back as they came: e4m3 + weight_scale_inv."""
    if naming not in ("hf", "deepseek"):
        raise ValueError("naming must be 'hf' or 'deepseek'")
    config = model.args.to_hf_config()
    config.update(config_overrides or {})
    tensors = {}
    for name, tensor in split_experts(model.state_dict()).items():
        m = _INDEXER_RE.match(name)
        if (m and int(m.group(1)) in drop_indexers) or (model.args.tie_word_embeddings and name == "lm_head.weight"):
            continue
        out_name = to_deepseek_name(name) if naming == "deepseek" else name
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
