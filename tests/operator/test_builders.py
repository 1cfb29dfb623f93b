"""Pure builders and decisions: manifests valid for KubeRay and Kubernetes, serve config per the
contract, pattern expansion, the quality gate, readiness, and a light operator package."""
import functools
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from indexcache_operator import builders as b
from indexcache_operator.config import ConfigError, OperatorConfig
from indexcache_operator.models import IndexCacheDeploymentSpec
from indexcache_operator.patterns import full_layers, pattern_from_freq, pattern_problem
from indexcache_operator.reconcile import Decision, gate, rayservice_health

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pod_security import restricted_violations  # noqa: E402
OWNER = b.Owner(name="chat", namespace="serving", uid="1234")
CONFIG = OperatorConfig()


def spec(**over) -> IndexCacheDeploymentSpec:
    base = {"model": {"uri": "/models/glm5", "numLayers": 8}, "replicas": 2, "gpusPerReplica": 4,
            "indexCache": {"pattern": "FFSSFSSS"}, "cost": {"gpuHourlyUSD": 2.5},
            "traffic": {"sampleRate": 0.1}}
    base.update(over)
    return IndexCacheDeploymentSpec.model_validate(base)


SCHEDULED = {
    "imagePullSecrets": [{"name": "regcred"}],
    "head": {"resources": {"requests": {"cpu": 4}}, "nodeSelector": {"pool": "cpu"},
             "env": [{"name": "RAY_LOG", "value": "debug"}]},
    "workers": {"resources": {"requests": {"memory": "200Gi"}, "limits": {"memory": "200Gi"}},
                "nodeSelector": {"pool": "h200"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
    "recalibration": {"job": {"resources": {"requests": {"cpu": "16"}}, "nodeSelector": {"pool": "h200"},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                              "env": [{"name": "CALIB_THREADS", "value": "8"}]}},
}


@functools.cache
def _kuberay_schema(path: Path) -> dict:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 18K lines
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("variant", [
    {},
    {"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}},   # Serve scales from zero
    {"autoscaling": {"minReplicas": 1, "maxReplicas": 6, "targetOngoingRequests": 3}, "replicas": 2},
    {"indexCache": {}, "model": {"uri": "smollm2"}},
    {"model": {"uri": "s3://models/glm5", "numLayers": 8, "cacheVolume": {"claimName": "model-cache"},
               "credentialsSecret": "s3-credentials"}},
    {"model": {"uri": "pvc://weights/glm5", "numLayers": 8}},
])
def test_rayservice_is_valid_for_kuberay_and_carries_the_serve_contract(kit, variant):
    s = spec(**variant)
    b_pattern = s.index_cache.pattern
    rs = b.rayservice(OWNER, s, CONFIG, b_pattern, 3)
    jsonschema.Draft7Validator(_kuberay_schema(kit.KUBERAY_CRD)).validate(rs)
    assert rs["metadata"]["ownerReferences"][0] == {
        "apiVersion": "indexcache.io/v1alpha1", "kind": "IndexCacheDeployment", "name": "chat", "uid": "1234",
        "controller": True, "blockOwnerDeletion": True}
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "indexcache.serving.app:build_app"
    assert app["args"]["model"] == s.model.uri and app["args"]["deployment"] == "chat"
    server = next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")
    # gpusPerReplica 4: a 4-rank tensor-parallel replica; its placement group holds the 4 GPUs on one node
    # (STRICT_PACK), in bundles that fit the one worker pod that has them
    assert app["args"]["tensor_parallel_size"] == s.gpus_per_replica == 4
    assert server["ray_actor_options"]["num_gpus"] == 0 and server["placement_group_strategy"] == "STRICT_PACK"
    bundles = server["placement_group_bundles"]
    assert sum(bundle.get("GPU", 0) for bundle in bundles) == 4 and [bundle.get("GPU", 0) for bundle in bundles] == [0, 1, 1, 1, 1]
    pod_cpu = parse_quantity(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                             ["resources"]["limits"]["cpu"])
    assert sum(bundle["CPU"] for bundle in bundles) <= pod_cpu
    expected_user_config = {"pattern_version": 3, "sample_rate": 0.1, "gpu_hourly_usd": 10.0}
    if b_pattern:
        expected_user_config["pattern"] = b_pattern
    assert server["user_config"] == expected_user_config
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    # readiness: /readyz on the port each replica serves (app arg metrics_port), 503 until its model is loaded
    container = worker["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]["httpGet"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/readyz" and named[probe["port"]] == app["args"]["metrics_port"]
    assert "livenessProbe" not in container   # KubeRay's own: a replica restart must not kill the pod
    assert parse_quantity(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 4
    if s.autoscaling:
        a = s.autoscaling
        assert server["autoscaling_config"] == {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                                "initial_replicas": s.replicas,
                                                "target_ongoing_requests": a.target_ongoing_requests}
        assert (worker["minReplicas"], worker["maxReplicas"]) == (a.min_replicas, a.max_replicas)
        assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    else:
        assert server["num_replicas"] == s.replicas == worker["replicas"] == worker["maxReplicas"]
    # The one ingress replica holds the app-wide limit: maxOngoingRequests per replica, times the replicas
    # (the most it may scale to), and Serve's own cap on it sits above so that it answers 429 itself.
    ingress = next(d for d in app["deployments"] if d["name"] == "OpenAIIngress")
    replicas = s.autoscaling.max_replicas if s.autoscaling else s.replicas
    assert ingress["user_config"] == {"max_ongoing_requests": s.max_ongoing_requests * replicas}
    assert ingress["max_ongoing_requests"] > s.max_ongoing_requests * replicas
    from ray.serve.schema import ServeDeploySchema
    ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))   # what Ray Serve accepts


def test_replicas_zero_builds_no_serve_config_ray_would_refuse():
    """Ray Serve refuses num_replicas 0 (KubeRay could never apply such a RayService); the operator removes
    the RayService instead (test_operator), and the builder refuses to build one."""
    from ray.serve.schema import ServeDeploySchema
    with pytest.raises(ValueError, match="replicas is 0"):
        b.rayservice(OWNER, spec(replicas=0), CONFIG, "FFSSFSSS", 1)
    broken = yaml.safe_load(b.rayservice(OWNER, spec(replicas=1), CONFIG, "FFSSFSSS", 1)["spec"]["serveConfigV2"])
    broken["applications"][0]["deployments"][0]["num_replicas"] = 0   # what the builder used to write
    with pytest.raises(ValueError, match="num_replicas"):
        ServeDeploySchema.model_validate(broken)


def test_scaling_changes_the_app_limit_in_place_without_redeploying():
    """A new replica count must not change the app's args (that redeploys every replica): only lightweight
    options move, the server's num_replicas and the ingress's limit (user_config) and cap."""
    apps = [yaml.safe_load(b.rayservice(OWNER, spec(replicas=n, maxOngoingRequests=10), CONFIG, "FFSSFSSS", 1)
                           ["spec"]["serveConfigV2"])["applications"][0] for n in (1, 4)]
    assert apps[0]["args"] == apps[1]["args"] and apps[0]["import_path"] == apps[1]["import_path"]
    ingress = [next(d for d in a["deployments"] if d["name"] == "OpenAIIngress") for a in apps]
    assert [i["user_config"]["max_ongoing_requests"] for i in ingress] == [10, 40]
    for a in apps:
        for dep in a["deployments"]:
            for key in ("num_replicas", "user_config", "max_ongoing_requests"):
                dep.pop(key, None)
    assert apps[0] == apps[1]


def test_a_new_pattern_changes_only_user_config():
    s = spec()
    before = b.rayservice(OWNER, s, CONFIG, "FFSSFSSS", 1)
    after = b.rayservice(OWNER, s, CONFIG, "FSSSFSSS", 2)
    assert before["spec"]["rayClusterConfig"] == after["spec"]["rayClusterConfig"]
    app_before = yaml.safe_load(before["spec"]["serveConfigV2"])["applications"][0]
    app_after = yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]
    for app in (app_before, app_after):
        for dep in app["deployments"]:
            dep.pop("user_config", None)
    assert app_before == app_after
    assert b.read_user_config(after)["pattern"] == "FSSSFSSS"


# The oldest Kubernetes the chart supports and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("build", [
    lambda: b.samples_claim(OWNER, spec(traffic={"storageClassName": "nfs"})),
    lambda: b.service_account(OWNER),
    lambda: b.role(OWNER),
    lambda: b.role_binding(OWNER),
    lambda: b.ondemand_job(OWNER, spec(), CONFIG, "2026-11-28T10:00"),
    lambda: b.ondemand_job(OWNER, spec(**SCHEDULED), CONFIG, "2026-11-28T10:00"),
    lambda: b.recalibration_cronjob(OWNER, spec(recalibration={"schedule": "0 3 * * 0"}), CONFIG),
    lambda: b.recalibration_cronjob(OWNER, spec(**{**SCHEDULED, "recalibration": {
        **SCHEDULED["recalibration"], "schedule": "0 3 * * 0"}}), CONFIG, hold=True),
    lambda: b.ondemand_job(OWNER, spec(model={"uri": "hf://acme/glm5@v1", "credentialsSecret": "hf-token",
                                              "cacheVolume": {"claimName": "models"}}), CONFIG, "t"),
    lambda: b.ondemand_job(OWNER, spec(model={"uri": "pvc://weights/glm5"}), CONFIG, "t"),
    lambda: b.model_cache_claim(OWNER, spec(model={"uri": "s3://models/glm5", "cacheVolume": {"size": "200Gi"}})),
    lambda: b.model_cache_claim(OWNER, spec(model={"uri": "s3://models/glm5", "cacheVolume": {
        "size": "1.5Ti", "storageClassName": "local-nvme", "accessMode": "ReadWriteOnce"}})),
], ids=["pvc", "serviceaccount", "role", "rolebinding", "job", "job-scheduled", "cronjob", "cronjob-scheduled",
        "job-hf-model-cache", "job-pvc-model", "model-cache-claim", "model-cache-claim-rwo"])
def test_builtin_manifests_pass_kubernetes_validation(build, k8s):
    obj = build()
    kubernetes_validate.validate(obj, k8s, strict=True)
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "1234"
    assert obj["metadata"]["labels"]["indexcache.io/deployment"] == "chat"


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_the_pods_inside_the_rayservice_pass_kubernetes_validation(kit, k8s):
    """KubeRay's CRD keeps pod templates loosely typed; its controller hands them to the API server as
    Pods, so they are checked against the Pod schema too (head and workers, with every setting)."""
    rs = b.rayservice(OWNER, spec(**SCHEDULED), CONFIG, "FFSSFSSS", 1)
    jsonschema.Draft7Validator(_kuberay_schema(kit.KUBERAY_CRD)).validate(rs)
    cluster = rs["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, k8s, strict=True)


def test_recalibration_job_runs_the_calibrate_contract():
    job = b.ondemand_job(OWNER, spec(recalibration={"targetFullFraction": 0.25, "timeoutSeconds": 900}),
                         CONFIG, "tok")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == [
        "indexcache", "calibrate", "--model", "/models/glm5", "--samples", "/samples", "--target-full", "0.25",
        "--device", "cuda", "--out", "/results/result.json", "--report-configmap", "$(POD_NAMESPACE)/$(JOB_NAME)-result"]
    assert {e["name"] for e in container["env"]} == {"JOB_NAME", "POD_NAMESPACE", "INDEXCACHE_MODEL_CACHE",
                                                     "INDEXCACHE_OFFLINE", "HF_HUB_OFFLINE"}
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "chat-recalibration"
    # Deterministic: the same token names the same Job (a retry is "already exists").
    assert b.ondemand_job_name(OWNER, "tok") == job["metadata"]["name"] != b.ondemand_job_name(OWNER, "tok2")
    assert len(b.ondemand_job_name(b.Owner("a" * 40, "ns", "u"), "t")) <= 63


def _pod_templates(obj: dict) -> dict[str, dict]:
    if obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"]}
    return {"job": obj["spec"]["template"]}


@pytest.mark.parametrize("model,cache_volume", [
    ({"uri": "hf://acme/glm5@main", "credentialsSecret": "hf-token"}, {"emptyDir": {}}),
    ({"uri": "s3://models/glm5", "cacheVolume": {"claimName": "shared-models"}},
     {"persistentVolumeClaim": {"claimName": "shared-models"}}),
    ({"uri": "smollm2"}, {"emptyDir": {}}),
    ({"uri": "hf://acme/glm5", "cacheVolume": {"size": "200Gi"}},
     {"persistentVolumeClaim": {"claimName": "chat-model-cache"}}),
])
def test_replicas_and_jobs_fetch_the_model_into_the_cache_first(model, cache_volume):
    """Every pod that loads the model starts with `indexcache fetch URI --cache /model-cache` (credentials from
    the Secret, failure reason as termination message); its main container reads that cache read-only and
    offline, so it never starts on a half model nor downloads one itself. The head holds no model replica."""
    s = spec(model={**model, "numLayers": 8})
    rs = b.rayservice(OWNER, s, CONFIG, None, 0)
    job = b.ondemand_job(OWNER, s, CONFIG, "t")
    templates = {**_pod_templates(rs), **_pod_templates(job)}
    assert "initContainers" not in templates.pop("head")["spec"]
    for role, template in templates.items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role},
                                      "template": template}, "1.37.0", strict=True)
        pod = template["spec"]
        [init] = pod["initContainers"]
        assert init["command"] + init["args"] == ["indexcache", "fetch", model["uri"], "--cache", "/model-cache"]
        assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "INDEXCACHE_TERMINATION_LOG", "value": "/dev/termination-log"} in init["env"]
        assert init.get("envFrom") == ([{"secretRef": {"name": model["credentialsSecret"]}}]
                                       if "credentialsSecret" in model else None)
        assert {"name": "model-cache", **cache_volume} in pod["volumes"]
        assert {"name": "model-cache", "mountPath": "/model-cache", "readOnly": False} in init["volumeMounts"]
        main = pod["containers"][0]
        assert {"name": "model-cache", "mountPath": "/model-cache", "readOnly": True} in main["volumeMounts"]
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["INDEXCACHE_MODEL_CACHE"] == "/model-cache" and env["INDEXCACHE_OFFLINE"] == "1"
        assert "envFrom" not in main      # the credentials stay with the download
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["model"] == model["uri"] and app["args"]["model_cache"] == "/model-cache"
    from indexcache_contracts.serve_app import parse_app_args
    parse_app_args(app["args"])   # the serve app accepts the args the operator writes (build_app parses with it)


def test_the_model_cache_claim_the_operator_creates_follows_the_spec():
    """cacheVolume.size: a claim named after the deployment, ReadWriteMany unless asked otherwise (replicas on
    several nodes and the Jobs mount it at once), the cluster's default class unless one is named."""
    plain = b.model_cache_claim(OWNER, spec(model={"uri": "s3://m/g", "cacheVolume": {"size": "200Gi"}}))
    assert plain["metadata"]["name"] == "chat-model-cache"
    assert plain["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}}}
    local = b.model_cache_claim(OWNER, spec(model={"uri": "s3://m/g", "cacheVolume": {
        "size": "1Ti", "storageClassName": "local-nvme", "accessMode": "ReadWriteOnce"}}))
    assert local["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Ti"}},
                             "storageClassName": "local-nvme"}
    assert not b.creates_model_cache_claim(spec(model={"uri": "s3://m/g", "cacheVolume": {"claimName": "x"}}))
    assert not b.creates_model_cache_claim(spec(model={"uri": "s3://m/g"}))


def test_a_pvc_model_is_mounted_where_the_resolver_reads_it():
    from indexcache.model.storage import DEFAULT_PVC_ROOT, parse_uri
    s = spec(model={"uri": "pvc://weights/glm5/v2"})
    for template in {**_pod_templates(b.rayservice(OWNER, s, CONFIG, None, 0)),
                     **_pod_templates(b.ondemand_job(OWNER, s, CONFIG, "t"))}.values():
        pod = template["spec"]
        if "initContainers" not in pod:
            continue
        assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} \
            in pod["volumes"]
        for container in pod["initContainers"] + pod["containers"]:
            mount = next(m for m in container["volumeMounts"] if m["name"] == "model-source")
            assert mount["readOnly"] is True
            assert str(parse_uri(s.model.uri).path).startswith(mount["mountPath"] + "/")
    assert b.PVC_ROOT == DEFAULT_PVC_ROOT


def test_recalibration_job_runs_on_the_gpus_it_holds():
    """Issue 19 item 8: the Job held GPUs but calibrated on the CPU (the CLI's default device) and asked
    for no CPU or memory, so a node without room for the model could take it."""
    job = b.ondemand_job(OWNER, spec(gpusPerReplica=4), CONFIG, "tok")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--device") + 1] == "cuda"
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert parse_quantity(requests["nvidia.com/gpu"]) == parse_quantity(limits["nvidia.com/gpu"]) == 4
    assert parse_quantity(requests["cpu"]) == parse_quantity(CONFIG.worker_cpu)
    assert parse_quantity(requests["memory"]) == parse_quantity(limits["memory"]) == parse_quantity(CONFIG.worker_memory)
    # The scheduled runs are the same Job.
    cron = b.recalibration_cronjob(OWNER, spec(gpusPerReplica=4, recalibration={"schedule": "@daily"}), CONFIG)
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0] == container


def test_cronjob_follows_schedule_and_suspend():
    cj = b.recalibration_cronjob(OWNER, spec(recalibration={"schedule": "@daily", "suspend": True}), CONFIG)
    assert (cj["spec"]["schedule"], cj["spec"]["suspend"], cj["spec"]["concurrencyPolicy"]) == ("@daily", True, "Forbid")
    assert cj["spec"]["jobTemplate"]["metadata"]["labels"]["app.kubernetes.io/component"] == "recalibration"


@pytest.mark.parametrize("layers,freq,offset,full,first", [
    (47, 4, 2, 13, [0, 1, 5, 9]),
    (78, 4, 3, 21, [0, 1, 2, 6]),
    (8, 1, 2, 8, [0, 1, 2, 3]),
])
def test_pattern_from_freq_matches_upstream(layers, freq, offset, full, first):
    p = pattern_from_freq(layers, freq, offset)
    assert len(p) == layers and full_layers(p) == full
    assert [i for i, c in enumerate(p) if c == "F"][:4] == first


def test_pattern_problems_name_the_fix():
    assert pattern_problem("FFSS", 4) is None
    assert "model.numLayers is 8" in pattern_problem("FFSS", 8)
    assert "start with F" in pattern_problem("SFSS", None)


@pytest.mark.parametrize("policy,limit,delta,decision", [
    ("Gated", 0.02, 0.01, Decision.applied),
    ("Gated", 0.02, 0.02, Decision.applied),
    ("Gated", 0.02, 0.05, Decision.rejected),
    ("Never", 1.0, 0.0, Decision.recommended),
    ("Always", 0.0, 0.5, Decision.applied),
])
def test_quality_gate(policy, limit, delta, decision):
    got, why = gate(spec(recalibration={"autoApply": policy, "maxLossDelta": limit}), delta)
    assert got == decision and why


def _rs(generation=2, observed=2, app="RUNNING", server="HEALTHY", pending=False):
    return {"metadata": {"generation": generation}, "status": {
        "observedGeneration": observed,
        "pendingServiceStatus": {"applicationStatuses": {"indexcache": {}}} if pending else {},
        "activeServiceStatus": {
            "applicationStatuses": {"indexcache": {"status": app, "serveDeploymentStatuses": {
                "IndexCacheServer": {"status": server}}}},
            "rayClusterStatus": {"desiredWorkerReplicas": 2, "readyWorkerReplicas": 2}}}}


@pytest.mark.parametrize("rs,serving,reason", [
    (_rs(), True, "ServeAppHealthy"),
    (_rs(generation=3, observed=2), False, "RayServiceUpdating"),
    (_rs(app="DEPLOYING"), False, "ServeAppNotRunning"),
    (_rs(server="UNHEALTHY"), False, "ServerNotHealthy"),
    (_rs(pending=True), False, "RayServiceUpgrading"),
    (None, False, "RayServiceMissing"),
])
def test_ready_only_when_kuberay_reports_the_current_app_healthy(rs, serving, reason):
    got = rayservice_health(rs)
    assert (got[0], got[1]) == (serving, reason)


def test_config_is_read_from_the_environment_with_clear_errors():
    cfg = OperatorConfig.from_env({"INDEXCACHE_SERVING_IMAGE": "r/x:1", "INDEXCACHE_OPERATOR_METRICS_PORT": "9100"})
    assert (cfg.serving_image, cfg.metrics_port) == ("r/x:1", 9100)
    with pytest.raises(ConfigError, match="INDEXCACHE_OPERATOR_RESYNC_SECONDS"):
        OperatorConfig.from_env({"INDEXCACHE_OPERATOR_RESYNC_SECONDS": "soon"})


def test_operator_imports_without_torch_or_ray():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'ray'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(ROOT / 'operator')!r})\n"
        "import indexcache_operator.handlers, indexcache_operator.crd, indexcache_operator.__main__\n"
        "assert not any(m.split('.')[0] in ('torch', 'ray') for m in sys.modules)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_operator_image_installs_no_torch_or_ray():
    dockerfile = "\n".join(line for line in (ROOT / "docker" / "operator.Dockerfile").read_text().splitlines()
                           if not line.lstrip().startswith("#"))
    assert ".[operator]" in dockerfile and "torch" not in dockerfile and "ray" not in dockerfile.replace("ray.io", "")
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["operator"]
    assert not [d for d in extras if d.split("[")[0].split("=")[0].split(">")[0].strip() in ("torch", "ray")]
    assert "indexcache-operator" in dockerfile


@pytest.mark.parametrize("desired,actual,equal", [
    ({"nvidia.com/gpu": 1}, {"nvidia.com/gpu": "1"}, True),
    ({"cpu": "0.5"}, {"cpu": "500m"}, True),
    ({"memory": "1Gi"}, {"memory": "1024Mi"}, True),
    ({"memory": "8Gi"}, {"memory": "8G"}, False),
    ({"nvidia.com/gpu": 2}, {"nvidia.com/gpu": "1"}, False),
])
def test_resource_quantities_compare_by_value(desired, actual, equal):
    from indexcache_operator.reconcile import is_subset
    assert is_subset({"resources": {"limits": desired}}, {"resources": {"limits": actual, "extra": 1}}) is equal
    # Outside requests/limits a string is not a number.
    assert is_subset({"replicas": 1}, {"replicas": "1"}) is False


# ---- pods: PodSecurity "restricted", scheduling and environment (issue 19 item 11) ----------------------

def _all_pods(s: IndexCacheDeploymentSpec) -> dict[str, dict]:
    rs = b.rayservice(OWNER, s, CONFIG, "FFSSFSSS", 1)["spec"]["rayClusterConfig"]
    cron = b.recalibration_cronjob(OWNER, s.model_copy(update={"recalibration": s.recalibration.model_copy(
        update={"schedule": "@daily"})}), CONFIG)
    return {"head": rs["headGroupSpec"]["template"]["spec"],
            "worker": rs["workerGroupSpecs"][0]["template"]["spec"],
            "job": b.ondemand_job(OWNER, s, CONFIG, "t")["spec"]["template"]["spec"],
            "cronjob": cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]}


def test_every_generated_pod_passes_podsecurity_restricted():
    for name, pod in _all_pods(spec()).items():
        assert restricted_violations(pod) == [], name


def test_the_restricted_check_has_teeth():
    pod = _all_pods(spec())["worker"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    assert len(restricted_violations(pod)) == 2


def test_scheduling_and_env_settings_reach_their_pods():
    pods = _all_pods(spec(**SCHEDULED))
    for name, pod in pods.items():
        assert pod["imagePullSecrets"] == [{"name": "regcred"}], name
        assert restricted_violations(pod) == [], name
    head, worker, job = pods["head"], pods["worker"], pods["job"]
    assert head["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in head
    assert worker["nodeSelector"] == {"pool": "h200"} and worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job["nodeSelector"] == {"pool": "h200"} and pods["cronjob"]["tolerations"] == job["tolerations"]
    assert {"name": "RAY_LOG", "value": "debug"} in head["containers"][0]["env"]
    # the user's env follows the operator's own (the model cache, read offline: b.MODEL_READER_ENV)
    assert worker["containers"][0]["env"] == b.MODEL_READER_ENV + [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    assert [e["name"] for e in job["containers"][0]["env"]] == (
        ["JOB_NAME", "POD_NAMESPACE"] + [e["name"] for e in b.MODEL_READER_ENV] + ["CALIB_THREADS"])
    # Resources: the user's over the defaults; a request above a default limit lifts the limit.
    head_res = head["containers"][0]["resources"]
    assert (head_res["requests"]["cpu"], head_res["limits"]["cpu"]) == ("4", "4")
    assert head_res["requests"]["memory"] == CONFIG.head_memory
    worker_res = worker["containers"][0]["resources"]
    assert worker_res["requests"]["memory"] == worker_res["limits"]["memory"] == "200Gi"
    assert worker_res["limits"]["nvidia.com/gpu"] == "4"  # gpusPerReplica, whatever the user wrote
    assert job["containers"][0]["resources"]["requests"]["cpu"] == "16"


def test_bad_pod_settings_degrade_with_the_field_named():
    from indexcache_operator.reconcile import operator_checks
    problems = operator_checks(spec(workers={"resources": {"limits": {"memory": "lots", "nvidia.com/gpu": 2}}},
                                    recalibration={"job": {"env": [{"name": "JOB_NAME", "value": "x"}]}}))
    messages = " ".join(m for _, m in problems)
    assert "spec.workers.resources.limits.memory: 'lots' is not a Kubernetes quantity" in messages
    assert "spec.workers.resources.limits.nvidia.com/gpu: GPUs come from spec.gpusPerReplica" in messages
    assert "spec.recalibration.job.env: JOB_NAME is set by the operator" in messages
