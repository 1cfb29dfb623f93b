"""The model: the DSA transformer with IndexCache (`dsa.py`), its config, the F/S pattern rule,
checkpoints, tokenizers and the tiny test model. `from indexcache.model import DSAForCausalLM` is the
public entry point; the names below are the ones callers use."""

from .dsa import (Capture, DSAForCausalLM, ForwardContext, KVCache, apply_rope, causal_mask, dense_attention,
                  rope_frequencies, select_indices, write_and_read)

__all__ = ["Capture", "DSAForCausalLM", "ForwardContext", "KVCache", "apply_rope", "causal_mask",
           "dense_attention", "rope_frequencies", "select_indices", "write_and_read"]
