"""Tiny random DSA models in both attention families, shared by the test directories.

(pytest runs with --import-mode=importlib, so conftest files cannot be imported; tests/conftest.py puts
this directory on sys.path instead.) 16 indexer heads make exact top-k score ties (every head's ReLU at
zero) practically impossible, so top-k sets are well defined and comparisons are exact.
"""
import torch

from indexcache.model.config import ModelArgs
from indexcache.model import DSAForCausalLM

TINY_GQA = dict(model_type="llama_dsa", vocab_size=97, dim=64, n_layers=6, max_seq_len=256, n_heads=4,
                n_kv_heads=2, head_dim=16, inter_dim=96, index_n_heads=16, index_head_dim=16,
                index_rope_head_dim=8, index_topk=8, eos_token_id=1)
TINY_MLA = dict(model_type="deepseek_v32", vocab_size=97, dim=64, n_layers=6, max_seq_len=256, n_heads=4,
                q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                inter_dim=96, moe_inter_dim=32, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, first_k_dense=1, route_scale=2.5, index_n_heads=16,
                index_head_dim=16, index_rope_head_dim=8, index_topk=8, eos_token_id=1)
FAMILIES = {"gqa": TINY_GQA, "mla": TINY_MLA}


def random_model(family: str = "gqa", seed: int = 0, indexer_layers=None, projection_std: float = 0.08,
                 **overrides) -> DSAForCausalLM:
    """A tiny model with seeded random weights. projection_std: std of the attention and indexer
    projections (a larger one makes attention peaked, so the top-k choice matters for the loss)."""
    torch.manual_seed(seed)
    args = ModelArgs(**{**FAMILIES[family], **overrides})
    model = DSAForCausalLM(args, indexer_layers=indexer_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, projection_std if ".indexer." in name or "_proj" in name else 0.08)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(1.0, 0.1)
    return model.eval()
