"""The IndexCacheDeployment spec and status: the single source of the CRD (see `crd.py`).

Field names are camelCase on the wire (aliases) and snake_case in Python. Constraints that a
JSON schema can state live on the fields; cross-field rules are CEL (`x-kubernetes-validations`)
attached to the model that owns the fields, each with a message naming the field and the fix.
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

PATTERN_REGEX = r"^F[FS]*$"
# Five cron fields or one of the @-macros Kubernetes CronJobs accept; croniter checks the rest.
CRON_REGEX = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\S+( +\S+){4})$"
# The schema checks the shape; the CEL rule on ModelSource names the schemes `indexcache fetch` supports
# (indexcache.model.storage), so that gs:// or a typo gets a message instead of a bare regex.
MODEL_URI_REGEX = r"^(smollm2|tiny|/.+|[A-Za-z][A-Za-z0-9+.-]*://.+)$"
SUPPORTED_MODEL_URI = r"^(smollm2|tiny|/.+|(s3|hf|pvc|https?)://.+)$"
SUPPORTED_MODEL_URIS = ("hf://org/name[@revision], s3://bucket/prefix, https://host/model.tar.gz[#sha256=<hex>], "
                        "pvc://claim/path, an absolute path inside the image, smollm2 or tiny")
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_PATTERN_LENGTH = 1024  # also bounds the CEL cost of rules reading the pattern
# Child names are "<name>-recal-<8 hex>" (Job, 63 max) and CronJob "<name>-recal" + 11 (52 max).
MAX_NAME_LENGTH = 40
# KubeRay validates RayService names as DNS-1035 labels (a Service is named after them): lower-case
# letters, digits and '-', starting with a letter. The RayService is named after the resource.
NAME_REGEX = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def cel(rule: str, message: str, field_path: str | None = None) -> dict:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


QUANTITY_REGEX = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


class CacheAccessMode(str, Enum):
    read_write_many = "ReadWriteMany"
    read_write_once = "ReadWriteOnce"


class CacheVolume(Wire):
    """A model cache shared by the replicas and the recalibration Jobs: an existing claim (claimName), or one
    the operator creates (size, with storageClassName and accessMode optional). No schema defaults here: the
    API server would add them next to a claimName."""
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("has(self.claimName) != has(self.size)",
            "model.cacheVolume: set claimName (reuse an existing claim) or size (the operator creates claim "
            "<name>-model-cache of that size), exactly one of them"),
        cel("has(self.size) || !(has(self.storageClassName) || has(self.accessMode))",
            "model.cacheVolume.storageClassName and accessMode describe the claim the operator creates: they go "
            "with size, not with claimName"),
    ]})

    claim_name: Optional[str] = Field(
        default=None, min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN,
        description="An existing PersistentVolumeClaim for the model cache (ReadWriteMany when replicas run "
                    "on several nodes): the first pod downloads, the others and the recalibration Jobs reuse it.")
    size: Optional[str] = Field(
        default=None, pattern=QUANTITY_REGEX,
        description="Instead of claimName: the operator creates claim <name>-model-cache of this size, owned by "
                    "this resource (deleted with it). Room for the checkpoint (twice it for an https:// tarball, "
                    "unpacked beside its archive) and for the next revision while the current one is in use. "
                    "Fixed once the claim exists (resize the claim itself where its storage class allows); a "
                    "full cache fails the fetch with reason DiskFull (condition ModelReady).")
    storage_class_name: Optional[str] = Field(
        default=None, min_length=1, max_length=253,
        description="With size: storage class of the claim (default: the cluster's default class).")
    access_mode: Optional[CacheAccessMode] = Field(
        default=None,
        description="With size: access mode of the claim (default ReadWriteMany: replicas on several nodes and "
                    "the Jobs mount it at once). ReadWriteOnce only when every replica and Job runs on one node.")


class ModelSource(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(f"self.uri.matches('{SUPPORTED_MODEL_URI}')",
            f"model.uri: unsupported scheme (gs:// included: serve GCS through its S3 endpoint, "
            f"storage.googleapis.com with HMAC keys, as s3://); use {SUPPORTED_MODEL_URIS}", ".uri"),
    ]})

    uri: str = Field(
        min_length=1, max_length=2048, pattern=MODEL_URI_REGEX,
        description="Checkpoint to serve, fetched by an init container into the model cache: hf://org/name"
                    "[@revision], s3://bucket/prefix, https://.../model.tar.gz#sha256=<hex>, pvc://claim/path, "
                    "an absolute HF-format directory inside the image, or `smollm2`/`tiny` (bundled).")
    cache_volume: Optional[CacheVolume] = Field(
        default=None,
        description="Where downloaded models are kept. Absent: an emptyDir per pod, as KServe's storage "
                    "initializer does: each replica and recalibration Job downloads the model onto its node's "
                    "disk (local reads, nothing to size or clean up; one download per pod). Set it to download "
                    "once per deployment: {claimName: X} reuses a claim, {size: 200Gi} makes the operator "
                    "create <name>-model-cache.")
    credentials_secret: Optional[str] = Field(
        default=None, min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN,
        description="Secret whose keys become the download's environment: HF_TOKEN for the Hub; "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for S3 and MinIO.")
    num_layers: Optional[int] = Field(
        default=None, ge=1, le=1024,
        description="Layers in the model (optional): lets the operator refuse a pattern of the wrong length "
                    "and show indexCache.freq expanded in status; without it the replica resolves freq/offset.")
    served_model_name: Optional[str] = Field(
        default=None, min_length=1, max_length=253,
        description="Model name in the OpenAI API; defaults to the resource name.")


class IndexCacheSettings(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!(has(self.pattern) && has(self.freq))",
            "indexCache.pattern and indexCache.freq are mutually exclusive: set only one of them"),
        cel("!has(self.offset) || has(self.freq)",
            "indexCache.offset only applies with indexCache.freq: set freq or remove offset"),
    ]})

    pattern: Optional[str] = Field(
        default=None, min_length=1, max_length=MAX_PATTERN_LENGTH, pattern=PATTERN_REGEX,
        description="One letter per layer: F runs the indexer, S reuses the nearest preceding F "
                    "layer's top-k indices. Only F and S; layer 0 must be F.")
    freq: Optional[int] = Field(
        default=None, ge=1, le=1024,
        description="Keep every freq-th layer F (after the first offset layers); 1 = all F.")
    offset: Optional[int] = Field(
        default=None, ge=1, le=1024,
        description="With freq: the first offset layers are F (upstream default 2).")


# ---- scheduling and environment of the generated pods ---------------------------------------------

# A resource quantity as Kubernetes takes it: 4, "500m", "64Gi" (int-or-string in the CRD).
Quantity = Annotated[Union[int, str], WithJsonSchema(
    {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]})]
LABEL_KEY_REGEX = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
ENV_NAME_REGEX = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# Names the operator sets in the pods it builds; a user env var of the same name would shadow them.
RESERVED_ENV = ("JOB_NAME", "POD_NAMESPACE")


class Resources(Wire):
    requests: dict[str, Quantity] = Field(default_factory=dict, description="Requests per resource, "
                                          "e.g. {cpu: 8, memory: 64Gi}; merged over the operator's defaults.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Limits per resource; merged over "
                                        "the operator's defaults. GPUs always come from gpusPerReplica.")


class Toleration(Wire):
    key: Optional[str] = Field(default=None, max_length=317, description="Taint key; empty with Exists: all taints.")
    operator: Optional[str] = Field(default=None, pattern=r"^(Exists|Equal)$", description="Exists or Equal (default).")
    value: Optional[str] = Field(default=None, max_length=63, description="Taint value (with Equal).")
    effect: Optional[str] = Field(default=None, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$",
                                  description="Taint effect to match; empty: all effects.")
    toleration_seconds: Optional[int] = Field(default=None, description="With NoExecute: how long the pod stays.")


class KeyRef(Wire):
    name: str = Field(min_length=1, max_length=253, description="Secret or ConfigMap name.")
    key: str = Field(min_length=1, max_length=253, description="Key in it.")
    optional: Optional[bool] = Field(default=None, description="Start the pod even if it is missing.")


class FieldRef(Wire):
    field_path: str = Field(min_length=1, description="e.g. metadata.name, spec.nodeName.")


class EnvSource(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) == 1",
            "env[].valueFrom: set exactly one of secretKeyRef, configMapKeyRef, fieldRef"),
    ]})

    secret_key_ref: Optional[KeyRef] = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: Optional[KeyRef] = Field(default=None, description="A key of a ConfigMap.")
    field_ref: Optional[FieldRef] = Field(default=None, description="A field of the pod.")


class EnvVar(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!(has(self.value) && has(self.valueFrom))", "env[]: set value or valueFrom, not both"),
    ]})

    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_REGEX, description="Variable name.")
    value: Optional[str] = Field(default=None, description="Its value.")
    value_from: Optional[EnvSource] = Field(default=None, description="Or where to read it from.")


class PodSettings(Wire):
    """Scheduling and environment of one kind of pod the operator builds, over its defaults."""
    resources: Optional[Resources] = Field(default=None, description="CPU, memory (and other) requests and "
                                           "limits, merged over the operator's defaults.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Taints the pods tolerate.")
    env: list[EnvVar] = Field(default_factory=list, max_length=256,
                              description="Extra environment variables of the main container.")


class LocalObjectReference(Wire):
    name: str = Field(min_length=1, max_length=253, description="Name of a Secret in the same namespace.")


class Traffic(Wire):
    sample_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Fraction of prompts kept (redacted) in the samples volume for recalibration.")
    storage_size: str = Field(
        default="10Gi", pattern=QUANTITY_REGEX,
        description="Size of the traffic samples volume claim.")
    storage_class_name: Optional[str] = Field(
        default=None, min_length=1, max_length=253,
        description="Storage class of the samples claim; it must support ReadWriteMany.")


class AutoApply(str, Enum):
    never = "Never"
    gated = "Gated"
    always = "Always"


class Recalibration(Wire):
    schedule: Optional[str] = Field(
        default=None, max_length=256, pattern=CRON_REGEX,
        description="Cron schedule (CronJob syntax) for recalibration on sampled traffic; none = on demand only.")
    suspend: bool = Field(default=False, description="Pause scheduled recalibration.")
    target_full_fraction: float = Field(
        default=0.25, gt=0.0, le=1.0,
        description="Fraction of layers kept F by the greedy search (0.25 = keep 1/4 of the indexers).")
    auto_apply: AutoApply = Field(
        default=AutoApply.gated,
        description="Never: only recommend. Gated: apply if the loss delta is within maxLossDelta. "
                    "Always: apply every successful result.")
    max_loss_delta: float = Field(
        default=0.02, ge=0.0,
        description="Gated: the largest accepted calibrated-minus-all-F loss (nats/token).")
    timeout_seconds: int = Field(
        default=3600, ge=60, le=7 * 86400,
        description="A recalibration Job running longer fails (DeadlineExceeded); the pattern is kept.")
    job: PodSettings = Field(default_factory=PodSettings, description="The recalibration Job's pod: resources, "
                             "nodeSelector, tolerations, env.")


class Autoscaling(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.minReplicas <= self.maxReplicas",
            "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
    ]})

    min_replicas: int = Field(ge=0, le=1000, description="Fewest replicas Ray Serve scales down to.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas Ray Serve scales up to.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0.0, le=10000.0,
        description="Ray Serve target_ongoing_requests: ongoing requests per replica to aim for.")


class Cost(Wire):
    gpu_hourly_usd: float = Field(
        default=0.0, ge=0.0, le=10000.0,
        alias="gpuHourlyUSD", description="Price of one GPU per hour (USD), for the cost metrics.")


class IndexCacheDeploymentSpec(Wire):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas"
            " && self.replicas <= self.autoscaling.maxReplicas)",
            "replicas must lie within autoscaling.minReplicas..autoscaling.maxReplicas",
            ".replicas"),
    ]})

    model: ModelSource = Field(description="The checkpoint to serve.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Ray Serve replicas (one GPU worker pod each).")
    gpus_per_replica: int = Field(default=1, ge=1, le=16, description="GPUs per replica (num_gpus).")
    max_ongoing_requests: int = Field(default=16, ge=1, le=100000,
                                      description="Ray Serve max_ongoing_requests per replica.")
    image: Optional[str] = Field(default=None, min_length=1, max_length=512,
                                 description="Serving image; defaults to the operator's configured image.")
    index_cache: IndexCacheSettings = Field(default_factory=IndexCacheSettings,
                                            description="Initial IndexCache layer pattern.")
    traffic: Traffic = Field(default_factory=Traffic, description="Traffic sampling for recalibration.")
    recalibration: Recalibration = Field(default_factory=Recalibration, description="Recalibration and rollout.")
    autoscaling: Optional[Autoscaling] = Field(default=None, description="Ray Serve autoscaling; none = fixed replicas.")
    cost: Cost = Field(default_factory=Cost, description="Prices for cost metrics.")
    head: PodSettings = Field(default_factory=PodSettings, description="The Ray head pod: resources, "
                              "nodeSelector, tolerations, env.")
    workers: PodSettings = Field(default_factory=PodSettings, description="The replica (GPU worker) pods: "
                                 "resources, nodeSelector, tolerations, env.")
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets to pull the serving image with (every pod).")


# ---- status -------------------------------------------------------------------------------

CONDITION_TYPES = ("Ready", "Reconciled", "Calibrated", "Degraded", "ModelReady")


class Phase(str, Enum):
    pending = "Pending"
    deploying = "Deploying"
    ready = "Ready"
    scaled_to_zero = "ScaledToZero"
    degraded = "Degraded"


class Condition(Wire):
    type: str = Field(description="Ready, Reconciled, Calibrated, Degraded or ModelReady.")
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = Field(min_length=1, max_length=1024)
    message: str = Field(default="", max_length=32768)
    observed_generation: Optional[int] = Field(default=None, ge=0)
    last_transition_time: Optional[str] = Field(default=None, description="RFC 3339 time.")


class Decision(str, Enum):
    applied = "Applied"
    rejected = "Rejected"  # Gated and the loss delta exceeded maxLossDelta: kept as a recommendation
    recommended = "Recommended"  # autoApply Never
    none = "None"  # the job failed: nothing to decide


class RecalibrationRun(Wire):
    job: str
    run_id: Optional[int] = Field(default=None, ge=1, description="The Job's run id (indexcache.io/run-id): "
                                  "results are applied in increasing run id order, never an older one.")
    finished_at: Optional[str] = Field(default=None, description="When the Job finished (RFC 3339).")
    result: str = Field(description="Succeeded or Failed.")
    reason: str = Field(default="", description="Why it failed or what the gate decided.")
    pattern: Optional[str] = Field(default=None, description="The calibrated pattern.")
    full_layers: Optional[int] = None
    loss_delta: Optional[float] = Field(default=None, description="Calibrated minus all-F loss (nats/token).")
    decision: Decision = Decision.none


class RecalibrationStatus(Wire):
    last_run_id: int = Field(default=0, ge=0, description="The highest run id given to a recalibration Job.")
    request_token: Optional[str] = Field(default=None, description="Last handled recalibrate annotation value.")
    queued_token: Optional[str] = Field(default=None, description="A recalibrate annotation value waiting for "
                                        "the running Job to finish (one recalibration at a time).")
    active_job: Optional[str] = Field(default=None, description="The recalibration Job running now, if any.")
    recent_jobs: list[str] = Field(default_factory=list, description="On-demand Jobs started lately (newest "
                                   "last): a token whose Job is here never starts a second one.")
    last: Optional[RecalibrationRun] = Field(default=None, description="The last finished recalibration.")
    recommended_pattern: Optional[str] = Field(default=None, description="A result kept but not applied.")


class AppliedCalibration(Wire):
    pattern: str
    job: str
    run_id: Optional[int] = Field(default=None, ge=1, description="Run id of the Job whose result this is.")
    basis: str = Field(description="Hash of the model and indexCache spec it was calibrated for; "
                                   "a spec change makes the spec's pattern win again.")


class ModelStatus(Wire):
    """What the `fetch-model` init containers reported (their termination message: `indexcache fetch`'s JSON)."""
    uri: str = Field(description="spec.model.uri as fetched.")
    revision: Optional[str] = Field(default=None, description="What the URI resolved to and the pods load: a Hub "
                                    "commit, s3-<digest of the object listing>, a tarball's sha256; absent for "
                                    "paths and pvc:// models.")
    path: Optional[str] = Field(default=None, description="The checkpoint directory in the pods' model cache.")
    downloaded_bytes: int = Field(default=0, ge=0, description="Bytes the newest fetch downloaded (0: the cache "
                                  "already held the model).")
    pod: Optional[str] = Field(default=None, description="The pod whose fetch this is (the newest).")
    fetched_at: Optional[str] = Field(default=None, description="When that fetch finished (RFC 3339).")


class IndexCacheDeploymentStatus(Wire):
    model_config = ConfigDict(extra="ignore")

    observed_generation: Optional[int] = None
    phase: Optional[Phase] = None
    conditions: list[Condition] = Field(default_factory=list)
    pattern: Optional[str] = Field(default=None, description="The pattern the replicas run.")
    pattern_rule: Optional[str] = Field(default=None, description="freq=F,offset=O when the replicas resolve "
                                        "indexCache.freq themselves (model.numLayers not given).")
    pattern_version: int = Field(default=0, description="Bumped on every pattern change (user_config).")
    full_layers: Optional[int] = Field(default=None, description="F layers in the active pattern.")
    replicas: int = 0
    ready_replicas: int = 0
    selector: Optional[str] = Field(default=None, description="Label selector of the replica pods (scale).")
    ray_service: Optional[str] = None
    model: Optional[ModelStatus] = Field(default=None, description="The model the pods fetched: revision and "
                                         "cache path (condition ModelReady says whether fetching it works).")
    recalibration: RecalibrationStatus = Field(default_factory=RecalibrationStatus)
    applied_calibration: Optional[AppliedCalibration] = None
