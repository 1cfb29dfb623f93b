"""The bundled model `indexcache serve` starts with: packaged GGUF + bundled trained indexer, cached."""
import torch
from safetensors.torch import load_file

from indexcache.model.checkpoint import load_checkpoint
from indexcache.offline.smollm2 import bundled_checkpoint, bundled_indexer


def test_bundled_checkpoint_is_built_once_with_the_trained_indexer(tmp_path):
    path = bundled_checkpoint(tmp_path)
    weights = path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [path.name]          # no half-written temp dirs left
    model, pattern = load_checkpoint(path)
    assert pattern == "F" * 30
    trained = load_file(bundled_indexer())
    got = model.state_dict()
    for name in ("model.layers.0.self_attn.indexer.wq_b.weight", "model.layers.29.self_attn.indexer.wk.weight"):
        torch.testing.assert_close(got[name], trained[name].float(), atol=0, rtol=0)
    assert bundled_checkpoint(tmp_path) == path and weights.stat().st_mtime_ns == built_at   # cached
    assert (path / "tokenizer.json").is_file()
