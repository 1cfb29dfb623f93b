"""Reconcile one IndexCacheDeployment: children, recalibration, rollout and truthful status.

Everything here is idempotent and re-reads the resource under a per-resource lock, so the kopf
handlers (create/update/resume, child events, Job events, the resync timer) may all call it, in any
order, any number of times. Errors the user must fix become a Degraded condition, not a crash loop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import pydantic
from kubernetes.utils import parse_quantity

from indexcache_operator import (DEPLOYMENT_LABEL, GROUP, MANAGED_BY, MANAGED_BY_LABEL, PLURAL, RECALIBRATE_ANNOTATION,
                                 VERSION)
from indexcache_operator import builders as b
from indexcache_operator import delivery
from indexcache_operator import kube as k
from indexcache_operator import mergepatch
from indexcache_operator import recalibration as recal
from indexcache_operator.context import (Context, EventSink, ReconcileError, StatusConflict,  # noqa: F401
                                         count_error, now)
from indexcache_operator.models import (RESERVED_ENV, Condition, Decision, IndexCacheDeploymentSpec,
                                        IndexCacheDeploymentStatus, Phase, PodSettings)
from indexcache_operator.patterns import full_layers, pattern_from_freq, pattern_problem
from indexcache_operator.recalibration import gate, job_outcome  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

ICDS = k.Resource(GROUP, VERSION, PLURAL)


# ---- pure helpers -----------------------------------------------------------------------------

def spec_pattern(spec: IndexCacheDeploymentSpec) -> str | None:
    """The pattern the spec asks for; None means "the checkpoint's own config"."""
    ic = spec.index_cache
    if ic.pattern:
        return ic.pattern
    if ic.freq is not None and spec.model.num_layers is not None:
        return pattern_from_freq(spec.model.num_layers, ic.freq, ic.offset if ic.offset is not None else 2)
    return None


def calibration_basis(spec: IndexCacheDeploymentSpec) -> str:
    """What a calibrated pattern was computed for. When the user edits the model or indexCache,
    the basis changes and the spec's pattern wins again over an older calibration."""
    model = spec.model.model_dump(by_alias=True)
    if model.get("cacheVolume"):  # unset cache fields left out: a basis computed before they existed holds
        model["cacheVolume"] = {key: v for key, v in model["cacheVolume"].items() if v is not None}
    key = json.dumps({"model": model, "indexCache": spec.index_cache.model_dump(by_alias=True)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def pod_settings_problems(where: str, settings: PodSettings, reserved_env: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Quantities that are not quantities, GPUs asked for outside gpusPerReplica, env the operator sets."""
    problems = []
    for part in ("requests", "limits"):
        for name, value in (getattr(settings.resources, part) if settings.resources else {}).items():
            field = f"{where}.resources.{part}.{name}"
            if name == b.GPU_RESOURCE:
                problems.append(("InvalidResources", f"{field}: GPUs come from spec.gpusPerReplica; remove it"))
                continue
            try:
                parse_quantity(str(value))
            except ValueError:
                problems.append(("InvalidResources", f"{field}: {value!r} is not a Kubernetes quantity "
                                 "(e.g. 8, 500m, 64Gi)"))
    for var in settings.env:
        if var.name in reserved_env:
            problems.append(("InvalidEnv", f"{where}.env: {var.name} is set by the operator; use another name"))
    return problems


def operator_checks(spec: IndexCacheDeploymentSpec) -> list[tuple[str, str]]:
    """What the CRD schema cannot check: (reason, message) for each problem."""
    problems = []
    if spec.index_cache.pattern:
        why = pattern_problem(spec.index_cache.pattern, spec.model.num_layers)
        if why:
            problems.append(("PatternLengthMismatch", f"spec.indexCache.{why}"))
    for where, settings in (("head", spec.head), ("workers", spec.workers), ("recalibration.job", spec.recalibration.job)):
        problems += pod_settings_problems(f"spec.{where}", settings, reserved_env=RESERVED_ENV if where == "recalibration.job" else ())
    if spec.recalibration.schedule:
        try:
            from croniter import croniter
            croniter(spec.recalibration.schedule)
        except ImportError:  # croniter is in the operator image; without it Kubernetes checks
            pass
        except (ValueError, KeyError) as e:
            problems.append(("InvalidSchedule", f"spec.recalibration.schedule "
                             f"{spec.recalibration.schedule!r} is not a valid cron expression: {e}"))
    return problems


KUBERAY_VALIDATION_FAILED = "ValidationFailed"  # rayv1.RayServiceValidationFailed


def rayservice_health(rs: dict | None) -> tuple[bool, str, str, int, int]:
    """(serving, reason, message, replicas, ready replicas) from what KubeRay reports."""
    if rs is None:
        return False, "RayServiceMissing", "the RayService does not exist yet", 0, 0
    st = rs.get("status") or {}
    active = st.get("activeServiceStatus") or {}
    cluster = active.get("rayClusterStatus") or {}
    replicas = int(cluster.get("desiredWorkerReplicas") or 0)
    ready = int(cluster.get("readyWorkerReplicas") or 0)
    generation = rs.get("metadata", {}).get("generation")
    observed = st.get("observedGeneration")
    # KubeRay refuses an invalid RayService with Ready=False reason ValidationFailed and writes no
    # observedGeneration: without this check the resource would show RayServiceUpdating forever.
    for cond in st.get("conditions") or []:
        if (cond.get("type") == "Ready" and cond.get("reason") == KUBERAY_VALIDATION_FAILED
                and cond.get("observedGeneration") in (None, generation)):
            return (False, "RayServiceInvalid", f"KubeRay refused the RayService: {cond.get('message', '')}".strip(),
                    replicas, ready)
    if observed is None or (generation is not None and observed != generation):
        return (False, "RayServiceUpdating",
                f"KubeRay has not yet observed RayService generation {generation} (observed {observed})",
                replicas, ready)
    if (st.get("pendingServiceStatus") or {}).get("applicationStatuses"):
        return False, "RayServiceUpgrading", "a new Ray cluster is being prepared", replicas, ready
    app = (active.get("applicationStatuses") or {}).get(b.SERVE_APP_NAME)
    if not app:
        return False, "ServeAppMissing", f"serve app {b.SERVE_APP_NAME!r} not reported yet", replicas, ready
    if app.get("status") != "RUNNING":
        return (False, "ServeAppNotRunning",
                f"serve app is {app.get('status')}: {app.get('message', '')}".strip(), replicas, ready)
    server = (app.get("serveDeploymentStatuses") or {}).get(b.SERVER_DEPLOYMENT) or {}
    if server.get("status") != "HEALTHY":
        return (False, "ServerNotHealthy",
                f"{b.SERVER_DEPLOYMENT} is {server.get('status')}: {server.get('message', '')}".strip(),
                replicas, ready)
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") != "True":
            return False, "RayServiceNotReady", cond.get("message", ""), replicas, ready
    return True, "ServeAppHealthy", "the serve app runs the current config and is healthy", replicas, ready


def set_condition(status: IndexCacheDeploymentStatus, ctype: str, value: bool | None, reason: str,
                  message: str, generation: int | None) -> None:
    text = "Unknown" if value is None else ("True" if value else "False")
    for i, cond in enumerate(status.conditions):
        if cond.type == ctype:
            changed = cond.status != text
            status.conditions[i] = Condition(
                type=ctype, status=text, reason=reason, message=message, observed_generation=generation,
                last_transition_time=now() if changed else cond.last_transition_time)
            return
    status.conditions.append(Condition(type=ctype, status=text, reason=reason, message=message,
                                       observed_generation=generation, last_transition_time=now()))


def condition(status: IndexCacheDeploymentStatus, ctype: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == ctype), None)


# Maps of Kubernetes resource quantities: compared by value ("1" == 1, "1000m" == "1", "1Gi" == "1024Mi"),
# because the API server stores them in its canonical string form, whatever the client sent.
QUANTITY_MAPS = {"requests", "limits", "capacity"}


def quantities_equal(desired, actual) -> bool:
    try:
        return parse_quantity(desired) == parse_quantity(actual)
    except (ValueError, TypeError):
        return desired == actual


def is_subset(desired, actual, key: str | None = None) -> bool:
    """Every field of `desired` is in `actual` with the same value (the server may add fields).
    `key` is the name of the map `desired` sits under (quantities under requests/limits)."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        if key in QUANTITY_MAPS:
            return all(name in actual and quantities_equal(v, actual[name]) for name, v in desired.items())
        return all(name in actual and is_subset(v, actual[name], name) for name, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a) for d, a in zip(desired, actual)))
    return desired == actual or (isinstance(desired, (int, float)) and not isinstance(desired, bool)
                                 and isinstance(actual, (int, float)) and float(desired) == float(actual))


# ---- children -------------------------------------------------------------------------------

def ensure(ctx: Context, body: dict, res: k.Resource, desired: dict, immutable: tuple[str, ...] = ()) -> dict:
    """Create `desired`, or merge-patch the fields we own back if someone edited them."""
    ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    kind = desired["kind"]
    actual = ctx.kube.get(res, ns, name)
    if actual is None:
        try:
            created = ctx.kube.create(res, ns, desired)
        except k.KubeError as e:
            if e.status != 409:
                raise
            return ctx.kube.get(res, ns, name) or desired  # created concurrently: fine
        ctx.events(body, "Normal", "Created", f"created {kind} {name}")
        return created
    owned = {key: v for key, v in desired.items() if key not in ("apiVersion", "kind", *immutable)}
    owned["metadata"] = {key: desired["metadata"][key] for key in ("labels", "ownerReferences")}
    if is_subset(owned, actual):
        return actual
    patched = ctx.kube.patch(res, ns, name, owned)
    ctx.events(body, "Normal", "Updated", f"restored/updated {kind} {name}")
    return patched


def remove(ctx: Context, body: dict, res: k.Resource, namespace: str, name: str, kind: str) -> None:
    if ctx.kube.delete(res, namespace, name):
        ctx.events(body, "Normal", "Deleted", f"deleted {kind} {name}")


def remove_owned(ctx: Context, body: dict, res: k.Resource, owner: b.Owner, name: str, kind: str) -> None:
    """remove() for a name a user may also have picked: only what this deployment owns goes."""
    actual = ctx.kube.get(res, owner.namespace, name)
    if actual is not None and any(ref.get("uid") == owner.uid
                                  for ref in actual["metadata"].get("ownerReferences") or []):
        remove(ctx, body, res, owner.namespace, name, kind)


def ensure_children(ctx: Context, body: dict, owner: b.Owner, spec: IndexCacheDeploymentSpec,
                    pattern: str | None, version: int, hold_schedule: bool = False) -> dict:
    """`hold_schedule`: an on-demand recalibration runs, so the CronJob is suspended until it finishes
    (one recalibration at a time; the CronJob's own Forbid policy only sees its own Jobs)."""
    ensure(ctx, body, k.SERVICEACCOUNTS, b.service_account(owner))
    ensure(ctx, body, k.ROLES, b.role(owner))
    ensure(ctx, body, k.ROLEBINDINGS, b.role_binding(owner))
    # A claim's spec is immutable once bound: restore ownership, never re-size behind the user's back.
    ensure(ctx, body, k.PVCS, b.samples_claim(owner, spec), immutable=("spec",))
    if b.creates_model_cache_claim(spec):
        ensure(ctx, body, k.PVCS, b.model_cache_claim(owner, spec), immutable=("spec",))
    else:   # an emptyDir or the user's own claim now: the one created before goes (once no pod mounts it)
        remove_owned(ctx, body, k.PVCS, owner, b.model_cache_claim_name(owner), "PersistentVolumeClaim")
    if b.scaled_to_zero(spec):
        # Ray Serve has no zero-replica deployment (num_replicas must be > 0; KubeRay would fail to apply
        # the config): scaled to zero, the RayService (head and workers) goes. The samples claim, the
        # calibrated pattern (status) and the schedule stay; replicas >= 1 brings it back with them.
        remove(ctx, body, k.RAYSERVICES, owner.namespace, b.rayservice_name(owner), "RayService")
        rs = None
    else:
        rs = ensure(ctx, body, k.RAYSERVICES, b.rayservice(owner, spec, ctx.config, pattern, version))
    if spec.recalibration.schedule:
        ensure(ctx, body, k.CRONJOBS, b.recalibration_cronjob(owner, spec, ctx.config, hold=hold_schedule))
    else:
        remove(ctx, body, k.CRONJOBS, owner.namespace, b.cronjob_name(owner), "CronJob")
    return rs


# ---- the reconcile --------------------------------------------------------------------------

# Status writes carry the resourceVersion read (optimistic concurrency, as controller-runtime's Update): a
# conflicting writer (a second operator during a hand-over, a user's edit) makes us redo the reconcile.
STATUS_ATTEMPTS = 4


def reconcile(ctx: Context, namespace: str, name: str) -> dict | None:
    """Bring the world in line with the resource; returns the status written (None if gone)."""
    with ctx.lock(namespace, name):
        for _ in range(STATUS_ATTEMPTS):
            try:
                body = ctx.kube.get(ICDS, namespace, name)
            except k.KubeError as e:
                raise ReconcileError(str(e), e.status) from e
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            attempt = ctx.attempt()
            try:
                written = _reconcile_locked(attempt, body)
            except StatusConflict:
                continue  # another writer got in between: drop this attempt's events, redo on fresh data
            except ReconcileError:
                attempt.commit()  # what was done before the failure happened: say so
                raise
            attempt.commit()
            return written
        raise ReconcileError(f"the status of {namespace}/{name} kept changing under {STATUS_ATTEMPTS} attempts", 409)


def _validation_message(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors():
        path = "spec." + ".".join(str(p) for p in e["loc"])
        parts.append(f"{path}: {e['msg']}")
    return "; ".join(parts)


def _reconcile_locked(ctx: Context, body: dict) -> dict:
    """`body` is the resource as the server holds it."""
    started = time.monotonic()
    meta = body["metadata"]
    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    before = body.get("status") or {}
    status = IndexCacheDeploymentStatus.model_validate(before)
    status.observed_generation = generation
    owner = b.Owner.from_body(body)
    result, error_reason = "success", None
    spec_replicas = (body.get("spec") or {}).get("replicas", 1)
    try:
        try:
            spec = IndexCacheDeploymentSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as e:
            problems = [("InvalidSpec", _validation_message(e))]
        else:
            problems = operator_checks(spec)
        if problems:
            reason, message = problems[0][0], "; ".join(m for _, m in problems)
            set_condition(status, "Degraded", True, reason, message, generation)
            set_condition(status, "Reconciled", False, reason,
                          "children left as they were until the spec is fixed", generation)
            set_condition(status, "Ready", False, reason, message, generation)
            status.phase = Phase.degraded
            error_reason = reason
            previous = condition(IndexCacheDeploymentStatus.model_validate(before), "Degraded")
            if previous is None or previous.status != "True" or previous.reason != reason:
                ctx.events(body, "Warning", reason, message)
        else:
            _reconcile_valid(ctx, body, owner, spec, status, generation)
            spec_replicas = spec.replicas
    except k.KubeError as e:
        result, error_reason = "error", f"Api{e.status}"
        if e.status == 404 and "ray.io" in str(e):
            error_reason = "RayServiceAPIMissing"
        elif e.status == 0:
            error_reason = "ApiUnreachable"
        set_condition(status, "Reconciled", False, error_reason, str(e)[:1000], generation)
        ctx.events(body, "Warning", "ReconcileFailed", str(e)[:1000])
        try:  # say so in status if the API server lets us; the error itself is what the caller needs
            _write_status(ctx, body, status)
        except (k.KubeError, StatusConflict) as write_error:
            log.warning("could not write the status of %s/%s after an error: %s", ns, name, write_error)
        ctx.metrics.errors.labels(ns, name, error_reason).inc()
        ctx.metrics.reconciles.labels(ns, name, result).inc()
        raise ReconcileError(str(e), e.status) from e
    finally:
        ctx.metrics.duration.labels(ns, name).observe(time.monotonic() - started)
    try:
        written = _write_status(ctx, body, status)
    except k.KubeError as e:
        ctx.metrics.errors.labels(ns, name, f"Api{e.status}").inc()
        ctx.metrics.reconciles.labels(ns, name, "error").inc()
        raise ReconcileError(str(e), e.status) from e
    if error_reason:
        ctx.metrics.errors.labels(ns, name, error_reason).inc()
    ctx.metrics.reconciles.labels(ns, name, result).inc()
    ctx.metrics.observe_status(ns, name, spec_replicas, written)
    return written


def _reconcile_valid(ctx: Context, body: dict, owner: b.Owner, spec: IndexCacheDeploymentSpec,
                     status: IndexCacheDeploymentStatus, generation: int | None) -> None:
    basis = calibration_basis(spec)
    jobs = recal.list_runs(ctx, owner)
    recal.assign_run_ids(ctx, status, jobs)
    recal.fold_finished_runs(ctx, body, spec, status, jobs, basis)
    applied = status.applied_calibration
    if applied is not None and applied.basis != basis:
        ctx.events(body, "Normal", "CalibrationSuperseded",
                   f"spec.model or spec.indexCache changed: the spec's pattern replaces calibrated "
                   f"pattern from Job {applied.job}")
        status.applied_calibration = applied = None
    pattern = applied.pattern if applied is not None else spec_pattern(spec)
    rule = b.pattern_rule(spec) if pattern is None else None
    rule_text = f"freq={rule[0]},offset={rule[1]}" if rule else None
    if (pattern, rule_text) != (status.pattern, status.pattern_rule):
        status.pattern_version += 1
        was = status.pattern or status.pattern_rule or "(checkpoint default)"
        ctx.events(body, "Normal", "PatternChanged",
                   f"pattern {was} -> {pattern or rule_text or '(checkpoint default)'} "
                   f"(version {status.pattern_version})")
        status.pattern, status.pattern_rule = pattern, rule_text
    status.full_layers = full_layers(pattern) if pattern else None

    token = (body["metadata"].get("annotations") or {}).get(RECALIBRATE_ANNOTATION)
    recal.handle_request(ctx, body, owner, spec, status, jobs, token)
    rs = ensure_children(ctx, body, owner, spec, pattern, status.pattern_version,
                         hold_schedule=recal.ondemand_running(jobs))

    status.ray_service = b.rayservice_name(owner)
    status.selector = b.replica_selector(owner)
    serving, reason, message, replicas, ready = rayservice_health(rs)
    status.replicas, status.ready_replicas = replicas, ready if serving else min(ready, replicas)
    set_condition(status, "Reconciled", True, "ChildrenInSync",
                  "RayService, samples claim, recalibration RBAC and CronJob match the spec", generation)
    set_condition(status, "Degraded", False, "AsExpected", "", generation)
    model = _report_model(ctx, body, owner, spec, status, generation)
    if b.scaled_to_zero(spec):
        set_condition(status, "Ready", False, "ScaledToZero",
                      "spec.replicas is 0: no RayService runs; set replicas >= 1 to serve again", generation)
        status.phase = Phase.scaled_to_zero
    elif reason == "RayServiceInvalid":  # nothing will come of waiting: say what to fix
        set_condition(status, "Ready", False, reason, message, generation)
        set_condition(status, "Degraded", True, reason, message, generation)
        status.phase = Phase.degraded
    elif model is not None and model.serving_failed:  # a replica cannot get the model: never Ready on it
        text = f"{model.reason}: {model.message}"
        set_condition(status, "Ready", False, "ModelFetchFailed", text, generation)
        set_condition(status, "Degraded", True, "ModelFetchFailed", text, generation)
        status.phase = Phase.degraded
    else:
        set_condition(status, "Ready", serving, reason, message, generation)
        status.phase = Phase.ready if serving else Phase.deploying
    _set_calibrated(status, generation)


def _report_model(ctx: Context, body: dict, owner: b.Owner, spec: IndexCacheDeploymentSpec,
                  status: IndexCacheDeploymentStatus, generation: int | None) -> delivery.ModelReport | None:
    """status.model and the ModelReady condition from the fetch-model init containers of the deployment's
    pods (replicas and Jobs); an event when a fetch starts failing (or fails for another reason) and when a
    new revision arrives."""
    pods = ctx.kube.list(k.PODS, owner.namespace, {DEPLOYMENT_LABEL: owner.name, MANAGED_BY_LABEL: MANAGED_BY})
    report = delivery.model_report(spec.model.uri, [delivery.fetch_outcome(p) for p in pods], status.model)
    if report is None:
        return None
    was = condition(status, "ModelReady")
    if report.ready is False and (was is None or was.status != "False" or was.reason != report.reason):
        ctx.events(body, "Warning", "ModelFetchFailed", f"{report.reason}: {report.message}")
    new, old = report.model, status.model
    if new is not None and (old is None or (old.uri, old.revision, old.path) != (new.uri, new.revision, new.path)):
        ctx.events(body, "Normal", "ModelFetched",
                   f"{new.uri} -> revision {new.revision or '(none: a path)'} at {new.path} "
                   f"({new.downloaded_bytes} bytes downloaded by pod {new.pod})")
    set_condition(status, "ModelReady", report.ready, report.reason, report.message, generation)
    status.model = report.model
    return report


def _set_calibrated(status: IndexCacheDeploymentStatus, generation: int | None) -> None:
    """True while the replicas run a calibrated pattern; the reason tells what the LAST
    recalibration did (a rejected or failed newer run does not un-calibrate the running pattern)."""
    applied, last = status.applied_calibration, status.recalibration.last
    running = (f"running the pattern calibrated by Job {applied.job}" if applied is not None
               else "running the spec's pattern")
    if last is None:
        reason, message = ("PatternApplied" if applied else "NotCalibrated"), running
    elif last.result == "Failed":
        reason, message = "RecalibrationFailed", f"Job {last.job} failed ({last.reason}); kept: {running}"
    elif last.decision == Decision.rejected:
        reason, message = "GateRejected", f"Job {last.job}: {last.reason}; {running}"
    elif last.decision == Decision.recommended:
        reason, message = "Recommended", f"Job {last.job}: {last.reason}; {running}"
    else:
        reason, message = ("PatternApplied", running) if applied else ("NotCalibrated", running)
    set_condition(status, "Calibrated", applied is not None, reason, message, generation)


def _write_status(ctx: Context, body: dict, status: IndexCacheDeploymentStatus) -> dict:
    """Write `status` as a whole: a merge patch that also removes every key it no longer has, at any depth
    (a failed run must not keep the previous run's pattern, an applied one no stale recommendation), on
    the condition that the resource is still the version `body` was read at (StatusConflict if not)."""
    meta = body["metadata"]
    before = body.get("status") or {}
    after = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    if after != before:
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                 "status": mergepatch.diff(before, after)}
        try:
            ctx.kube.patch(ICDS, meta["namespace"], meta["name"], patch, subresource="status")
        except k.KubeError as e:
            if e.status == 409:
                raise StatusConflict(str(e)) from e
            raise
    return after


# ---- deletion -----------------------------------------------------------------------------------

# Every kind the operator creates for a deployment, deleted when it goes (Jobs' result ConfigMaps too).
CHILD_KINDS = (k.RAYSERVICES, k.PVCS, k.CRONJOBS, k.JOBS, k.SERVICEACCOUNTS, k.ROLES, k.ROLEBINDINGS)


def delete_children(ctx: Context, namespace: str, name: str) -> int:
    """Delete what the operator created for a deleted IndexCacheDeployment, best effort: a refused or
    failed call (counted in indexcache_operator_errors_total{source="cleanup"}) does not stop the others,
    and the resource's metric series go whatever happens. Returns the number of failed calls."""
    failures = 0
    ours = {DEPLOYMENT_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}
    try:
        with ctx.lock(namespace, name):
            for res in CHILD_KINDS:
                try:
                    objs = ctx.kube.list(res, namespace, ours)
                except k.KubeError as e:
                    failures += 1
                    log.warning("cleanup of %s/%s: listing %s failed (%s): %s", namespace, name, res.plural,
                                count_error(ctx, "cleanup", e), e)
                    continue
                doomed = [(res, o["metadata"]["name"]) for o in objs]
                if res == k.JOBS:  # the result ConfigMap each Job wrote carries no owner reference
                    doomed += [(k.CONFIGMAPS, b.result_configmap_name(o["metadata"]["name"])) for o in objs]
                for kind, child in doomed:
                    try:
                        ctx.kube.delete(kind, namespace, child)
                    except k.KubeError as e:
                        failures += 1
                        log.warning("cleanup of %s/%s: deleting %s %s failed (%s): %s", namespace, name,
                                    kind.plural, child, count_error(ctx, "cleanup", e), e)
    finally:
        ctx.metrics.forget(namespace, name)
    log.info("deleted the children of %s/%s (%d calls failed)", namespace, name, failures)
    return failures


# ---- recalibration results -------------------------------------------------------------------

def record_job(ctx: Context, job: dict) -> dict | None:
    """A recalibration Job finished: reconcile its owner, which folds every finished Job newer than the
    last one folded in (recalibration.fold_finished_runs). Replays and duplicates change nothing."""
    labels = job["metadata"].get("labels") or {}
    name, ns = labels.get(DEPLOYMENT_LABEL), job["metadata"]["namespace"]
    if not name or recal.job_outcome(job) is None:
        return None
    return reconcile(ctx, ns, name)
