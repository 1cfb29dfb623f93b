"""The memory planner counts what the sharded loader and the KV cache really allocate."""
import json

import pytest
import torch
from safetensors.torch import load_file

from indexcache.cli import main
from indexcache.model.checkpoint import load_checkpoint, save_checkpoint, write_checkpoint
from indexcache.model.dsa import KVCache
from indexcache.model.fp8 import quantize_checkpoint_tensors
from indexcache.model.parallel import ParallelContext, shard_model
from indexcache.model.plan import kv_bytes_per_token, parse_size, weights_per_rank
from tiny_models import random_model

FP8_ALIGNED = dict(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, inter_dim=256, moe_inter_dim=128,
                   n_shared_experts=2)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    save_checkpoint(random_model("mla", seed=2, **FP8_ALIGNED), root / "float")
    tensors = quantize_checkpoint_tensors(load_file(root / "float" / "model.safetensors"))
    config = json.loads((root / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    return write_checkpoint(root / "fp8", config, tensors)


def held_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict(keep_vars=True).values())


@pytest.mark.parametrize("world", [1, 2])
def test_weights_per_rank_are_what_the_sharded_loader_holds(fp8_dir, world):
    shard, _ = load_checkpoint(fp8_dir, dtype=torch.bfloat16, parallel=ParallelContext(rank=0, world=world))
    assert weights_per_rank(shard.full_args if world > 1 else shard.args, world, fp8=True) == held_bytes(shard)


@pytest.mark.parametrize("family,world", [("mla", 2), ("gqa", 4), ("gqa", 1)])
def test_kv_bytes_per_token_are_what_the_cache_allocates(family, world):
    model = random_model(family)
    args = model.args
    shard = shard_model(model, ParallelContext(rank=world - 1, world=world))
    for pattern in ("F" * args.n_layers, "FFSSFS"):
        cache = KVCache(shard.args, 1, 64, pattern, dtype=torch.bfloat16, indexer_fp8=True)
        assert kv_bytes_per_token(args, world, pattern) * 64 == cache.nbytes()
    assert kv_bytes_per_token(args, world, "FFSSFS") < kv_bytes_per_token(args, world, "F" * args.n_layers)


def test_plan_cli_reports_fits_and_refuses_what_cannot_be(fp8_dir, capsys):
    base = ["plan", "--model", str(fp8_dir), "--max-model-len", "200", "--reserve", "0GiB", "--json"]
    assert main(base + ["--gpus", "2", "--gpu-memory", "1GB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["tokens_pattern"] >= out["tokens_all_f"] >= 200
    assert main(base + ["--gpus", "2", "--gpu-memory", "0.001GB"]) == 1        # the weights alone do not fit
    assert not json.loads(capsys.readouterr().out)["fits"]
    assert main(base + ["--gpus", "3", "--gpu-memory", "1GB"]) == 2
    assert "gpusPerReplica=3 does not divide" in capsys.readouterr().err
    with pytest.raises(ValueError, match="write e.g. 141GB"):
        parse_size("lots")
    assert parse_size("141GB") == 141 * 10 ** 9 and parse_size("80GiB") == 80 * 2 ** 30
