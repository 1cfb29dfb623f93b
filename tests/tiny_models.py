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


# ---------------------------------------------------------------------------------------------------
# A DeepSeek-V3.2-shaped FP8 checkpoint, tiny
# ---------------------------------------------------------------------------------------------------
# DeepSeek-V3.2's config.json (deepseek-ai/DeepSeek-V3.2, as released) with only the widths cut: the real
# layer count, MoE routing (256 experts, top-8 within 4 of 8 groups, the first 3 layers dense, one
# shared expert), MLA with a query LoRA, the indexer's heads and top-k, yarn RoPE, FP8 quantization_config.
# Widths (real in brackets) are small enough for a CPU forward in a second, and chosen so that many FP8
# weights span several 128x128 blocks with ragged edges: q_b_proj 160 rows, o_proj 160 columns,
# indexer.wq_b 1024 rows, the dense MLP 200 rows / columns.
V32_FP8_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "torch_dtype": "bfloat16",
    "vocab_size": 1024, "bos_token_id": 0,   # [129280]
    "eos_token_id": 1, "tie_word_embeddings": False,
    "hidden_size": 32,                  # [7168]
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 4096},
    # mla
    "num_attention_heads": 4, "num_key_value_heads": 4,   # [128, 128]
    "q_lora_rank": 24, "kv_lora_rank": 16,               # [1536, 512]
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 8, "v_head_dim": 40,   # [128, 64, 128]
    # ffn / moe
    "intermediate_size": 200, "moe_intermediate_size": 8,   # [18432, 2048]
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "ep_size": 1,
    # index
    "index_n_heads": 64, "index_head_dim": 16, "index_topk": 2048,   # [64, 128, 2048]
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def v32_checkpoint_tensors(cfg: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor DeepSeek-V3.2's safetensors index lists, under its name, at `cfg`'s widths, as
    {name: (float values, stored dtype)} with stored dtype "fp8" (e4m3 + weight_scale_inv), "bf16" or
    "fp32" as in the release. Layer num_hidden_layers is the multi-token-prediction layer (its extra
    tensors too), which a loader must skip."""
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    heads, nope, rope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_lora, kv_lora = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
    E, moe_inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]

    def weights(n, rows, cols, spread=True):
        """n random (rows, cols) matrices with fan-in scaling; each 128x128 block x 2^-1..2^1 (`spread`), so
        that a scale applied to the wrong block changes the numbers."""
        w = torch.randn(n, rows, cols, generator=g) * cols ** -0.5
        if spread:
            mag = 2.0 ** torch.randint(-1, 2, (n, -(-rows // 128), -(-cols // 128)), generator=g).float()
            for (i, j), block in _blocks_of(w):
                block *= mag[:, i, j, None, None]
        return w

    def weight(rows, cols, spread=True):
        return weights(1, rows, cols, spread)[0]

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    out = {"model.embed_tokens.weight": (torch.randn(V, H, generator=g), "bf16"),
           "model.norm.weight": (norm(H), "fp32"),
           "lm_head.weight": (weight(V, H, spread=False), "bf16")}
    for i in range(cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (norm(H), "fp32"),
            "post_attention_layernorm.weight": (norm(H), "fp32"),
            "self_attn.q_a_proj.weight": (weight(q_lora, H), "fp8"),
            "self_attn.q_a_layernorm.weight": (norm(q_lora), "fp32"),
            "self_attn.q_b_proj.weight": (weight(heads * (nope + rope), q_lora), "fp8"),
            "self_attn.kv_a_proj_with_mqa.weight": (weight(kv_lora + rope, H), "fp8"),
            "self_attn.kv_a_layernorm.weight": (norm(kv_lora), "fp32"),
            "self_attn.kv_b_proj.weight": (weight(heads * (nope + v), kv_lora), "fp8"),
            "self_attn.o_proj.weight": (weight(H, heads * v), "fp8"),
            "self_attn.indexer.wq_b.weight": (weight(ih * idim, q_lora), "fp8"),
            "self_attn.indexer.wk.weight": (weight(idim, H), "fp8"),
            "self_attn.indexer.k_norm.weight": (norm(idim), "fp32"),
            "self_attn.indexer.k_norm.bias": (0.1 * torch.randn(idim, generator=g), "fp32"),
            "self_attn.indexer.weights_proj.weight": (weight(ih, H, spread=False), "bf16"),
        }
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            layer.update({"mlp.gate_proj.weight": (weight(inter, H), "fp8"), "mlp.up_proj.weight": (weight(inter, H), "fp8"),
                          "mlp.down_proj.weight": (weight(H, inter), "fp8")})
        else:
            layer.update({"mlp.gate.weight": (weight(E, H, spread=False), "bf16"),
                          "mlp.gate.e_score_correction_bias": (0.05 * torch.randn(E, generator=g), "fp32")})
            shared = moe_inter * cfg["n_shared_experts"]
            layer.update({"mlp.shared_experts.gate_proj.weight": (weight(shared, H), "fp8"),
                          "mlp.shared_experts.up_proj.weight": (weight(shared, H), "fp8"),
                          "mlp.shared_experts.down_proj.weight": (weight(H, shared), "fp8")})
            stacks = {"gate_proj": weights(E, moe_inter, H), "up_proj": weights(E, moe_inter, H),
                      "down_proj": weights(E, H, moe_inter)}
            layer.update({f"mlp.experts.{e}.{which}.weight": (stack[e], "fp8")
                          for e in range(E) for which, stack in stacks.items()})
        if i >= cfg["num_hidden_layers"]:          # multi-token prediction: its own embedding, head and norms
            layer.update({"eh_proj.weight": (weight(H, 2 * H, spread=False), "bf16"),
                          "embed_tokens.weight": (torch.randn(V, H, generator=g), "bf16"),
                          "enorm.weight": (norm(H), "fp32"), "hnorm.weight": (norm(H), "fp32"),
                          "shared_head.head.weight": (weight(V, H, spread=False), "bf16"),
                          "shared_head.norm.weight": (norm(H), "fp32")})
        out.update({p + name: value for name, value in layer.items()})
    return out


def _blocks_of(w: torch.Tensor):
    """((i, j), view) for each (up to) 128 x 128 block of the last two dims of w."""
    rows, cols = w.shape[-2:]
    for i in range(-(-rows // 128)):
        for j in range(-(-cols // 128)):
            yield (i, j), w[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]


def quantize_ue8m0(w: torch.Tensor):
    """(..., rows, cols) float -> (e4m3, weight_scale_inv (..., ceil(rows/128), ceil(cols/128)) fp32) with
    power-of-two scales (DeepSeek-V3.2's scale_fmt ue8m0): the smallest 2^n >= the block's amax / 448."""
    from indexcache.kernels.reference import FP8_E4M3_MAX
    rows, cols = w.shape[-2:]
    scale = torch.empty(*w.shape[:-2], -(-rows // 128), -(-cols // 128))
    q = w.float().clone()
    for (i, j), block in _blocks_of(q):
        amax = block.abs().amax(dim=(-2, -1))
        scale[..., i, j] = s = 2.0 ** torch.ceil(torch.log2(amax.clamp_min(1e-12) / FP8_E4M3_MAX))
        block /= s[..., None, None]
    return q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def write_v32_fp8_checkpoint(path, cfg: dict = V32_FP8_CONFIG, seed: int = 0, layers_per_shard: int = 8):
    """A synthetic DeepSeek-V3.2 FP8 checkpoint in `path`: config.json, shards of whole layers
    (`model-0000k-of-0000n.safetensors`, each weight beside its weight_scale_inv, the MTP layer last, as
    in the release) and model.safetensors.index.json. Returns {name: stored tensor}."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = v32_checkpoint_tensors(cfg, seed)
    fp8_names = [name for name, (_, kind) in tensors.items() if kind == "fp8"]
    stored = {}
    for shape in {tensors[n][0].shape for n in fp8_names}:      # one quantisation per weight shape
        names = [n for n in fp8_names if tensors[n][0].shape == shape]
        w8, scale = quantize_ue8m0(torch.stack([tensors[n][0] for n in names]))
        for j, name in enumerate(names):
            stored[name], stored[name + "_scale_inv"] = w8[j].clone(), scale[j].clone()
    shard_of = {}
    for name, (values, kind) in tensors.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10 ** 6)
        shard = 10 ** 7 if cfg["num_hidden_layers"] <= layer < 10 ** 6 else max(layer, 0) // layers_per_shard
        if kind != "fp8":
            stored[name] = values.to(torch.bfloat16 if kind == "bf16" else torch.float32)
        else:
            shard_of[name + "_scale_inv"] = shard
        shard_of[name] = shard
    shards = sorted(set(shard_of.values()))
    files = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    for s in shards:
        save_file({n: stored[n] for n in shard_of if shard_of[n] == s}, str(path / files[s]), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
         "weight_map": {n: files[shard_of[n]] for n in stored}}, indent=2))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return stored
