"""Every kopf registration of the operator, in one place. Handlers are thin: they find the
IndexCacheDeployment concerned and call `reconcile` (idempotent), `record_job` or `delete_children`.

Sync handlers run in kopf's thread pool; `reconcile` serialises work per resource with a lock.
"""
from __future__ import annotations

import asyncio
import logging

import kopf

from indexcache_operator import (COMPONENT_LABEL, DEPLOYMENT_LABEL, GROUP, MANAGED_BY, MANAGED_BY_LABEL,
                                 PLURAL, RECALIBRATE_ANNOTATION, VERSION)
from indexcache_operator import delivery
from indexcache_operator import kube as k
from indexcache_operator import metrics as m
from indexcache_operator import peering, resync
from indexcache_operator.config import OperatorConfig
from indexcache_operator.context import count_error
from indexcache_operator.reconcile import Context, ReconcileError, delete_children, reconcile, record_job

log = logging.getLogger(__name__)
OURS = {MANAGED_BY_LABEL: MANAGED_BY}
CHILDREN = (k.RAYSERVICES, k.PVCS, k.CRONJOBS, k.SERVICEACCOUNTS, k.ROLES, k.ROLEBINDINGS)
RETRY_DELAY_S = 10


def _post_event(body: dict, type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])
    except Exception:  # events are best-effort; never fail a reconcile over one
        log.exception("could not post event %s", reason)


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere: $KUBECONFIG as it is now (the official client
    reads it at import time, which kopf's client-based login would inherit)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config = OperatorConfig.from_env()  # at startup, never at import
    settings.persistence.finalizer = f"{GROUP}/cleanup"  # unused: no handler needs a finalizer
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own events say what changed; skip kopf's chatter
    # Pods are the one large kind watched: let the API server send only ours (kmock ignores it; the
    # handler's own label filter stays).
    settings.watching.label_selectors["", "v1", "pods"] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    memo.ctx = Context(kube=k.Kube.from_environment(), config=config, metrics=m.OperatorMetrics(),
                       events=_post_event)
    memo.known = resync.KnownDeployments()
    memo.fetches_seen = {}
    memo.health = resync.ResyncHealth(config.health_grace)
    memo.peering = None
    if settings.peering.mandatory and not settings.peering.standalone:  # kopf run --peering NAME
        settings.peering.priority = settings.peering.priority or peering.random_priority()
        settings.peering.lifetime = config.peering_lifetime_seconds
        settings.peering.stealth = True  # no log line per keep-alive
        memo.peering = peering.Peering(settings.peering.name, settings.peering.priority,
                                       clusterwide=settings.peering.clusterwide, namespaces=config.namespaces)
        await asyncio.to_thread(memo.peering.ensure_objects, memo.ctx.kube)
        memo.ctx.metrics.active.set(0)  # kopf starts a peer paused; the resync checks who is active
    memo.metrics_runner = None
    if config.metrics_port:
        memo.metrics_runner = await m.serve(memo.ctx.metrics, config.metrics_port, problem=memo.health.problem)
    memo.resync_task = memo.health.task = asyncio.create_task(
        resync.run(memo.ctx, memo.known, memo.health, reconcile, active=_active_check(memo)), name="indexcache resync")
    log.info("indexcache-operator started: %s; peering: %s", config,
             f"{settings.peering.name} (priority {settings.peering.priority})" if memo.peering else "standalone")


def _active_check(memo: kopf.Memo):
    """For the resync: whether this replica is the active one (kopf pauses a standby's watches, not our
    tasks). Standalone: always. Asking the API server fails like any call: the pass fails and retries."""
    if memo.peering is None:
        return None

    async def active() -> bool:
        is_active = await asyncio.to_thread(memo.peering.active, memo.ctx.kube)
        memo.ctx.metrics.active.set(1 if is_active else 0)
        return is_active
    return active


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "resync_task", None) is not None:
        memo.resync_task.cancel()
    if getattr(memo, "metrics_runner", None) is not None:
        await memo.metrics_runner.cleanup()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_deployment(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    try:
        reconcile(memo.ctx, namespace, name)
    except ReconcileError as e:
        raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_S) from e


def recalibration_pending(body: kopf.Body) -> bool:
    """The annotation carries a token that no Job has been started for yet."""
    token = body.metadata.annotations.get(RECALIBRATE_ANNOTATION)
    started = ((body.get("status") or {}).get("recalibration") or {}).get("requestToken")
    return bool(token) and token != started


@kopf.on.event(GROUP, VERSION, PLURAL, annotations={RECALIBRATE_ANNOTATION: kopf.PRESENT})
def recalibration_requested(event: dict, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                            **_) -> None:
    """`kubectl annotate ... indexcache.io/recalibrate=<token>` starts its Job now.

    The update handler above never sees this annotation: kopf keeps its own state in annotations
    under the same `indexcache.io/` prefix (marked `indexcache.io/kopf-managed`) and leaves every
    annotation of a prefix it manages out of the diff it compares, so to kopf the change is no
    change. Hence this watch-level handler, which sees every event as it is."""
    if event.get("type") == "DELETED" or getattr(memo, "ctx", None) is None or not recalibration_pending(body):
        return
    try:
        reconcile(memo.ctx, namespace, name)
    except ReconcileError as e:  # the next event or the resync retries
        log.warning("starting the recalibration of %s/%s failed (%s): %s", namespace, name,
                    count_error(memo.ctx, "event", e), e)


@kopf.on.event(GROUP, VERSION, PLURAL)
def deployment_event(event: dict, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    """Keep the resync's list of resources (exactly those kopf watches); on deletion, delete the children
    now. Their owner references let the garbage collector do it too (also when the operator is down);
    this makes it immediate and also removes the result ConfigMaps the Jobs wrote (they carry no owner
    reference). No finalizer: nothing can block `kubectl delete` of an IndexCacheDeployment."""
    if getattr(memo, "ctx", None) is None:
        return
    if event.get("type") != "DELETED":
        memo.known.add(namespace, name)
        return
    memo.known.discard(namespace, name)
    delete_children(memo.ctx, namespace, name)


def _owner_of(labels: dict) -> str | None:
    return (labels or {}).get(DEPLOYMENT_LABEL)


def _on_child_event(event: dict, namespace: str, labels: dict, memo: kopf.Memo, **_) -> None:
    """A child changed, was edited by hand or deleted: reconcile its owner (restores drift and
    picks up KubeRay's RayService status for Ready)."""
    owner = _owner_of(labels)
    if owner and getattr(memo, "ctx", None) is not None:
        try:
            reconcile(memo.ctx, namespace, owner)
        except ReconcileError as e:  # the resync retries
            log.warning("reconcile of %s/%s after a child event failed (%s): %s", namespace, owner,
                        count_error(memo.ctx, "event", e), e)


for _res in CHILDREN:
    kopf.on.event(_res.group, _res.version, _res.plural, labels=OURS,
                  id=f"child-{_res.plural}")(_on_child_event)


@kopf.on.event("batch", "v1", "jobs", labels={**OURS, COMPONENT_LABEL: "recalibration"})
def recalibration_job_event(event: dict, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    if event.get("type") == "DELETED" or getattr(memo, "ctx", None) is None:
        return
    try:
        record_job(memo.ctx, dict(body))
    except ReconcileError as e:  # the resync retries (results are folded level-triggered)
        log.warning("recording Job %s failed (%s): %s", body.get("metadata", {}).get("name"),
                    count_error(memo.ctx, "event", e), e)


@kopf.on.event("", "v1", "pods", labels=OURS)
def model_fetch_event(event: dict, namespace: str, name: str, labels: dict, body: kopf.Body, memo: kopf.Memo,
                      **_) -> None:
    """A replica or Job pod's fetch-model init container ended (or failed and retries): reconcile the owner,
    which copies the result into status.model / ModelReady. Once per fetch outcome, not per pod update."""
    if getattr(memo, "ctx", None) is None:
        return
    seen = memo.fetches_seen
    if event.get("type") == "DELETED":
        seen.pop((namespace, name), None)
        return
    outcome = delivery.fetch_outcome(dict(body))
    owner = _owner_of(labels)
    if outcome is None or not owner or seen.get((namespace, name)) == outcome:
        return
    try:
        reconcile(memo.ctx, namespace, owner)
    except ReconcileError as e:  # the next pod event or the resync retries
        log.warning("reconcile of %s/%s after pod %s's model fetch failed (%s): %s", namespace, owner, name,
                    count_error(memo.ctx, "event", e), e)
        return
    seen[(namespace, name)] = outcome
