"""Sharded loading: each rank reads only its slices of the safetensors files (FP8 weights with their
128x128 block scales) and ends up with exactly the shard that slicing the whole loaded model gives."""
import json

import pytest
import torch
from safetensors.torch import load_file

from indexcache.model.checkpoint import load_checkpoint, save_checkpoint, write_checkpoint
from indexcache.model.fp8 import FP8_DTYPE, quantize_checkpoint_tensors
from indexcache.model.parallel import ParallelContext, shard_model
from tiny_models import random_model

# MLA widths whose per-rank slices at TP=2 are whole 128-wide FP8 blocks: q_b_proj 2 heads x 128 rows,
# kv_b_proj 2 x 128, o_proj 2 x 64 = 128 columns, the dense MLP 128, the shared expert 2 x 128 / 2 = 128
FP8_ALIGNED = dict(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, inter_dim=256, moe_inter_dim=128,
                   n_shared_experts=2)


def write(tmp_path, model, fp8: bool):
    save_checkpoint(model, tmp_path / "float")
    if not fp8:
        return tmp_path / "float"
    tensors = quantize_checkpoint_tensors(load_file(tmp_path / "float" / "model.safetensors"))
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    return write_checkpoint(tmp_path / "fp8", config, tensors)


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].float(), b[name].float()), name


@pytest.mark.parametrize("family,world,fp8", [("mla", 2, True), ("mla", 4, False), ("gqa", 4, False)])
def test_each_rank_loads_the_slices_of_the_whole_model(tmp_path, family, world, fp8):
    overrides = FP8_ALIGNED if fp8 else {}
    path = write(tmp_path, random_model(family, seed=3, **overrides), fp8)
    whole, pattern = load_checkpoint(path)
    for rank in range(world):
        ctx = ParallelContext(rank=rank, world=world)
        shard, shard_pattern = load_checkpoint(path, parallel=ctx)
        assert shard_pattern == pattern
        want = shard_model(load_checkpoint(path)[0], ctx)
        assert_same_state(shard, want)
        if fp8:   # kept e4m3, half the attention heads' rows, half the experts
            attn = shard.model.layers[1].self_attn
            assert attn.q_b_proj.weight.dtype == FP8_DTYPE
            assert attn.q_b_proj.weight.shape[0] == whole.model.layers[1].self_attn.q_b_proj.weight.shape[0] // world
            assert shard.model.layers[1].mlp.experts.gate_up_proj.shape[0] == whole.args.n_routed_experts // world
            # the scales went with their blocks: the rank's real weights are rows / columns of the whole's
            rows = attn.q_b_proj.weight.shape[0]
            full = whole.model.layers[1].self_attn
            torch.testing.assert_close(attn.q_b_proj.dequantized(), full.q_b_proj.dequantized()[rank * rows:(rank + 1) * rows])
            cols = attn.o_proj.weight.shape[1]
            torch.testing.assert_close(attn.o_proj.dequantized(), full.o_proj.dequantized()[:, rank * cols:(rank + 1) * cols])
    # the vocabulary rows of every rank, padding dropped, are the whole embedding
    rows = [load_checkpoint(path, parallel=ParallelContext(r, world))[0].model.embed_tokens.weight for r in range(world)]
    torch.testing.assert_close(torch.cat(rows)[: whole.args.vocab_size], whole.model.embed_tokens.weight, rtol=0, atol=0)


def test_fp8_slices_that_cut_a_scale_block_are_refused(tmp_path):
    path = write(tmp_path, random_model("mla", seed=3), fp8=True)   # q_b_proj: 4 heads x 24 rows
    with pytest.raises(ValueError, match=r"q_b_proj.*not at multiples of the FP8 block \(128\): set gpusPerReplica"):
        load_checkpoint(path, parallel=ParallelContext(rank=1, world=2))
