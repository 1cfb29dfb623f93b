"""HF-format checkpoints in DeepSeek-V3.2, GLM-5 and DeepSeek-inference namings load back exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from indexcache.model.checkpoint import dequant_fp8_blocks, load_checkpoint, save_checkpoint


def same_logits(a, b, pattern=None):
    x = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(x, pattern=pattern), b(x, pattern=pattern), atol=0, rtol=0)


@pytest.mark.parametrize("naming", ["hf", "deepseek"])
def test_roundtrip(tmp_path, family, make_model, naming):
    model = make_model(family)
    save_checkpoint(model, tmp_path, naming=naming)
    names = load_file(tmp_path / "model.safetensors").keys()
    prefix = "model.layers.0.self_attn.indexer.wq_b.weight" if naming == "hf" else "layers.0.attn.indexer.wq_b.weight"
    assert prefix in names
    loaded, pattern = load_checkpoint(tmp_path)
    assert pattern == "F" * 6
    same_logits(model, loaded)


def test_tied_embeddings_roundtrip(tmp_path, make_model):
    """SmolLM2 ties lm_head to the embeddings: the checkpoint holds one tensor, the loaded model uses it twice."""
    model = make_model("gqa", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_checkpoint(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors").keys()
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    same_logits(model, loaded)


def test_sharded_checkpoint_with_index(tmp_path, make_model):
    model = make_model("mla")
    save_checkpoint(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    loaded, _ = load_checkpoint(tmp_path)
    same_logits(model, loaded)


def test_glm5_checkpoint_without_shared_layer_indexers(tmp_path, make_model):
    """GLM-5.2 style: config lists indexer_types; shared layers ship no indexer weights."""
    model = make_model("mla")
    types = ["full", "full", "shared", "shared", "full", "shared"]
    save_checkpoint(model, tmp_path, drop_indexers={2, 3, 5},
                    config_overrides={"model_type": "glm_moe_dsa", "indexer_types": types})
    loaded, pattern = load_checkpoint(tmp_path)
    assert pattern == "FFSSFS"
    assert loaded.model.layers[2].self_attn.indexer is None
    same_logits(model, loaded, pattern="FFSSFS")
    with pytest.raises(ValueError, match=r"marks layers \[2, 3, 5\] F but the checkpoint has no indexer weights"):
        load_checkpoint(tmp_path, pattern="F" * 6)
    with pytest.raises(ValueError, match="no indexer weights"):
        loaded(torch.tensor([[3, 4, 5]]), pattern="FFFSFS")


def test_freq_and_offset_override_the_checkpoint_pattern(tmp_path, make_model):
    save_checkpoint(make_model("gqa"), tmp_path)
    _, pattern = load_checkpoint(tmp_path, freq=2, offset=2)
    assert pattern == "FFSFSF"


def test_mismatched_tensors_are_reported_by_name(tmp_path, make_model):
    save_checkpoint(make_model("gqa"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .* config.json implies"):
        load_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.q_proj.weight'\]"):
        load_checkpoint(tmp_path)


def test_bad_pattern_in_config_fails_at_load(tmp_path, make_model):
    save_checkpoint(make_model("gqa"), tmp_path, config_overrides={"index_topk_pattern": "FSXFSS"})
    with pytest.raises(ValueError, match="only 'F'"):
        load_checkpoint(tmp_path)


def test_fp8_block_weights_are_dequantised_on_request(tmp_path, make_model):
    """fp8="dequantize": the comparison path (the default keeps them FP8: tests/model/test_fp8.py)."""
    model = make_model("gqa")
    save_checkpoint(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"                         # (96, 64): 1 x 1 blocks
    w = state[name]
    scale = w.abs().max() / 448.0
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded, _ = load_checkpoint(tmp_path, fp8="dequantize")
    got = loaded.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(got, w, atol=float(scale) * 32, rtol=0.07)
    assert torch.equal(dequant_fp8_blocks(state[name], state[name + "_scale_inv"]), got)


def test_loading_a_llama_dsa_tokenizer_warns_nothing(tmp_path, capfd):
    """transformers does not know model_type `llama_dsa`; loading only the tokenizer must not make it read
    config.json and warn that the "model" may be incompatible (it alarmed users of `indexcache serve`)."""
    import json

    from indexcache.model.checkpoint import save_checkpoint
    from indexcache.model.tiny import CharTokenizer, save_char_tokenizer, tiny_model
    from indexcache.model.tokenizer import load_tokenizer

    save_checkpoint(tiny_model(seed=0), tmp_path)
    save_char_tokenizer(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama_dsa"
    capfd.readouterr()
    tok = load_tokenizer(tmp_path)
    out, err = capfd.readouterr()
    assert "model of type" not in out + err, out + err
    text = "sparse layers share"
    assert tok.decode(tok.encode(text)) == text and tok.encode(text) == CharTokenizer().encode(text)
