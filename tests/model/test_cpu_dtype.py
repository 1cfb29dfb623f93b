"""`--dtype auto` on a CPU (model/cpu_dtype.py): probed once, cached per CPU/torch/threads, explicit
choices pass through, bad ones are refused naming the choices."""
import json

import pytest
import torch

from indexcache.model import cpu_dtype


def test_auto_probes_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("INDEXCACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpu_dtype, "probe", lambda: calls.append(1) or
                        {"dtype": "bfloat16", "gflops_float32": 100.0, "gflops_bfloat16": 300.0})
    assert cpu_dtype.resolve_cpu_dtype("auto") == torch.bfloat16
    assert cpu_dtype.resolve_cpu_dtype("auto") == torch.bfloat16
    assert calls == [1]                                   # the second start read the cache
    saved = json.loads((tmp_path / "cpu-dtype.json").read_text())
    assert saved[cpu_dtype.probe_key()]["dtype"] == "bfloat16"


def test_a_corrupt_cache_is_probed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("INDEXCACHE_HOME", str(tmp_path))
    (tmp_path / "cpu-dtype.json").write_text("{not json")
    monkeypatch.setattr(cpu_dtype, "probe", lambda: {"dtype": "float32", "gflops_float32": 2.0,
                                                     "gflops_bfloat16": 1.0})
    assert cpu_dtype.resolve_cpu_dtype("auto") == torch.float32


def test_explicit_and_bad_choices():
    assert cpu_dtype.resolve_cpu_dtype("float32") == torch.float32
    assert cpu_dtype.resolve_cpu_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        cpu_dtype.resolve_cpu_dtype("fp16")


def test_the_probe_measures_both():
    result = cpu_dtype.probe()
    assert result["dtype"] in ("float32", "bfloat16")
    assert result["gflops_float32"] > 0 and result["gflops_bfloat16"] > 0
    faster = max(("float32", "bfloat16"), key=lambda d: result[f"gflops_{d}"])
    assert result["dtype"] == faster
