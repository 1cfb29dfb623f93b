"""Recalibration Jobs of one IndexCacheDeployment: their run ids, the quality gate, and folding finished
Jobs' results into status.

Results are applied level-triggered and in order: every Job carries a run id (annotation
`indexcache.io/run-id`, never reused, increasing with creation), `status.recalibration.last.runId` is the
newest run folded in, and a reconcile folds exactly the finished Jobs with a larger id, oldest first. A
restart, a replayed watch event or a Job that finishes late can therefore never bring an older pattern back.
"""
from __future__ import annotations

import json
import logging

from indexcache_operator import (COMPONENT_LABEL, DEPLOYMENT_LABEL, GROUP, MANAGED_BY, MANAGED_BY_LABEL,
                                 RECALIBRATE_ANNOTATION)
from indexcache_operator import builders as b
from indexcache_operator import kube as k
from indexcache_operator.context import Context, now
from indexcache_operator.models import (AppliedCalibration, AutoApply, Decision, IndexCacheDeploymentSpec,
                                        IndexCacheDeploymentStatus, RecalibrationRun)
from indexcache_operator.patterns import full_layers, pattern_problem

log = logging.getLogger(__name__)

RUN_ID_ANNOTATION = f"{GROUP}/run-id"
TOKEN_ANNOTATION = f"{GROUP}/token"


def gate(spec: IndexCacheDeploymentSpec, loss_delta: float) -> tuple[Decision, str]:
    policy = spec.recalibration.auto_apply
    if policy == AutoApply.never:
        return Decision.recommended, "autoApply is Never: kept as a recommendation"
    if policy == AutoApply.always:
        return Decision.applied, f"autoApply is Always: applied (loss delta {loss_delta:+.4f})"
    limit = spec.recalibration.max_loss_delta
    if loss_delta <= limit:
        return Decision.applied, f"loss delta {loss_delta:+.4f} <= maxLossDelta {limit}: applied"
    return Decision.rejected, (f"loss delta {loss_delta:+.4f} > maxLossDelta {limit}: "
                               f"kept as a recommendation, current pattern unchanged")


# ---- the Jobs and their run ids ---------------------------------------------------------------

def list_runs(ctx: Context, owner: b.Owner) -> list[dict]:
    """Every recalibration Job of the deployment: on demand and from the CronJob."""
    return ctx.kube.list(k.JOBS, owner.namespace, {DEPLOYMENT_LABEL: owner.name, MANAGED_BY_LABEL: MANAGED_BY,
                                                   COMPONENT_LABEL: "recalibration"})


def run_id(job: dict) -> int | None:
    raw = (job["metadata"].get("annotations") or {}).get(RUN_ID_ANNOTATION)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value >= 1 else None


def _creation_order(job: dict) -> tuple[str, str]:
    meta = job["metadata"]
    return meta.get("creationTimestamp") or "", meta["name"]


def assign_run_ids(ctx: Context, status: IndexCacheDeploymentStatus, jobs: list[dict]) -> None:
    """Give every Job without a run id (the CronJob creates them without) the next ids, oldest first,
    written on the Job itself so that the id survives restarts; keep the highest id in status."""
    rec = status.recalibration
    high = max([rec.last_run_id, *(run_id(j) or 0 for j in jobs)])
    for job in sorted((j for j in jobs if run_id(j) is None), key=_creation_order):
        meta = job["metadata"]
        try:
            ctx.kube.patch(k.JOBS, meta["namespace"], meta["name"],
                           {"metadata": {"annotations": {RUN_ID_ANNOTATION: str(high + 1)}}})
        except k.KubeError as e:
            if e.status == 404:  # gone meanwhile (TTL, deleted by hand): nothing to order
                continue
            raise
        high += 1
        meta.setdefault("annotations", {})[RUN_ID_ANNOTATION] = str(high)
    rec.last_run_id = high
    last = rec.last
    if last is not None and last.run_id is None:
        # A status written before run ids existed: the last folded Job's id, or, if that Job is gone,
        # the newest id among the Jobs created before it finished (those are not newer than it).
        same = next((j for j in jobs if j["metadata"]["name"] == last.job), None)
        older = [run_id(j) or 0 for j in jobs
                 if (j["metadata"].get("creationTimestamp") or "") <= (last.finished_at or "")]
        last.run_id = (run_id(same) if same is not None else max(older, default=0)) or None


def job_outcome(job: dict) -> tuple[str, str] | None:
    """("Succeeded"|"Failed", reason) once a Job has finished, else None."""
    st = job.get("status") or {}
    for cond in st.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "Succeeded", "Completed"
        if cond.get("type") == "Failed":
            return "Failed", cond.get("reason") or "Failed"
    return None


def finished_at(job: dict) -> str:
    st = job.get("status") or {}
    if st.get("completionTime"):
        return st["completionTime"]
    for cond in st.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("lastTransitionTime"):
            return cond["lastTransitionTime"]
    return now()


# ---- folding results into status -----------------------------------------------------------------

def unfolded_runs(status: IndexCacheDeploymentStatus, jobs: list[dict]) -> list[dict]:
    """Finished Jobs newer than the last one folded in, oldest first."""
    last = status.recalibration.last
    last_id = (last.run_id or 0) if last is not None else 0
    done = [j for j in jobs if job_outcome(j) is not None and (run_id(j) or 0) > last_id]
    return sorted(done, key=lambda j: run_id(j) or 0)


def fold_finished_runs(ctx: Context, body: dict, spec: IndexCacheDeploymentSpec,
                       status: IndexCacheDeploymentStatus, jobs: list[dict], basis: str) -> None:
    """Fold every finished, newer Job into status, in run id order: the gate decides each; an applied
    result becomes `appliedCalibration`; `last` is always the newest run, written as a whole."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for job in unfolded_runs(status, jobs):
        job_name = job["metadata"]["name"]
        result, reason = job_outcome(job)
        run = RecalibrationRun(job=job_name, run_id=run_id(job), finished_at=finished_at(job),
                               result=result, reason=reason)
        if result == "Succeeded":
            run = _read_result(ctx, ns, job_name, spec, run)
        rec = status.recalibration
        if run.result == "Succeeded":
            decision, why = gate(spec, run.loss_delta)
            run.decision, run.reason = decision, why
            delta = run.loss_delta
            ctx.defer(lambda d=decision.value.lower(): ctx.metrics.gate_decisions.labels(ns, name, d).inc())
            ctx.defer(lambda: ctx.metrics.loss_delta.labels(ns, name).set(delta))
            if decision == Decision.applied:
                status.applied_calibration = AppliedCalibration(pattern=run.pattern, job=job_name,
                                                                run_id=run.run_id, basis=basis)
                rec.recommended_pattern = None
                ctx.events(body, "Normal", "RecalibrationApplied", f"Job {job_name}: {why}")
            else:
                rec.recommended_pattern = run.pattern
                ctx.events(body, "Normal", "RecalibrationNotApplied", f"Job {job_name}: {why}")
            ctx.defer(lambda: ctx.metrics.recalibrations.labels(ns, name, "succeeded").inc())
        else:
            ctx.defer(lambda: ctx.metrics.recalibrations.labels(ns, name, "failed").inc())
            ctx.events(body, "Warning", "RecalibrationFailed",
                       f"Job {job_name} failed ({run.reason}); keeping pattern {status.pattern}")
        rec.last = run


def _read_result(ctx: Context, ns: str, job_name: str, spec: IndexCacheDeploymentSpec,
                 run: RecalibrationRun) -> RecalibrationRun:
    cm_name = b.result_configmap_name(job_name)
    cm = ctx.kube.get(k.CONFIGMAPS, ns, cm_name)
    raw = ((cm or {}).get("data") or {}).get("result.json")
    if raw is None:
        return run.model_copy(update={"result": "Failed",
                                      "reason": f"ResultMissing: ConfigMap {cm_name} has no result.json"})
    try:
        data = json.loads(raw)
        pattern, loss_delta = str(data["pattern"]), float(data["loss_delta"])
    except (ValueError, KeyError, TypeError) as e:
        return run.model_copy(update={"result": "Failed", "reason": f"ResultInvalid: {e!r}"[:500]})
    why = pattern_problem(pattern, spec.model.num_layers or data.get("num_layers"))
    if why:
        return run.model_copy(update={"result": "Failed", "reason": f"ResultInvalid: {why}"})
    return run.model_copy(update={"pattern": pattern, "full_layers": full_layers(pattern),
                                  "loss_delta": loss_delta})


# ---- on-demand requests (the recalibrate annotation) ---------------------------------------------

RECENT_JOBS = 20  # how many on-demand Jobs status remembers against token reuse


def ondemand_running(jobs: list[dict]) -> bool:
    return any(job_outcome(j) is None and (j["metadata"].get("annotations") or {}).get(TOKEN_ANNOTATION) is not None
               for j in jobs)


def handle_request(ctx: Context, body: dict, owner: b.Owner, spec: IndexCacheDeploymentSpec,
                   status: IndexCacheDeploymentStatus, jobs: list[dict], token: str | None) -> None:
    """One recalibration at a time, one Job per token, level-triggered from the annotation and the Jobs:

    - a token already handled (`requestToken`) or whose Job ran lately (`recentJobs`) starts nothing;
      a reused one says so (event) instead of claiming a Job started;
    - while any recalibration Job runs, a new token waits in `queuedToken`;
    - the token's Job already exists (created just before a crash or a failed status write): adopt it;
    - else create it, with the next run id.
    `jobs` is updated with a Job created here."""
    rec = status.recalibration
    running = sorted((j for j in jobs if job_outcome(j) is None), key=lambda j: run_id(j) or 0)
    rec.active_job = running[-1]["metadata"]["name"] if running else None
    if not token or token == rec.request_token:
        rec.queued_token = None
        return
    job_name = b.ondemand_job_name(owner, token)
    existing = next((j for j in jobs if j["metadata"]["name"] == job_name), None)
    if job_name in rec.recent_jobs:
        rec.request_token, rec.queued_token = token, None
        ctx.events(body, "Warning", "RecalibrationTokenReused",
                   f"{RECALIBRATE_ANNOTATION}: {token[:64]!r} already started Job {job_name}; nothing started. "
                   "Set a new value, e.g. $(date +%s), to recalibrate again")
        return
    if existing is None and running:
        if rec.queued_token != token:
            ctx.events(body, "Normal", "RecalibrationQueued",
                       f"{token[:64]!r} waits for Job {rec.active_job} to finish (one recalibration at a time)")
        rec.queued_token = token
        return
    if existing is None:
        job = b.ondemand_job(owner, spec, ctx.config, token)
        job["metadata"]["annotations"][RUN_ID_ANNOTATION] = str(rec.last_run_id + 1)
        try:
            existing = ctx.kube.create(k.JOBS, owner.namespace, job)
            rec.last_run_id += 1
            ctx.events(body, "Normal", "RecalibrationStarted",
                       f"started Job {job_name} for {RECALIBRATE_ANNOTATION}={token[:64]}")
        except k.KubeError as e:
            if e.status != 409:
                raise
            existing = job  # created since the listing: that Job serves the token (the next reconcile reads it)
        jobs.append(existing)
    rec.request_token, rec.queued_token = token, None
    rec.recent_jobs = [j for j in rec.recent_jobs if j != job_name][-(RECENT_JOBS - 1):] + [job_name]
    if job_outcome(existing) is None:
        rec.active_job = job_name
