"""The indexcache-operator Helm chart: lint, render, validate what a cluster would be sent."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_helpers import ALL_ON_VALUES, CHART, ROOT, by_kind, one, render, run_helm

from dashboards import alerts

# The oldest Kubernetes the chart supports and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("values", [None, ALL_ON_VALUES], ids=["defaults", "all-on"])
def test_helm_lint_strict_passes(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run_helm(helm, *args)
    assert "0 chart(s) failed" in proc.stdout + proc.stderr


@pytest.mark.parametrize("setting, named", [
    ("imag.tag=latest", "imag"),                       # typo of a top-level key
    ("serviceMonitor.enable=true", "enable"),          # typo of a nested key
    ("operator.port=80", "operator.port"),             # privileged port for a non-root container
    ("image.pullPolicy=Sometimes", "pullPolicy"),
])
def test_typo_or_bad_value_fails_lint_naming_the_key(helm, setting, named):
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"helm lint accepted --set {setting}"
    assert named.split(".")[-1] in proc.stdout + proc.stderr


def test_default_install_renders_operator_rbac_and_dashboards_only(default_objects):
    kinds = sorted(o["kind"] for o in default_objects if o["kind"] != "CustomResourceDefinition")
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment",
                            "PodDisruptionBudget"] + ["ConfigMap"] * 4)
    # The monitoring.coreos.com objects would fail to install on a cluster without the Prometheus Operator.
    assert not PROMETHEUS_OPERATOR_KINDS & {o["kind"] for o in default_objects}


def test_all_on_renders_every_optional_part(all_on_objects):
    kinds = {o["kind"] for o in all_on_objects}
    assert PROMETHEUS_OPERATOR_KINDS <= kinds


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("fixture", ["default_objects", "all_on_objects"])
def test_rendered_builtin_objects_are_valid_kubernetes(fixture, k8s, request):
    objects = request.getfixturevalue(fixture)
    builtins = [o for o in objects if o["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    assert builtins
    for obj in builtins:
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


def test_operator_deployment_is_highly_available_hardened_and_probed(all_on_objects):
    """Two replicas by default (issue 19 item 10): kopf peering keeps one active, a rolling upgrade adds a
    peer before removing one, and a PodDisruptionBudget keeps one through node drains."""
    dep = one(all_on_objects, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pdb = one(all_on_objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert _matches(pdb["spec"]["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    peering_env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert peering_env["INDEXCACHE_OPERATOR_PEERING"] == "indexcache-operator"
    crds = {c["metadata"]["name"] for c in by_kind(all_on_objects, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/indexcache/operator:0.1.0-test"
    assert container["command"] == ["indexcache-operator"]
    assert container["args"] == ["--verbose"]
    assert {"name": "INDEXCACHE_LOG_FORMAT", "value": "json"} in container["env"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 8080}
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The operator listens where the probes and the Service look (its own default differs).
    assert env["INDEXCACHE_OPERATOR_METRICS_PORT"] == "8080"
    assert env["INDEXCACHE_SERVING_IMAGE"] == "ghcr.io/indexcache/serving:0.1.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}, probe
    # The read-only root needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == one(all_on_objects, "ServiceAccount")["metadata"]["name"]
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert pod["tolerations"][0]["key"] == "dedicated"


def test_one_replica_is_standalone_without_peering_or_pdb(helm):
    objs = render(helm, "--set", "replicas=1")
    spec = one(objs, "Deployment")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # never two during an upgrade
    env = {e["name"] for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert "INDEXCACHE_OPERATOR_PEERING" not in env
    assert not by_kind(objs, "PodDisruptionBudget")
    assert [c["metadata"]["name"] for c in by_kind(objs, "CustomResourceDefinition")] == [
        "indexcachedeployments.indexcache.io"]
    assert not [r for r in one(objs, "ClusterRole")["rules"] if "kopf.dev" in r["apiGroups"]]


def test_operator_args_and_log_format_take_effect(all_on_objects, capfd):
    """operator.args and INDEXCACHE_LOG_FORMAT reach the operator's CLI (they were silently ignored)."""
    from indexcache_operator.__main__ import configure_logging, parse
    (container,) = one(all_on_objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    options = parse(container["args"], env)
    assert (options.log_level, options.log_format, options.peering) == ("DEBUG", "json", "indexcache-operator")
    configure_logging(options)
    try:
        import logging
        logging.getLogger("indexcache_operator.test").info("hello from the chart's settings")
        line = capfd.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["message"] == "hello from the chart's settings"
    finally:
        configure_logging(parse([], {}))


def test_default_image_tag_is_the_app_version(default_objects, helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (container,) = one(default_objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/indexcache/operator:{chart['appVersion']}"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_and_servicemonitor_reach_the_operator_metrics_port(all_on_objects):
    dep, svc, sm = (one(all_on_objects, k) for k in ("Deployment", "Service", "ServiceMonitor"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(svc["spec"]["selector"], pod_labels), "the Service selects no operator pod"
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), "ServiceMonitor selects no Service"
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in container_ports
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    # The dashboards' "Operator up" panel selects job="indexcache-operator": the job label must say so.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "indexcache-operator"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_serving_podmonitor_scrapes_every_replica_in_every_namespace(all_on_objects):
    """One target per serving replica (issue 19 item 9): the PodMonitor selects the replica pods the operator
    builds, not the head (whose /metrics route answers for one random replica), on the port where each
    replica serves its own metrics."""
    from indexcache_operator import builders as b
    from indexcache_operator.config import OperatorConfig
    from indexcache_operator.models import IndexCacheDeploymentSpec

    pm = one(all_on_objects, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
    spec = IndexCacheDeploymentSpec.model_validate({"model": {"uri": "smollm2"}, "replicas": 3})
    rs = b.rayservice(b.Owner("chat", "serving", "u"), spec, OperatorConfig(), None, 1)
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    (workers,) = cluster["workerGroupSpecs"]
    selector = pm["spec"]["selector"]["matchLabels"]
    assert _matches(selector, workers["template"]["metadata"]["labels"]), "the PodMonitor selects no replica pod"
    assert not _matches(selector, head["metadata"]["labels"]), "the PodMonitor also scrapes the head"
    ports = {p["name"]: p["containerPort"] for p in workers["template"]["spec"]["containers"][0]["ports"]}
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert ports[endpoint["port"]] == app["args"]["metrics_port"], "replicas serve metrics where it scrapes"


def test_prometheusrule_carries_the_generated_alerts_verbatim(all_on_objects, tmp_path):
    rule = one(all_on_objects, "PrometheusRule")
    assert rule["spec"] == alerts.rule_file()
    # And Prometheus accepts it as it is: $labels templates survived helm's own templating.
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    subprocess.run(["promtool", "check", "rules", str(path)], check=True, capture_output=True)
    assert "{{ $labels.deployment }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]


def test_dashboards_ship_as_sidecar_configmaps_equal_to_generated_json(all_on_objects):
    maps = by_kind(all_on_objects, "ConfigMap")
    generated = {p.name: p.read_text() for p in sorted((ROOT / "dashboards" / "json").glob("*.json"))}
    assert len(generated) == 4
    shipped = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "IndexCache"
        assert cm["metadata"]["namespace"] == "monitoring"
        (key, text), = cm["data"].items()
        shipped[key] = text
    assert {k: json.loads(v) for k, v in shipped.items()} == {k: json.loads(v) for k, v in generated.items()}


def test_dashboards_can_be_switched_off(helm):
    assert not by_kind(render(helm, "--set", "dashboards.enabled=false"), "ConfigMap")


def test_existing_service_account_needs_a_name(helm):
    proc = run_helm(helm, "template", "icd", str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert proc.returncode != 0 and "serviceAccount.name" in proc.stderr
    objs = render(helm, "--set", "serviceAccount.create=false,serviceAccount.name=platform-operator")
    assert not by_kind(objs, "ServiceAccount")
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-operator"


def test_install_notes_tell_the_user_what_to_do_next(helm):
    proc = run_helm(helm, "install", "icd", str(CHART), "--dry-run=client", "--namespace", "ops",
                    "-f", str(ALL_ON_VALUES))
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n ops rollout status deployment/icd-indexcache-operator" in notes
    assert "examples/indexcachedeployment.yaml" in notes
    assert 'indexcache.io/recalibrate=' in notes
    assert "4 dashboards" in notes and "PodMonitor created" in notes
