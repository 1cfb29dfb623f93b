"""The CRD: generated from the pydantic models without drift, and it refuses invalid specs with a
message naming the field (OpenAPI schema via jsonschema, x-kubernetes-validations via cel-python)."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from indexcache_operator import crd as crd_module
from indexcache_operator.models import IndexCacheDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
VALID = {"apiVersion": "indexcache.io/v1alpha1", "kind": "IndexCacheDeployment",
         "metadata": {"name": "chat", "namespace": "serving"},
         "spec": {"model": {"uri": "/models/glm5", "numLayers": 78}}}


def test_generated_crd_files_match_the_models():
    for path, text in crd_module.outputs().items():
        assert path.read_text() == text, f"{path} drifted: run python -m indexcache_operator.crd"
    assert crd_module.main(["--check"]) == 0


def test_only_the_chart_copy_survives_helm_uninstall():
    """Deleting a CRD deletes every IndexCacheDeployment: `helm uninstall` must leave it (keep), while the
    plain crds/ copy, applied with kubectl, carries no Helm annotation."""
    plain = yaml.safe_load(crd_module.CRD_PATH.read_text())
    chart = yaml.safe_load(crd_module.CHART_CRD_PATH.read_text())
    assert chart["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "annotations" not in plain["metadata"]
    del chart["metadata"]["annotations"]
    assert chart == plain  # otherwise the same CRD


def test_drift_check_notices_a_chart_crd_without_the_keep_policy(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "crd.yaml"
    stale.write_text(crd_module.render())  # the plain copy where the chart's belongs
    plain = tmp_path / "indexcachedeployments.yaml"
    plain.write_text(crd_module.render())
    monkeypatch.setattr(crd_module, "CHART_CRD_PATH", stale)
    monkeypatch.setattr(crd_module, "CRD_PATH", plain)
    assert crd_module.main(["--check"]) == 1
    assert f"{stale} is out of date" in capsys.readouterr().err


def test_crd_is_structural_and_has_the_contract_names():
    crd = crd_module.build_crd()
    dumped = yaml.safe_dump(crd)
    assert "$ref" not in dumped and "title:" not in dumped
    # The one anyOf a structural schema allows: int-or-string quantities; no anyOf-with-null anywhere.
    def any_ofs(node):
        if isinstance(node, dict):
            if "anyOf" in node:
                yield node
            for v in node.values():
                yield from any_ofs(v)
        elif isinstance(node, list):
            for v in node:
                yield from any_ofs(v)
    found = list(any_ofs(crd))
    assert found and all(n == {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
                         for n in found), found
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("IndexCacheDeployment",
                                                                     "indexcachedeployments", ["icd"])
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["statusReplicasPath"] == ".status.replicas"
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == \
        ["Replicas", "Ready", "F layers", "Phase", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["replicas"]["default"] == 1
    assert spec["properties"]["recalibration"]["properties"]["autoApply"]["enum"] == ["Never", "Gated", "Always"]
    # Every spec field carries a description for `kubectl explain`.
    def undocumented(node, path):
        out = []
        for name, sub in (node.get("properties") or {}).items():
            if "description" not in sub:
                out.append(f"{path}.{name}")
            out += undocumented(sub, f"{path}.{name}")
        return out
    assert undocumented(spec, "spec") == []


def _with(path: str, value):
    obj = copy.deepcopy(VALID)
    node = obj["spec"]
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return obj


_DELETE = object()

# (what the user wrote, the field the error must name)
INVALID = [
    (_with("model", _DELETE), "model"),
    (_with("model.uri", ""), "model.uri"),
    (_with("model.uri", "ftp://host/model"), "model.uri"),
    (_with("model.uri", "gs://bucket/model"), "model.uri"),
    (_with("model.uri", "hf:/acme/model"), "model.uri"),
    (_with("model.cacheVolume", {}), "claimName"),
    (_with("model.cacheVolume", {"claimName": "Models_PVC"}), "model.cacheVolume.claimName"),
    (_with("model.cacheVolume", {"claimName": "models", "size": "100Gi"}), "exactly one"),
    (_with("model.cacheVolume", {"claimName": "models", "storageClassName": "fast"}), "storageClassName"),
    (_with("model.cacheVolume", {"size": "lots"}), "model.cacheVolume.size"),
    (_with("model.cacheVolume", {"size": "1Ti", "accessMode": "ReadOnlyMany"}), "model.cacheVolume.accessMode"),
    (_with("model.credentialsSecret", "HF Token"), "model.credentialsSecret"),
    (_with("model.numLayers", 0), "model.numLayers"),
    (_with("replicas", -1), "replicas"),
    (_with("replicas", "two"), "replicas"),
    (_with("gpusPerReplica", 0), "gpusPerReplica"),
    (_with("indexCache.pattern", "SFFS"), "indexCache.pattern"),
    (_with("indexCache.pattern", "FFXS"), "indexCache.pattern"),
    (_with("indexCache.pattern", "ffss"), "indexCache.pattern"),
    (_with("indexCache.freq", 0), "indexCache.freq"),
    (_with("indexCache", {"freq": 4, "offset": 0}), "indexCache.offset"),
    (_with("indexCache", {"pattern": "FFSS", "freq": 4}), "indexCache.pattern and indexCache.freq"),
    (_with("indexCache", {"offset": 2}), "indexCache.offset"),
    (_with("traffic.sampleRate", 1.5), "traffic.sampleRate"),
    (_with("traffic.sampleRate", -0.1), "traffic.sampleRate"),
    (_with("traffic.storageSize", "lots"), "traffic.storageSize"),
    (_with("recalibration.schedule", "every day"), "recalibration.schedule"),
    (_with("recalibration.targetFullFraction", 0), "recalibration.targetFullFraction"),
    (_with("recalibration.targetFullFraction", 1.5), "recalibration.targetFullFraction"),
    (_with("recalibration.autoApply", "Sometimes"), "recalibration.autoApply"),
    (_with("recalibration.maxLossDelta", -0.01), "recalibration.maxLossDelta"),
    (_with("recalibration.suspend", "yes"), "recalibration.suspend"),
    (_with("recalibration.timeoutSeconds", 5), "recalibration.timeoutSeconds"),
    (_with("cost.gpuHourlyUSD", -2), "cost.gpuHourlyUSD"),
    (_with("autoscaling", {"minReplicas": 3, "maxReplicas": 2}), "autoscaling.minReplicas"),
    (_with("autoscaling", {"minReplicas": 1, "maxReplicas": 4, "targetOngoingRequests": 0}),
     "autoscaling.targetOngoingRequests"),
    (_with("autoscaling", {"maxReplicas": 4}), "minReplicas"),
    (_with("autoscaling", {"minReplicas": 2, "maxReplicas": 4}), "replicas"),  # default 1 < min 2
    ({**VALID, "metadata": {"name": "a" * 41, "namespace": "serving"}}, "metadata.name"),
    # KubeRay wants DNS-1035 RayService names (issue 19 item 6): these hung in RayServiceUpdating.
    ({**VALID, "metadata": {"name": "chat.v2", "namespace": "serving"}}, "DNS-1035"),
    ({**VALID, "metadata": {"name": "7b-chat", "namespace": "serving"}}, "DNS-1035"),
]


@pytest.mark.parametrize("obj,field", INVALID, ids=[f"{i}-{f}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_specs_are_refused_naming_the_field(validate, obj, field):
    errors = validate(obj)
    assert errors, f"accepted an invalid spec: {obj['spec']}"
    assert any(field in e for e in errors), f"no message names {field!r}: {errors}"


@pytest.mark.parametrize("uri", ["gs://bucket/glm5", "ftp://host/glm5"])
def test_an_unsupported_model_scheme_is_refused_with_what_is_supported(validate, uri):
    errors = validate(_with("model.uri", uri))
    assert errors and all(form in errors[0] for form in ("gs://", "hf://org/name", "s3://bucket/prefix",
                                                         "pvc://claim/path", "smollm2")), errors


@pytest.mark.parametrize("uri", ["hf://acme/glm5@main", "s3://models/glm5", "https://host/m.tar.gz#sha256=" + "a" * 64,
                                 "http://10.0.0.1/m.tar.gz", "pvc://weights/glm5", "/models/glm5", "smollm2", "tiny"])
def test_every_scheme_the_resolver_supports_is_accepted(validate, uri):
    from indexcache.model.storage import parse_uri
    parse_uri(uri)   # the serving side accepts it too
    assert validate(_with("model.uri", uri)) == []


def test_there_are_at_least_twenty_refusals():
    assert len(INVALID) >= 20


def _documented_examples() -> list[dict]:
    """Every IndexCacheDeployment in docs/operator.md, the README and the chart's files."""
    texts = []
    for path in [ROOT / "docs" / "operator.md", ROOT / "README.md"]:
        if path.exists():
            texts += re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)
    chart = ROOT / "charts" / "indexcache-operator"
    for path in sorted(chart.rglob("*.yaml")) if chart.exists() else []:
        if "templates" not in path.parts:  # templates need rendering; crd.yaml is checked above
            texts.append(path.read_text())
    found = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "IndexCacheDeployment":
                found.append(doc)
    return found


def test_documented_examples_are_accepted_and_parse_in_the_operator(validate):
    examples = _documented_examples()
    assert len(examples) >= 2, "docs/operator.md must show IndexCacheDeployment examples"
    for example in examples:
        example.setdefault("metadata", {}).setdefault("namespace", "default")
        assert validate(example) == [], example["metadata"]["name"]
        IndexCacheDeploymentSpec.model_validate(example["spec"])  # the operator reads it too


def test_freq_without_num_layers_is_accepted(validate):
    """Users write `freq: 4` as in SGLang/vLLM; the replica knows the layer count (issue 19 item 12)."""
    obj = copy.deepcopy(VALID)
    obj["spec"] = {"model": {"uri": "/models/glm5"}, "indexCache": {"freq": 4, "offset": 3}}
    assert validate(obj) == []


def test_valid_spec_with_every_field_is_accepted(validate):
    obj = copy.deepcopy(VALID)
    obj["spec"].update({
        "replicas": 3, "gpusPerReplica": 8, "maxOngoingRequests": 32, "image": "registry/x:1",
        "indexCache": {"freq": 4, "offset": 3},
        "traffic": {"sampleRate": 0.05, "storageSize": "50Gi", "storageClassName": "nfs"},
        "recalibration": {"schedule": "0 3 * * 0", "suspend": False, "targetFullFraction": 0.25,
                          "autoApply": "Gated", "maxLossDelta": 0.01, "timeoutSeconds": 7200},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 6, "targetOngoingRequests": 4},
        "cost": {"gpuHourlyUSD": 3.5},
    })
    obj["spec"]["model"].update({"cacheVolume": {"claimName": "shared-models"}, "credentialsSecret": "hf-token"})
    assert validate(obj) == []


@pytest.mark.parametrize("cache", [{"claimName": "shared-models"}, {"size": "200Gi"},
                                   {"size": "1.5Ti", "storageClassName": "local-nvme", "accessMode": "ReadWriteOnce"}])
def test_a_cache_volume_is_a_claim_to_reuse_or_one_to_create(validate, cache):
    assert validate(_with("model.cacheVolume", cache)) == []
