"""Tiny random DSA models, checkpoints and sample files for the calibration tests.

Same approach as tests/model/conftest.py (importlib mode: conftest files are not importable, so the
factories are fixtures). 16 indexer heads avoid exact top-k score ties.
"""
import json
import random

import pytest
import torch

from indexcache.checkpoint import save_checkpoint
from indexcache.config import ModelArgs
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


def random_model(family: str = "gqa", seed: int = 0, indexer_layers=None, **overrides) -> DSAForCausalLM:
    torch.manual_seed(seed)
    args = ModelArgs(**{**FAMILIES[family], **overrides})
    model = DSAForCausalLM(args, indexer_layers=indexer_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                # Larger than tests/model's 0.08 so attention is peaked and the top-k choice matters
                # for the loss: the search then has real differences to find.
                p.normal_(0, 0.3 if ".indexer." in name or "_proj" in name else 0.08)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(1.0, 0.1)
    return model.eval()


def random_token_lists(n: int, lengths=(24, 64), vocab: int = 97, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@pytest.fixture(params=["gqa", "mla"])
def family(request) -> str:
    return request.param


@pytest.fixture
def make_model():
    """make_model(family="gqa", seed=0, indexer_layers=None, **config_overrides) -> tiny random model."""
    return random_model


@pytest.fixture
def make_tokens():
    """make_tokens(n, lengths=(24, 64), vocab=97, seed=0) -> n random token-id lists."""
    return random_token_lists


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A saved tiny GQA checkpoint (8 layers) with its model: (dir, model)."""
    model = random_model("gqa", seed=1, n_layers=8)
    path = save_checkpoint(model, tmp_path / "ckpt")
    return path, model


@pytest.fixture
def write_samples(tmp_path):
    """write_samples(lines, name="samples.jsonl") -> path; dict lines are JSON-encoded, str lines written raw."""
    def write(lines, name="samples.jsonl"):
        path = tmp_path / name
        with open(path, "w") as f:
            for line in lines:
                f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
        return path
    return write


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
