"""The model: the DSA transformer with IndexCache (`dsa.py`), its config, the F/S pattern rule,
checkpoints, tokenizers and the tiny test model. `from indexcache.model import DSAForCausalLM` is the
public entry point; the names below are the ones callers use.

The names are loaded from `dsa` on first use (PEP 562), so that `indexcache.model.storage` (what
`indexcache fetch` runs in every init container) imports without torch."""

__all__ = ["Capture", "DSAForCausalLM", "ForwardContext", "KVCache", "apply_rope", "causal_mask",
           "dense_attention", "rope_frequencies", "select_indices", "write_and_read"]


def __getattr__(name: str):
    if name in __all__:
        from . import dsa
        return getattr(dsa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
