"""Pure manifest builders: (owner, spec, config, pattern) -> Kubernetes objects as dicts.

No API calls here, so every manifest the operator writes can be unit-tested and validated against
KubeRay's CRD schema and the Kubernetes OpenAPI schemas.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import yaml
from kubernetes.utils import parse_quantity
from indexcache_contracts.serve_app import (INGRESS_DEPLOYMENT, INGRESS_HEADROOM, SERVE_IMPORT_PATH,
                                            SERVER_DEPLOYMENT, server_resources)

from indexcache_operator import (API_VERSION, COMPONENT_LABEL, DEPLOYMENT_LABEL, KIND, MANAGED_BY,
                                 MANAGED_BY_LABEL)
from indexcache_operator.config import OperatorConfig
from indexcache_operator.models import CacheAccessMode, IndexCacheDeploymentSpec, PodSettings

SERVE_APP_NAME = "indexcache"
SERVE_PORT = 8000
# Each IndexCacheServer replica serves its own /metrics on this port in its worker pod (app arg metrics_port):
# the head's /metrics route answers for one replica picked at random. Outside Ray's ports (6379, 8265,
# 10001, its metrics agent's 8080, workers 10002-19999).
REPLICA_METRICS_PORT = 9095
METRICS_PORT_NAME = "metrics"
READINESS_PATH = "/readyz"   # on the metrics port: the replica's model is loaded and its engine runs
SAMPLES_DIR = "/samples"
RESULTS_DIR = "/results"
MODEL_CACHE_DIR = "/model-cache"
PVC_ROOT = "/mnt/pvc"   # pvc://claim/path is read at PVC_ROOT/claim/path (indexcache.model.storage)
WORKER_GROUP = "gpu"
ROLE_LABEL = f"{DEPLOYMENT_LABEL.split('/')[0]}/role"
GPU_RESOURCE = "nvidia.com/gpu"
FETCH_CONTAINER = "fetch-model"   # its termination message is read back by delivery.py


@dataclass(frozen=True)
class Owner:
    """The IndexCacheDeployment that owns the children (what owner references need)."""
    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict) -> "Owner":
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""))


# ---- names ----------------------------------------------------------------------------------

def rayservice_name(owner: Owner) -> str:
    return owner.name


def samples_claim_name(owner: Owner) -> str:
    return f"{owner.name}-samples"


def model_cache_claim_name(owner: Owner) -> str:
    return f"{owner.name}-model-cache"


def recalibration_account_name(owner: Owner) -> str:
    return f"{owner.name}-recalibration"


def cronjob_name(owner: Owner) -> str:
    return f"{owner.name}-recal"


def ondemand_job_name(owner: Owner, token: str) -> str:
    """Deterministic per annotation token: a retry or a second operator creates the same Job."""
    return f"{owner.name}-recal-{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def result_configmap_name(job_name: str) -> str:
    return f"{job_name}-result"


def replica_selector(owner: Owner) -> str:
    return f"{DEPLOYMENT_LABEL}={owner.name},{ROLE_LABEL}=replica"


# ---- shared metadata -----------------------------------------------------------------------

def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "indexcache",
        "app.kubernetes.io/instance": owner.name,
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
        DEPLOYMENT_LABEL: owner.name,
    }


def owner_reference(owner: Owner) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(owner: Owner, name: str, component: str) -> dict:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner_reference(owner)]}


# ---- the serving app ------------------------------------------------------------------------

def user_config(spec: IndexCacheDeploymentSpec, pattern: str | None, pattern_version: int) -> dict:
    """Runtime knobs of IndexCacheServer, applied by reconfigure() without restarting replicas.

    `pattern` is what the operator resolved (a calibrated pattern, or the spec's, expanded from freq when
    model.numLayers is given). Without one, spec.indexCache.freq/offset travel as they are and the replica
    resolves them with its model's layer count; with neither, no key: the checkpoint's own index_topk_*
    config. gpu_hourly_usd is the price of one replica's GPUs (docs/contracts.md): the per-GPU price
    times gpusPerReplica."""
    config: dict = {"pattern_version": pattern_version,
                    "sample_rate": spec.traffic.sample_rate,
                    "gpu_hourly_usd": spec.cost.gpu_hourly_usd * spec.gpus_per_replica}
    rule = pattern_rule(spec)
    if pattern:
        config = {"pattern": pattern, **config}
    elif rule is not None:
        config = {"freq": rule[0], "offset": rule[1], **config}
    return config


def pattern_rule(spec: IndexCacheDeploymentSpec) -> tuple[int, int] | None:
    """(freq, offset) the replica resolves itself: spec.indexCache.freq without model.numLayers."""
    ic = spec.index_cache
    if ic.pattern or ic.freq is None or spec.model.num_layers is not None:
        return None
    return ic.freq, ic.offset if ic.offset is not None else 2


def app_max_ongoing_requests(spec: IndexCacheDeploymentSpec) -> int:
    """The app-wide limit the one ingress replica enforces (429 beyond it): maxOngoingRequests per replica
    times the replicas, at most autoscaling.maxReplicas under autoscaling (requests beyond what the
    running replicas take wait in Ray Serve's queue, which is what scales the app up)."""
    replicas = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas
    return spec.max_ongoing_requests * replicas


def scaled_to_zero(spec: IndexCacheDeploymentSpec) -> bool:
    """replicas: 0 without autoscaling: nothing serves, and no RayService exists (Ray Serve refuses
    num_replicas 0)."""
    return spec.replicas == 0 and spec.autoscaling is None


def serve_config(owner: Owner, spec: IndexCacheDeploymentSpec, pattern: str | None,
                 pattern_version: int) -> dict:
    if scaled_to_zero(spec):
        raise ValueError("spec.replicas is 0: Ray Serve has no zero-replica deployment; "
                         "the operator removes the RayService instead of building one")
    server: dict = {
        "name": SERVER_DEPLOYMENT,
        "max_ongoing_requests": spec.max_ongoing_requests,
        # gpusPerReplica > 1: the tensor-parallel size; the replica reserves a placement group of one CPU
        # bundle (itself) and one GPU bundle per shard worker on one node (STRICT_PACK: the replica's pod)
        **(server_resources(spec.gpus_per_replica, 1, 1) if spec.gpus_per_replica > 1
           else {"ray_actor_options": {"num_gpus": spec.gpus_per_replica}}),
        "user_config": user_config(spec, pattern, pattern_version),
    }
    if spec.autoscaling is None:
        server["num_replicas"] = spec.replicas
    else:
        server["autoscaling_config"] = {
            "min_replicas": spec.autoscaling.min_replicas,
            "max_replicas": spec.autoscaling.max_replicas,
            "initial_replicas": spec.replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests,
        }
    app_limit = app_max_ongoing_requests(spec)
    return {
        "applications": [{
            "name": SERVE_APP_NAME,
            "route_prefix": "/",
            "import_path": SERVE_IMPORT_PATH,
            # Structural settings only: changing these redeploys the app. Runtime knobs (pattern,
            # sample rate, price) are in user_config so that changing them restarts nothing.
            "args": {
                "model": spec.model.uri,
                "served_model_name": spec.model.served_model_name or owner.name,
                "deployment": owner.name,
                "max_ongoing_requests": spec.max_ongoing_requests,
                "samples_dir": SAMPLES_DIR,
                "model_cache": MODEL_CACHE_DIR,
                "metrics_port": REPLICA_METRICS_PORT,
                # the model sharded over the replica's GPUs (tensor + expert parallel); 1: in-process
                "tensor_parallel_size": spec.gpus_per_replica,
            },
            "deployments": [
                server,
                # The limit is the ingress's user_config and Serve's cap a deployment option: a new
                # replica count changes both in place, restarting nothing.
                {"name": INGRESS_DEPLOYMENT, "num_replicas": 1,
                 "max_ongoing_requests": app_limit + INGRESS_HEADROOM,
                 "user_config": {"max_ongoing_requests": app_limit},
                 "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}},
            ],
        }],
    }


def _samples_volume(owner: Owner, read_only: bool) -> dict:
    return {"name": "samples", "persistentVolumeClaim": {"claimName": samples_claim_name(owner),
                                                         "readOnly": read_only}}


# ---- model delivery: an init container fetches spec.model.uri into the cache volume -------------

def _source_claim(spec: IndexCacheDeploymentSpec) -> str | None:
    uri = spec.model.uri
    return uri[len("pvc://"):].split("/", 1)[0] if uri.startswith("pvc://") else None


def creates_model_cache_claim(spec: IndexCacheDeploymentSpec) -> bool:
    """spec.model.cacheVolume.size: the operator creates the deployment's cache claim."""
    return spec.model.cache_volume is not None and spec.model.cache_volume.size is not None


def model_cache_claim(owner: Owner, spec: IndexCacheDeploymentSpec) -> dict:
    """The model cache claim the operator creates (creates_model_cache_claim): owned by the deployment, so
    it goes with it; the replicas' and Jobs' init containers fill it once."""
    cache = spec.model.cache_volume
    assert cache is not None and cache.size is not None, "no cacheVolume.size: no claim to create"
    mode = cache.access_mode or CacheAccessMode.read_write_many
    claim_spec: dict = {"accessModes": [mode.value], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(owner, model_cache_claim_name(owner), "model-cache"), "spec": claim_spec}


def model_volumes(owner: Owner, spec: IndexCacheDeploymentSpec) -> list[dict]:
    """The cache: an emptyDir per pod (no cacheVolume, KServe's default), the user's claim, or the one the
    operator creates."""
    cache = spec.model.cache_volume
    if cache is None:
        volumes = [{"name": "model-cache", "emptyDir": {}}]
    else:
        claim = model_cache_claim_name(owner) if creates_model_cache_claim(spec) else cache.claim_name
        volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}}]
    if claim := _source_claim(spec):
        volumes.append({"name": "model-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return volumes


def model_mounts(spec: IndexCacheDeploymentSpec, read_only: bool) -> list[dict]:
    mounts = [{"name": "model-cache", "mountPath": MODEL_CACHE_DIR, "readOnly": read_only}]
    if claim := _source_claim(spec):
        mounts.append({"name": "model-source", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return mounts


# What reads the model: the cache only (the init container has verified it), never the network.
MODEL_READER_ENV = [{"name": "INDEXCACHE_MODEL_CACHE", "value": MODEL_CACHE_DIR},
                    {"name": "INDEXCACHE_OFFLINE", "value": "1"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]


def fetch_model_container(spec: IndexCacheDeploymentSpec, image: str) -> dict:
    """`indexcache fetch` into the cache volume: the pod's other containers start only once the model is
    complete and verified. Its termination message is the result ({"path", "revision", ...}) or the error
    with its reason (and, should it crash, its last log lines)."""
    container = {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": ["indexcache"],
        "args": ["fetch", spec.model.uri, "--cache", MODEL_CACHE_DIR],
        # the JSON result (path, revision) or the error and its reason, in the pod's status
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "INDEXCACHE_TERMINATION_LOG", "value": "/dev/termination-log"}],
        "volumeMounts": model_mounts(spec, read_only=False),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(CONTAINER_SECURITY),
    }
    if spec.model.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.model.credentials_secret}}]
    return container


# ---- pods: security, scheduling, environment -------------------------------------------------

# PodSecurity "restricted" (namespaces may enforce it): non-root, no privilege escalation, no
# capabilities, the runtime's seccomp profile. The serving image runs as this user (docker/serving.Dockerfile).
SERVING_UID = 1000
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": SERVING_UID, "runAsGroup": SERVING_UID, "fsGroup": SERVING_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _quantity(value) -> str:
    return str(value)


def merged_resources(defaults: dict, settings: PodSettings, gpus: int | None = None) -> dict:
    """The user's requests/limits over the operator's defaults, per resource. A request the user raises
    above a default limit (or a limit lowered below a default request) moves the other with it, so the
    result is always valid; GPUs always come from gpusPerReplica."""
    requests = dict(defaults.get("requests", {}))
    limits = dict(defaults.get("limits", {}))
    user = settings.resources
    if user is not None:
        for name, value in user.requests.items():
            requests[name] = _quantity(value)
            if name not in user.limits and name in limits and parse_quantity(limits[name]) < parse_quantity(value):
                limits[name] = _quantity(value)
        for name, value in user.limits.items():
            limits[name] = _quantity(value)
            if name not in user.requests and name in requests and parse_quantity(requests[name]) > parse_quantity(value):
                requests[name] = _quantity(value)
    if gpus is not None:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_spec(spec: IndexCacheDeploymentSpec, settings: PodSettings, container: dict, volumes: list[dict],
             **pod_fields) -> dict:
    """A pod spec with one main container: restricted security context, the user's scheduling settings
    (nodeSelector, tolerations), environment and the deployment's image pull secrets."""
    container = {**container, "securityContext": dict(CONTAINER_SECURITY)}
    if settings.env:
        container["env"] = container.get("env", []) + [e.model_dump(by_alias=True, exclude_none=True)
                                                       for e in settings.env]
    pod: dict = {**pod_fields, "securityContext": dict(POD_SECURITY), "containers": [container], "volumes": volumes}
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in settings.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": r.name} for r in spec.image_pull_secrets]
    return pod


def rayservice(owner: Owner, spec: IndexCacheDeploymentSpec, config: OperatorConfig,
               pattern: str | None, pattern_version: int) -> dict:
    image = spec.image or config.serving_image
    pod_labels = labels(owner, "serving")
    head_container = {
        "name": "ray-head",
        "image": image,
        "ports": [{"containerPort": 6379, "name": "gcs"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"},
                  {"containerPort": SERVE_PORT, "name": "serve"}],
        "resources": merged_resources({"requests": {"cpu": config.head_cpu, "memory": config.head_memory},
                                       "limits": {"cpu": config.head_cpu, "memory": config.head_memory}}, spec.head),
        "volumeMounts": [{"name": "samples", "mountPath": SAMPLES_DIR}],
    }
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
        "template": {
            "metadata": {"labels": {**pod_labels, ROLE_LABEL: "head"}},
            "spec": pod_spec(spec, spec.head, head_container, [_samples_volume(owner, read_only=False)]),
        },
    }
    if spec.autoscaling is None:
        min_workers = max_workers = spec.replicas
    else:
        min_workers, max_workers = spec.autoscaling.min_replicas, spec.autoscaling.max_replicas
    worker_container = {
        "name": "ray-worker",
        "image": image,
        # Scraped by the chart's serving PodMonitor: one target per replica.
        "ports": [{"containerPort": REPLICA_METRICS_PORT, "name": METRICS_PORT_NAME}],
        # The replica in this pod serves /readyz on its metrics port: 503 while its model loads, 200 once
        # the engine runs (docs/contracts.md). A pod joins the Service endpoints only then. Liveness stays
        # KubeRay's (Ray's own checks): the port is down whenever Serve restarts the replica, which must
        # not kill the pod; Serve's check_health restarts a replica whose engine died.
        "readinessProbe": {"httpGet": {"path": READINESS_PATH, "port": METRICS_PORT_NAME},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "resources": merged_resources({"requests": {"cpu": config.worker_cpu, "memory": config.worker_memory},
                                       "limits": {"cpu": config.worker_cpu, "memory": config.worker_memory}},
                                      spec.workers, gpus=spec.gpus_per_replica),
        # The traffic sampler in each replica appends to the shared samples volume.
        "volumeMounts": [{"name": "samples", "mountPath": SAMPLES_DIR}] + model_mounts(spec, read_only=True),
        "env": list(MODEL_READER_ENV),
    }
    worker = {
        "groupName": WORKER_GROUP,
        "replicas": spec.replicas,
        "minReplicas": min_workers,
        "maxReplicas": max_workers,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": {**pod_labels, ROLE_LABEL: "replica"}},
            "spec": pod_spec(spec, spec.workers, worker_container,
                             [_samples_volume(owner, read_only=False)] + model_volumes(owner, spec),
                             # The replicas load the model (the head never does: it holds no GPU replica).
                             initContainers=[fetch_model_container(spec, image)]),
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata(owner, rayservice_name(owner), "serving"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(owner, spec, pattern, pattern_version),
                                            sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": config.ray_version,
                "enableInTreeAutoscaling": spec.autoscaling is not None,
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def read_user_config(rayservice_obj: dict) -> dict | None:
    """The IndexCacheServer user_config currently in a RayService's serve config."""
    text = rayservice_obj.get("spec", {}).get("serveConfigV2")
    if not text:
        return None
    for app in yaml.safe_load(text).get("applications", []):
        for dep in app.get("deployments", []):
            if dep.get("name") == SERVER_DEPLOYMENT:
                return dep.get("user_config")
    return None


# ---- traffic samples and recalibration ------------------------------------------------------

def samples_claim(owner: Owner, spec: IndexCacheDeploymentSpec) -> dict:
    claim_spec: dict = {
        # Every replica appends and the recalibration Job reads: many nodes at once.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": spec.traffic.storage_size}},
    }
    if spec.traffic.storage_class_name:
        claim_spec["storageClassName"] = spec.traffic.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(owner, samples_claim_name(owner), "traffic-samples"),
            "spec": claim_spec}


def service_account(owner: Owner) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": metadata(owner, recalibration_account_name(owner), "recalibration")}


def role(owner: Owner) -> dict:
    # The job reports its result as ConfigMap <job-name>-result; nothing else.
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(owner, recalibration_account_name(owner), "recalibration"),
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "verbs": ["create", "get", "update", "patch"]}]}


def role_binding(owner: Owner) -> dict:
    name = recalibration_account_name(owner)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": metadata(owner, name, "recalibration"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}]}


def calibrate_args(spec: IndexCacheDeploymentSpec) -> list[str]:
    # $(VAR) is expanded by the kubelet from the container's env (below).
    # --device cuda: the Job holds gpusPerReplica GPUs; the CLI's default is the CPU.
    return ["calibrate", "--model", spec.model.uri, "--samples", SAMPLES_DIR,
            "--target-full", str(spec.recalibration.target_full_fraction),
            "--device", "cuda",
            "--out", f"{RESULTS_DIR}/result.json",
            "--report-configmap", "$(POD_NAMESPACE)/$(JOB_NAME)-result"]


def job_resources(spec: IndexCacheDeploymentSpec, config: OperatorConfig) -> dict:
    """The calibration Job loads the whole model on its GPUs, like a replica: a replica's CPU and memory
    (requests, so the scheduler places it; memory also as the limit) and its GPUs; then
    spec.recalibration.job.resources over that."""
    return merged_resources({"requests": {"cpu": config.worker_cpu, "memory": config.worker_memory},
                             "limits": {"memory": config.worker_memory}}, spec.recalibration.job,
                            gpus=spec.gpus_per_replica)


def job_spec(owner: Owner, spec: IndexCacheDeploymentSpec, config: OperatorConfig) -> dict:
    """One Job spec for both on-demand Jobs and the CronJob's template. The pod learns its Job's
    name from the label the Job controller sets, so the CronJob needs no per-run name."""
    return {
        "backoffLimit": config.job_backoff_limit,
        "activeDeadlineSeconds": spec.recalibration.timeout_seconds,
        "ttlSecondsAfterFinished": config.job_ttl_seconds,
        "template": {
            "metadata": {"labels": labels(owner, "recalibration")},
            "spec": pod_spec(spec, spec.recalibration.job, {
                "name": "calibrate",
                "image": spec.image or config.serving_image,
                "command": ["indexcache"],
                "args": calibrate_args(spec),
                "env": [
                    {"name": "JOB_NAME", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ] + MODEL_READER_ENV,
                "resources": job_resources(spec, config),
                "volumeMounts": [{"name": "samples", "mountPath": SAMPLES_DIR, "readOnly": True},
                                 {"name": "results", "mountPath": RESULTS_DIR}] + model_mounts(spec, read_only=True),
            }, [_samples_volume(owner, read_only=True), {"name": "results", "emptyDir": {}}] + model_volumes(owner, spec),
                serviceAccountName=recalibration_account_name(owner), restartPolicy="Never",
                initContainers=[fetch_model_container(spec, spec.image or config.serving_image)]),
        },
    }


def ondemand_job(owner: Owner, spec: IndexCacheDeploymentSpec, config: OperatorConfig, token: str) -> dict:
    meta = metadata(owner, ondemand_job_name(owner, token), "recalibration")
    meta["annotations"] = {"indexcache.io/trigger": "annotation", "indexcache.io/token": token[:256]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": job_spec(owner, spec, config)}


def recalibration_cronjob(owner: Owner, spec: IndexCacheDeploymentSpec, config: OperatorConfig,
                          hold: bool = False) -> dict:
    """`hold`: suspended while an on-demand recalibration runs (one at a time per deployment)."""
    assert spec.recalibration.schedule, "no schedule: no CronJob"
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": metadata(owner, cronjob_name(owner), "recalibration"),
        "spec": {
            "schedule": spec.recalibration.schedule,
            "suspend": spec.recalibration.suspend or hold,
            "concurrencyPolicy": "Forbid",  # one search at a time over the same samples
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": labels(owner, "recalibration"),
                                         "annotations": {"indexcache.io/trigger": "schedule"}},
                            "spec": job_spec(owner, spec, config)},
        },
    }
