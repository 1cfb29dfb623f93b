"""Which model a replica serves: 'tiny' (random demo), 'smollm2' (the bundled DSA checkpoint), a
checkpoint directory or a model URI (hf://, s3://, http(s)://, pvc://; see storage.py), loaded with its
tokenizer and default IndexCache pattern."""

from pathlib import Path


def bundled_model_dir() -> Path:
    """The SmolLM2 DSA checkpoint: packaged GGUF + bundled trained indexer, converted once and cached."""
    from ..offline.smollm2 import bundled_checkpoint
    return bundled_checkpoint()


def load_tokenizer_of(model: str, cache_dir: str | None = None):
    """The tokenizer and served name of `model` without its weights (a sharded replica's workers load those)."""
    if model == "tiny":
        from .tiny import TINY_MODEL_NAME, CharTokenizer
        return CharTokenizer(), TINY_MODEL_NAME
    from .storage import resolve
    from .tokenizer import load_tokenizer
    resolved = resolve(model, cache_dir)
    return load_tokenizer(resolved.path), resolved.name


def load_model(model: str, dtype: str = "auto", cache_dir: str | None = None, fp8: str = "keep"):
    """'tiny' | 'smollm2' | a checkpoint directory | a model URI -> (model, default pattern, tokenizer, name).
    cache_dir: the model cache (default INDEXCACHE_MODEL_CACHE); on Kubernetes the init container has
    filled it and INDEXCACHE_OFFLINE=1 keeps the replica from downloading anything itself.
    fp8: FP8 block-scaled checkpoint weights "keep" (e4m3 in memory) or "dequantize" (to dtype at load)."""
    import torch

    if model == "tiny":
        from .tiny import TINY_MODEL_NAME, CharTokenizer, tiny_model
        m = tiny_model(seed=0)
        return m, m.default_pattern, CharTokenizer(), TINY_MODEL_NAME
    from .checkpoint import load_checkpoint
    from .storage import resolve
    from .tokenizer import load_tokenizer
    resolved = resolve(model, cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # "auto": bf16 weights on CUDA; on the CPU whichever of bf16 and fp32 multiplies faster (cpu_dtype.py)
    if device == "cpu":
        from .cpu_dtype import resolve_cpu_dtype
        torch_dtype = resolve_cpu_dtype(dtype)
    else:
        torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    m, pattern = load_checkpoint(resolved.path, dtype=torch_dtype, device=device, fp8=fp8)
    return m, pattern, load_tokenizer(resolved.path), resolved.name
