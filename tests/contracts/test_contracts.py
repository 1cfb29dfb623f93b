"""The shared contracts package: light enough for the operator image, packaged into it, and in step with
docs/contracts.md and with the metrics both sides actually export."""
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from indexcache_contracts import metrics as contract
from indexcache_contracts.pattern import pattern_from_freq, pattern_problem

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from dashboards import metrics_contract  # noqa: E402  (reads docs/contracts.md)


def test_contracts_import_nothing_heavy():
    code = ("import sys\n"
            "import indexcache_contracts.pattern, indexcache_contracts.serve_app, "
            "indexcache_contracts.calibration, indexcache_contracts.metrics\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'pydantic', 'fastapi', "
            "'numpy', 'indexcache', 'indexcache_operator', 'yaml'})\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT / "serving")})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_operator_image_carries_the_contracts():
    dockerfile = (ROOT / "docker" / "operator.Dockerfile").read_text()
    assert "COPY serving/ serving/" in dockerfile and "import indexcache_operator.handlers, indexcache_contracts" \
        in dockerfile


def _exported(text: str) -> dict[str, str]:
    """name as scraped (counters with _total) -> type."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):   # prometheus_client's per-series creation stamps, not metrics
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def test_metric_names_match_the_documented_contract_and_what_each_side_exports():
    documented = {m.name: m.type for m in metrics_contract.load().values()}
    assert {**contract.SERVING_METRICS, **contract.OPERATOR_METRICS} == documented

    from indexcache.serving.metrics import ServingMetrics
    from indexcache_operator.metrics import OperatorMetrics

    serving = ServingMetrics("m", "d", n_layers=4)
    assert _exported(serving.exposition().decode()) == contract.SERVING_METRICS
    operator = OperatorMetrics()
    operator.observe_status("ns", "name", 1, {"readyReplicas": 1, "fullLayers": 1, "lossDelta": 0.0,
                                             "conditions": [{"type": "Ready", "status": "True"}]})
    operator.reconciles.labels("ns", "name", "success").inc()
    operator.errors.labels("ns", "name", "ApiError").inc()
    operator.duration.labels("ns", "name").observe(0.1)
    operator.loss_delta.labels("ns", "name").set(0.0)
    assert _exported(operator.render().decode()) == contract.OPERATOR_METRICS


def test_the_pattern_rule_matches_the_documented_examples():
    """docs/contracts.md and DESIGN: 47 layers, freq 4, offset 2 -> 13 F; 78 layers, freq 4, offset 3 -> 21 F."""
    p = pattern_from_freq(47, 4, 2)
    assert [i for i, c in enumerate(p) if c == "F"] == [0, 1] + list(range(5, 47, 4))
    p = pattern_from_freq(78, 4, 3)
    assert [i for i, c in enumerate(p) if c == "F"] == [0, 1, 2] + list(range(6, 78, 4))
    assert pattern_from_freq(5) == "FFFFF"
    assert "model.numLayers is 8" in pattern_problem("FFSS", 8, field="pattern", num_layers_field="model.numLayers")


def test_app_args_threads_and_dtype_are_checked():
    """`threads` (the replica's torch CPU threads; default all cores) and `dtype` are app args the operator
    may write; bad values are refused naming the field."""
    import pytest

    from indexcache_contracts.serve_app import parse_app_args
    assert parse_app_args({}).threads is None
    assert parse_app_args({"threads": 4, "dtype": "bfloat16"}).threads == 4
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            parse_app_args({"threads": bad})
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
        parse_app_args({"dtype": "fp16"})


def test_app_args_long_prefill_token_threshold_is_checked():
    """`long_prefill_token_threshold` (short-first prefill; None: the engine's default, 0: FIFO): a count of
    tokens, refused naming the field otherwise."""
    import pytest

    from indexcache_contracts.serve_app import parse_app_args
    assert parse_app_args({}).long_prefill_token_threshold is None
    assert parse_app_args({"long_prefill_token_threshold": 0}).long_prefill_token_threshold == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="long_prefill_token_threshold"):
            parse_app_args({"long_prefill_token_threshold": bad})


def test_app_args_ingress_in_server_needs_one_replica_and_its_config_is_checked():
    """`ingress_in_server` (the server inside the one ingress replica, what `indexcache serve` runs) is a bool,
    refused with several replicas (the ingress would reach one of them); the server's user_config then comes in
    the ingress's under "server", checked like IndexCacheServer's own."""
    import pytest

    from indexcache_contracts.serve_app import check_ingress_config, parse_app_args
    assert parse_app_args({}).ingress_in_server is False
    assert parse_app_args({"ingress_in_server": True}).ingress_in_server is True
    with pytest.raises(ValueError, match="ingress_in_server.*num_replicas 1, got 2"):
        parse_app_args({"ingress_in_server": True, "num_replicas": 2})
    with pytest.raises(ValueError, match="ingress_in_server must be true or false"):
        parse_app_args({"ingress_in_server": "yes"})
    assert check_ingress_config({"max_ongoing_requests": 8, "server": {"sample_rate": 0.5}}) == 8
    with pytest.raises(ValueError, match="sample_rate"):
        check_ingress_config({"server": {"sample_rate": 3}})
    with pytest.raises(ValueError, match="unknown key"):
        check_ingress_config({"server": {"patern": "FF"}})


def test_app_args_quantization():
    """`quantization` (int8 weights on a CPU replica) is refused naming the field and the allowed values."""
    import pytest

    from indexcache_contracts.serve_app import parse_app_args
    assert parse_app_args({}).quantization == "none"
    assert parse_app_args({"quantization": "int8"}).quantization == "int8"
    with pytest.raises(ValueError, match="quantization must be one of none, int8, got 'int4'"):
        parse_app_args({"quantization": "int4"})
    with pytest.raises(ValueError, match="quantization must be a string"):
        parse_app_args({"quantization": 8})
