"""The calibrated IndexCache pattern shipped with the bundled SmolLM2 DSA model (artifacts/smollm2-dsa/pattern.json):
it is a calibration result for exactly the shipped indexer, and a pattern calibrated for other indexers is
never used (issue 23)."""
import hashlib
import json
import shutil

import pytest

from indexcache.model.checkpoint import load_checkpoint
from indexcache.offline.smollm2 import PATTERN_FILE, convert_smollm2, shipped_pattern


def a_result(pattern: str) -> dict:
    """A calibration result in the contract's schema (what `indexcache calibrate --out` writes)."""
    return {"pattern": pattern, "full_layers": pattern.count("F"), "num_layers": len(pattern), "target_full": 0.25,
            "loss_all_full": 3.2, "loss": 3.21, "loss_delta": 0.01, "step_losses": [3.205, 3.21],
            "uniform_pattern": pattern, "uniform_loss": 3.25, "uniform_loss_delta": 0.05, "overlap": {},
            "num_samples": 2, "num_tokens": 2048, "model_id": "m", "duration_s": 1.0, "passes": 9,
            "passes_saved": 3, "version": "0.1.0", "seed": 0}


@pytest.fixture
def artifact(tmp_path):
    """The artifact directory's layout: a small stand-in indexer file and a pattern.json calibrated for it."""
    indexer = tmp_path / "indexer.safetensors"
    indexer.write_bytes(b"stand-in indexer weights")
    result = a_result("FFSSSFSSFSSSSSFSSSSSFSSSSSSSFS")
    result["indexer_sha256"] = hashlib.sha256(indexer.read_bytes()).hexdigest()
    (tmp_path / PATTERN_FILE).write_text(json.dumps(result))
    return indexer, result


def test_a_matching_hash_gives_the_pattern(artifact):
    indexer, result = artifact
    assert shipped_pattern(indexer) == result["pattern"]


def test_a_retrained_indexer_falls_back_to_all_full_with_a_warning(artifact):
    indexer, _ = artifact
    indexer.write_bytes(b"retrained indexer weights")
    with pytest.warns(UserWarning, match="calibrated for indexer sha256 .* its pattern is NOT used, the model "
                                         "serves all layers F"):
        assert shipped_pattern(indexer) is None


def test_no_pattern_file_means_all_full(tmp_path):
    indexer = tmp_path / "indexer.safetensors"
    indexer.write_bytes(b"weights")
    assert shipped_pattern(indexer) is None


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("indexer_sha256"), "indexer_sha256 must be the 64-hex sha256"),
    (lambda r: r.update(pattern="SF" * 15), "must start with 'F'"),
    (lambda r: r.pop("loss_delta"), "lacks"),
])
def test_a_broken_pattern_file_is_a_clear_error(artifact, edit, message):
    indexer, result = artifact
    edit(result)
    (indexer.parent / PATTERN_FILE).write_text(json.dumps(result))
    with pytest.raises(ValueError, match=message) as err:
        shipped_pattern(indexer)
    assert PATTERN_FILE in str(err.value)


def test_convert_writes_the_pattern_as_the_checkpoint_default_and_all_f_restores(tmp_path):
    """A 2-layer real checkpoint with pattern "FS": loading gives it by default; "all-F" / "F*" give all F."""
    path = convert_smollm2(tmp_path / "ckpt", index_n_heads=2, index_head_dim=32, index_topk=16, num_layers=2,
                           tokenizer=False, pattern="FS")
    assert json.loads((path / "config.json").read_text())["index_topk_pattern"] == "FS"
    assert load_checkpoint(path)[1] == "FS"
    assert load_checkpoint(path, pattern="all-F")[1] == "FF"
    assert load_checkpoint(path, pattern="F*")[1] == "FF"
    with pytest.raises(ValueError, match="must start with 'F'"):
        convert_smollm2(tmp_path / "bad", num_layers=2, tokenizer=False, pattern="SF")
    shutil.rmtree(path)
