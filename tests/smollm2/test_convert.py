"""GGUF -> llama_dsa checkpoint: the LM tensors must be exactly what transformers' own GGUF loader reads."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from indexcache.offline import smollm2

PROMPT = "The capital of France is Paris. The capital of Germany is"


def llama_config_from(checkpoint_dir):
    """An HF LlamaConfig from our config.json, without the DSA keys transformers does not know."""
    from transformers import LlamaConfig

    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    keys = {k: v for k, v in cfg.items() if not k.startswith("index_") and k not in ("model_type", "architectures")}
    return LlamaConfig(**keys)


def llama_from_checkpoint(checkpoint_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config_from(checkpoint_dir)).eval()
    tensors = {k: v for k, v in load_file(str(checkpoint_dir / "model.safetensors")).items() if ".indexer." not in k}
    result = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embedding, so it is the only key the file may lack.
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    return model


def test_config_has_smollm2_shape_and_dsa_keys(small_checkpoint):
    cfg = json.loads((small_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llama_dsa"
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (576, 9, 3, 64)
    assert cfg["num_hidden_layers"] == 2  # truncated on request
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (1536, 49152, 8192)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]) == (4, 32, 16)
    assert (cfg["index_topk_freq"], cfg["index_skip_topk_offset"]) == (1, 2)


def test_lm_tensors_equal_transformers_gguf_loader(small_checkpoint):
    """transformers un-permutes Q/K with its own code; every tensor must match bit for bit."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(llama_config_from(small_checkpoint))
    reference = load_gguf_checkpoint(str(smollm2.gguf_path()), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = {k: v for k, v in load_file(str(small_checkpoint / "model.safetensors")).items() if ".indexer." not in k}
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        assert torch.equal(ours[name], ref.float()), name


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf permute: rows (h, half, i) -> (h, i, half).
    def llama_cpp_permute(w, n_heads):
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    hf = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(smollm2.unpermute_rope_rows(llama_cpp_permute(hf, 3), 3), hf)
    assert not np.array_equal(llama_cpp_permute(hf, 3), hf)


def test_indexer_tensors_for_every_layer_and_seeded(small_checkpoint, tmp_path):
    tensors = load_file(str(small_checkpoint / "model.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}.self_attn.indexer"
        assert tensors[f"{p}.wq_b.weight"].shape == (4 * 32, 576)
        assert tensors[f"{p}.wk.weight"].shape == (32, 576)
        assert tensors[f"{p}.weights_proj.weight"].shape == (4, 576)
        assert torch.equal(tensors[f"{p}.k_norm.weight"], torch.ones(32))
        assert torch.equal(tensors[f"{p}.k_norm.bias"], torch.zeros(32))
    cfg = {"hidden_size": 576, "num_hidden_layers": 2, "index_n_heads": 4, "index_head_dim": 32}
    same, other = smollm2.init_indexer_tensors(cfg, seed=0), smollm2.init_indexer_tensors(cfg, seed=1)
    name = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert torch.equal(same[name], tensors[name])
    assert not torch.equal(other[name], tensors[name])


@pytest.mark.parametrize("kwargs, field", [
    ({"index_head_dim": 33}, "index_head_dim"),
    ({"index_n_heads": 0}, "index_n_heads"),
    ({"index_topk": 0}, "index_topk"),
    ({"num_layers": 31}, "num_layers"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        smollm2.convert_smollm2(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_cli_reports_bad_shape_and_exit_code(tmp_path, capsys):
    assert smollm2.main_convert(["--out", str(tmp_path / "x"), "--index-head-dim", "7", "--indexer", "random"]) == 2
    assert "index_head_dim=7" in capsys.readouterr().err


def test_tokenizer_round_trip_and_chat_template(tokenizer, small_checkpoint):
    text = "Shall I compare thee to a summer's day?"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) // 2
    assert tokenizer.vocab_size == 49152
    prompt = tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]),
                              skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.hf.convert_tokens_to_ids("<|im_end|>") in tokenizer.stop_token_ids
    cfg = json.loads((small_checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]


def test_tokenizer_errors_are_actionable(tmp_path, tokenizer):
    from indexcache.model.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError, match="indexcache convert smollm2"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tokenizer.apply_chat_template([{"text": "no role"}])


@pytest.mark.slow
def test_full_model_logits_match_transformers_gguf_load(tmp_path):
    """All 30 layers: logits equal transformers' own GGUF load (tolerance 1e-4; measured 0.0)."""
    from transformers import AutoModelForCausalLM
    from indexcache.model.tokenizer import load_tokenizer

    out = smollm2.convert_smollm2(tmp_path / "full")
    ours = llama_from_checkpoint(out)
    path = smollm2.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = load_tokenizer(out)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        a, b = ours(ids).logits, reference(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert tok.decode([a[0, -1].argmax().item()]).strip() == "Berlin"


def test_bundled_indexer_artifact_is_complete_and_documented():
    """`indexcache serve` on a fresh machine relies on these committed weights and their manifest."""
    path = smollm2.bundled_indexer()
    assert path is not None and path.stat().st_size < 16 * 2**20   # small enough to commit
    tensors, keys = smollm2.read_indexer_file(path, 30)
    assert len(tensors) == 30 * 5
    assert (keys["index_n_heads"], keys["index_head_dim"], keys["index_rope_head_dim"]) == (4, 64, 32)
    assert keys["index_topk"] <= 4096 // 8            # acceptance: top-k at most 1/8 of a 4K context
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    manifest = json.loads((path.parent / "manifest.json").read_text())
    # The artifact is the last of a chain of runs, each continuing the previous one's file: every stage
    # names its command and commit, the chain is unbroken (each init is the previous output, by sha256),
    # the first stage starts from random indexers and learned (KL fell > 4x), later ones did not regress.
    stages = manifest.get("lineage", []) + [manifest]
    assert "init_indexer" not in stages[0]
    assert stages[0]["kl_last_10_mean"] < stages[0]["kl_first"] / 4
    for before, stage in zip(stages, stages[1:]):
        assert stage["init_indexer"]["sha256"] == before["indexer_sha256"]
        assert stage["kl_last_10_mean"] <= stage["kl_first"]
    import hashlib
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["indexer_sha256"]
    for stage in stages:
        assert stage["command"].startswith("indexcache train-indexer")
        assert len(stage["commit"]) == 40 and "HotpotQA" in stage["data"]["training"]


def test_indexer_file_errors_name_the_fix(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="not an indexer tensor"):
        smollm2.read_indexer_file(bad, 2)
    with pytest.raises(FileNotFoundError, match="train-indexer"):
        smollm2.read_indexer_file(tmp_path / "missing.safetensors", 2)
