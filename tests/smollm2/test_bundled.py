"""The bundled model `indexcache serve` starts with: packaged GGUF + bundled trained indexer, cached."""
import json

import pytest
import torch
from safetensors.torch import load_file

from indexcache.model.checkpoint import load_checkpoint
from indexcache.offline.smollm2 import ARTIFACT_DIR, PATTERN_FILE, bundled_checkpoint, bundled_indexer, shipped_pattern


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory):
    """A cache directory and the bundled checkpoint converted into it (~20 s, once for this file)."""
    root = tmp_path_factory.mktemp("bundled")
    return root, bundled_checkpoint(root)


def test_bundled_checkpoint_is_built_once_with_the_trained_indexer(bundled_cache):
    tmp_path, path = bundled_cache
    weights = path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [path.name]          # no half-written temp dirs left
    model, pattern = load_checkpoint(path)
    # the artifact's calibrated pattern when it ships one for this indexer, else every layer F
    assert pattern == (shipped_pattern(bundled_indexer()) or "F" * 30)
    assert load_checkpoint(path, pattern="all-F")[1] == "F" * 30                  # --pattern all-F: the old way
    trained = load_file(bundled_indexer())
    got = model.state_dict()
    for name in ("model.layers.0.self_attn.indexer.wq_b.weight", "model.layers.29.self_attn.indexer.wk.weight"):
        torch.testing.assert_close(got[name], trained[name].float(), atol=0, rtol=0)
    assert bundled_checkpoint(tmp_path) == path and weights.stat().st_mtime_ns == built_at   # cached
    assert (path / "tokenizer.json").is_file()


def test_calibrate_the_bundled_model_by_name(bundled_cache, tmp_path, monkeypatch, capsys):
    """`indexcache calibrate --model smollm2`, what the chart's example recalibration Job runs: the bundled
    name resolves to the converted checkpoint in the model cache (not converted again), text samples are
    tokenised with its tokenizer, and the greedy search flips one layer."""
    from indexcache.cli import main

    root, path = bundled_cache
    monkeypatch.setenv("INDEXCACHE_MODEL_CACHE", str(root))
    built_at = (path / "model.safetensors").stat().st_mtime_ns
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n" for text in (
        "What does a sparse attention indexer keep?", "Name three plays by Shakespeare.")))
    rc = main(["calibrate", "--model", "smollm2", "--samples", str(samples), "--target-full", "0.97",
               "--out", str(tmp_path / "result.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["pattern"]) == 30 and result["pattern"].count("F") == 29 and result["pattern"][0] == "F"
    assert "2 usable samples" in err
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at


def test_the_shipped_pattern_and_its_result_agree_with_the_artifact_indexer():
    """pattern.json (issue 23) is a calibration result in the contract's schema for exactly the shipped
    indexer file, about 1/4 of the layers F, better than uniform on its own calibration data, with the seed
    and command that reproduce it. Until one is shipped (bench/h200_smollm.sh issue23-calibrate makes it),
    the bundled model serves all layers F."""
    import hashlib

    from indexcache_contracts.calibration import read_calibration_result

    path = ARTIFACT_DIR / PATTERN_FILE
    if not path.is_file():
        assert shipped_pattern(bundled_indexer()) is None
        return
    result = read_calibration_result(path.read_text())
    assert result["indexer_sha256"] == hashlib.sha256(bundled_indexer().read_bytes()).hexdigest(), \
        "pattern.json was calibrated for another indexer: re-run bench/h200_smollm.sh issue23-calibrate"
    assert result["num_layers"] == 30 and result["pattern"].count("F") == result["full_layers"] == 8
    assert result["loss_delta"] < result["uniform_loss_delta"]
    assert isinstance(result["seed"], int) and result["calibration_command"].count("indexcache calibrate") == 1
    assert shipped_pattern(bundled_indexer()) == result["pattern"]
