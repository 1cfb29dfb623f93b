"""One flat model config, read from (and written to) a Hugging Face `config.json`.

Two attention families share one indexer and one sparse-attention step:
  - "mla": DeepSeek-V3.2 (`deepseek_v32`) and GLM-5 (`glm_moe_dsa`): low-rank q/kv, decoupled RoPE,
    the lightning indexer reads the query latent, MoE FFN after the first dense layers;
  - "gqa": Llama-style grouped-query attention (`llama_dsa`, e.g. SmolLM2-135M made into a DSA model),
    the indexer reads the layer's hidden state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .pattern import pattern_from_indexer_types, resolve_pattern

MLA_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa", "deepseek_v3")
GQA_MODEL_TYPES = ("llama_dsa", "llama")


@dataclass
class ModelArgs:
    model_type: str = "llama_dsa"
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # rope (yarn when rope_factor > 1, as DeepSeek-V3.2)
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    rope_interleave: bool = True  # MLA: DeepSeek's complex-pair RoPE; GQA always uses rotate-half
    # gqa
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # ffn
    inter_dim: int = 1536
    # moe (layers >= first_k_dense use the MoE FFN when n_routed_experts > 0)
    moe_inter_dim: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    route_scale: float = 1.0
    first_k_dense: int = 0
    norm_topk_prob: bool = True
    # index (lightning indexer + IndexCache)
    index_n_heads: int = 4
    index_head_dim: int = 64
    index_rope_head_dim: int = 32
    index_topk: int = 256
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    index_topk_pattern: str | None = None

    def __post_init__(self):
        if self.model_type not in MLA_MODEL_TYPES + GQA_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported: use one of {MLA_MODEL_TYPES + GQA_MODEL_TYPES}")
        if self.attention == "gqa" and self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")
        if self.index_rope_head_dim > self.index_head_dim:
            raise ValueError("index_rope_head_dim must not exceed index_head_dim")

    @property
    def attention(self) -> str:
        return "mla" if self.model_type in MLA_MODEL_TYPES else "gqa"

    @property
    def pattern(self) -> str:
        """The default IndexCache pattern of this checkpoint."""
        return resolve_pattern(self.n_layers, freq=self.index_topk_freq, offset=self.index_skip_topk_offset,
                               pattern=self.index_topk_pattern)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type", "llama_dsa")
        mla = model_type in MLA_MODEL_TYPES
        rope_scaling = cfg.get("rope_scaling") or {}
        pattern = cfg.get("index_topk_pattern")
        if pattern is None and cfg.get("indexer_types") is not None:
            pattern = pattern_from_indexer_types(list(cfg["indexer_types"]))
        n_heads = cfg.get("num_attention_heads", 9)
        dim = cfg.get("hidden_size", 576)
        qk_rope = cfg.get("qk_rope_head_dim", 0)
        index_head_dim = cfg.get("index_head_dim", 64)
        args = cls(
            model_type=model_type,
            vocab_size=cfg.get("vocab_size", 49152),
            dim=dim,
            n_layers=cfg.get("num_hidden_layers", 30),
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_factor=float(rope_scaling.get("factor", 1.0)) if rope_scaling.get("type", rope_scaling.get("rope_type")) == "yarn" else 1.0,
            original_seq_len=rope_scaling.get("original_max_position_embeddings", 4096),
            beta_fast=float(rope_scaling.get("beta_fast", 32)),
            beta_slow=float(rope_scaling.get("beta_slow", 1)),
            mscale=float(rope_scaling.get("mscale", 1.0)),
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=cfg.get("head_dim", dim // n_heads),
            q_lora_rank=cfg.get("q_lora_rank", 0) or 0,
            kv_lora_rank=cfg.get("kv_lora_rank", 0),
            qk_nope_head_dim=cfg.get("qk_nope_head_dim", 0),
            qk_rope_head_dim=qk_rope,
            v_head_dim=cfg.get("v_head_dim", 0),
            inter_dim=cfg.get("intermediate_size", 1536),
            moe_inter_dim=cfg.get("moe_intermediate_size", 0),
            n_routed_experts=cfg.get("n_routed_experts", 0) or 0,
            n_shared_experts=cfg.get("n_shared_experts", 0) or 0,
            n_activated_experts=cfg.get("num_experts_per_tok", 0) or 0,
            n_expert_groups=cfg.get("n_group", 1) or 1,
            n_limited_groups=cfg.get("topk_group", 1) or 1,
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            first_k_dense=cfg.get("first_k_dense_replace", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            index_n_heads=cfg.get("index_n_heads", 4),
            index_head_dim=index_head_dim,
            index_rope_head_dim=cfg.get("index_rope_head_dim", qk_rope if mla else index_head_dim // 2),
            index_topk=cfg.get("index_topk", 256),
            index_topk_freq=cfg.get("index_topk_freq", 1) or 1,
            index_skip_topk_offset=cfg.get("index_skip_topk_offset", 2),
            index_topk_pattern=pattern,
        )
        args.pattern  # validate the pattern keys now: a bad config fails at load, naming the key
        return args

    def to_hf_config(self) -> dict:
        cfg = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.inter_dim,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_rope_head_dim": self.index_rope_head_dim,
            "index_topk": self.index_topk,
            "index_topk_freq": self.index_topk_freq,
            "index_skip_topk_offset": self.index_skip_topk_offset,
        }
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = self.eos_token_id
        if self.index_topk_pattern is not None:
            cfg["index_topk_pattern"] = self.index_topk_pattern
        if self.rope_factor > 1:
            cfg["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                                   "beta_slow": self.beta_slow, "mscale": self.mscale,
                                   "original_max_position_embeddings": self.original_seq_len}
        if self.attention == "gqa":
            cfg.update(num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim)
        else:
            cfg.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                       qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                       v_head_dim=self.v_head_dim, rope_interleave=self.rope_interleave,
                       moe_intermediate_size=self.moe_inter_dim, n_routed_experts=self.n_routed_experts,
                       n_shared_experts=self.n_shared_experts, num_experts_per_tok=self.n_activated_experts,
                       n_group=self.n_expert_groups, topk_group=self.n_limited_groups,
                       routed_scaling_factor=self.route_scale, first_k_dense_replace=self.first_k_dense,
                       norm_topk_prob=self.norm_topk_prob, scoring_func="sigmoid")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: a model directory needs an HF-format config.json")
        return cls.from_hf_config(json.loads(config_file.read_text()))

    def replace(self, **changes) -> "ModelArgs":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown ModelArgs fields: {sorted(unknown)}")
        return ModelArgs(**{**asdict(self), **changes})
