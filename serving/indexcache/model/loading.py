"""Which model a replica serves: 'tiny' (random demo), 'smollm2' (the bundled DSA checkpoint) or a
checkpoint directory, loaded with its tokenizer and default IndexCache pattern."""

from pathlib import Path


def bundled_model_dir() -> Path:
    """The SmolLM2 DSA checkpoint: packaged GGUF + bundled trained indexer, converted once and cached."""
    from ..offline.smollm2 import bundled_checkpoint
    return bundled_checkpoint()


def load_model(model: str, dtype: str = "float32"):
    """'tiny' | 'smollm2' | a checkpoint directory -> (model, default pattern, tokenizer, name)."""
    import torch

    if model == "tiny":
        from .tiny import TINY_MODEL_NAME, CharTokenizer, tiny_model
        m = tiny_model(seed=0)
        return m, m.default_pattern, CharTokenizer(), TINY_MODEL_NAME
    from .checkpoint import load_checkpoint
    from .tokenizer import load_tokenizer
    path = bundled_model_dir() if model == "smollm2" else Path(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, pattern = load_checkpoint(path, dtype=getattr(torch, dtype), device=device)
    return m, pattern, load_tokenizer(path), ("smollm2-dsa" if model == "smollm2" else path.name)
