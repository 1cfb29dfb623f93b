"""The real kopf operator against kmock with faults injected: restarts (also mid-reconcile), API errors
(403, 404, 409, 500), an unreachable API server, and two operators at once. One test (or more) per defect
of issue 19, numbered as there; each failed on the code before its fix. Item 9 (per-replica metrics) is
checked in tests/chart/test_chart.py, item 12 (freq without numLayers) in test_pattern_rule.py, and
the chaos sequences of all of them together in test_chaos.py."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pod_security

NAME = "chat"


def _status(api, kit, name: str = NAME) -> dict:
    return (api.get(kit.ICDS, name) or {}).get("status") or {}


def _user_config(rs: dict) -> dict:
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")["user_config"]


def _deploy_ready(api, kit, name: str = NAME, **spec) -> None:
    api.kube.create(kit.ICDS, kit.NS, kit.icd(name, **spec))
    kit.wait_for(lambda: api.get(kit.k.RAYSERVICES, name), what="RayService")
    kit.kuberay_reports_healthy(api, name, ready=2)
    kit.wait_for(lambda: kit.condition(api.get(kit.ICDS, name), "Ready").get("status") == "True", what="Ready")


def _annotate(api, kit, token: str, name: str = NAME) -> None:
    api.kube.patch(kit.ICDS, kit.NS, name, {"metadata": {"annotations": {"indexcache.io/recalibrate": token}}})


def _job_for(api, kit, token: str) -> str:
    """The Job the operator started for `token` (waits for it)."""
    def find():
        for job in api.kube.list(kit.k.JOBS, kit.NS):
            if (job["metadata"].get("annotations") or {}).get("indexcache.io/token") == token:
                return job["metadata"]["name"]
        return None
    return kit.wait_for(find, what=f"the Job for token {token!r}")


def _rs_patterns_written(api, since: int) -> list[str]:
    """Patterns in the RayService user_config of every create/patch after call number `since`."""
    out = []
    for (group, plural, verb, _, _, _), body in api.calls[since:]:
        if plural == "rayservices" and verb in ("create", "patch") and isinstance(body, dict):
            text = (body.get("spec") or {}).get("serveConfigV2")
            if text:
                app = yaml.safe_load(text)["applications"][0]
                server = next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")
                out.append(server["user_config"].get("pattern"))
    return out


# ---- 1. a restart never re-applies an older calibration ----------------------------------------------

def test_1_restarts_never_reapply_an_older_calibration(api, operator, kit):
    """Two applied Jobs (both kept, as the 7-day TTL keeps them), then three operator restarts: the newest
    calibration stays applied, the pattern version does not move and the RayService never flips back."""
    k = kit.k
    _deploy_ready(api, kit)
    for token, pattern in (("one", "FSSSSSSS"), ("two", "FFSSSSSS")):
        operator.wait_idle()
        _annotate(api, kit, token)
        job = _job_for(api, kit, token)
        kit.job_finishes(api, job, kit.calibration_result(pattern, loss_delta=0.0))
        kit.wait_for(lambda: (_status(api, kit).get("recalibration") or {}).get("last", {}).get("job") == job,
                     what=f"{job} recorded")
    kit.wait_for(lambda: _status(api, kit).get("pattern") == "FFSSSSSS", what="the newest pattern applied")
    operator.wait_idle()
    version = _status(api, kit)["patternVersion"]
    assert version == 3  # spec pattern (1), then one per applied Job
    since = len(api.calls)
    for _ in range(3):
        operator.stop()
        operator.start()
        operator.wait_idle()
    status = _status(api, kit)
    assert (status["pattern"], status["patternVersion"]) == ("FFSSSSSS", version)
    assert _user_config(api.get(k.RAYSERVICES, NAME))["pattern"] == "FFSSSSSS"
    assert "FSSSSSSS" not in _rs_patterns_written(api, since), "the older Job's pattern was rolled out again"


# ---- 2. the resync is supervised and stays in kopf's namespaces --------------------------------------

FAST_RESYNC = {"INDEXCACHE_OPERATOR_RESYNC_SECONDS": "1", "INDEXCACHE_OPERATOR_HEALTH_GRACE_SECONDS": "3"}


def _resync_restores_a_hand_edit(api, kit) -> None:
    """Only the resync can undo this edit: the reconcile its watch event starts fails (500 once), and a
    child event is not retried by kopf."""
    k = kit.k
    api.inject("patch", "rayservices", 500, name=NAME, times=1)
    api.kube.patch(k.RAYSERVICES, kit.NS, NAME, {"spec": {"serveConfigV2": "applications: []\n"}})
    kit.wait_for(lambda: "IndexCacheServer" in api.get(k.RAYSERVICES, NAME)["spec"]["serveConfigV2"],
                 timeout=10, what="the resync restored the RayService")


def test_2_resync_survives_an_unreachable_api_server_and_says_so_in_healthz(api, make_operator, kit):
    operator = make_operator(**FAST_RESYNC)
    operator.start()
    _deploy_ready(api, kit)
    assert operator.healthy() is True
    api.refuse_connections()  # connection refused for the operator (MaxRetryError in the client)
    try:
        kit.wait_for(lambda: operator.healthy() is False, timeout=15, what="/healthz unhealthy")
        assert operator.metric('indexcache_operator_errors_total{reason="ApiUnreachable",source="resync"}') >= 1
    finally:
        api.accept_connections()
    kit.wait_for(lambda: operator.healthy() is True, timeout=15, what="/healthz healthy again")
    _resync_restores_a_hand_edit(api, kit)


def test_2_a_404_on_the_status_patch_does_not_end_the_resync(api, make_operator, kit):
    operator = make_operator(**FAST_RESYNC)
    operator.start()
    _deploy_ready(api, kit)
    operator.wait_idle()
    api.inject("patch", kit.PLURAL, 404, name=NAME, subresource="status")
    kit.kuberay_reports_healthy(api, NAME, ready=1)  # a status to write: readyReplicas 2 -> 1
    kit.wait_for(lambda: operator.metric('indexcache_operator_errors_total{reason="Api404",source="resync"}'),
                 timeout=10, what="a resync pass answered 404 on its status PATCH")
    api.clear_faults()
    _resync_restores_a_hand_edit(api, kit)
    kit.wait_for(lambda: operator.healthy() is True, timeout=5, what="/healthz healthy")


def test_2_resync_stays_in_the_namespaces_kopf_watches(api, make_operator, kit):
    operator = make_operator(kopf_args=("-n", kit.NS, "--standalone"), **FAST_RESYNC)
    operator.start()
    other = kit.icd("other")
    other["metadata"]["namespace"] = "elsewhere"
    api.kube.create(kit.ICDS, "elsewhere", other)
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME))
    kit.wait_for(lambda: api.get(kit.k.RAYSERVICES, NAME), what="RayService in the watched namespace")
    before, t0 = operator.reconciles(), time.monotonic()
    # Absence needs time to show: three resync intervals (1 s) and three more reconciles of "chat".
    kit.wait_for(lambda: operator.reconciles() >= before + 3 and time.monotonic() - t0 > 3.5,
                 what="three resync passes")
    assert api.kube.get(kit.k.RAYSERVICES, "elsewhere", "other") is None
    assert not [c for c, _ in api.calls if c[3] == "elsewhere" and c[2] != "watch" and c[1] != kit.PLURAL]


# ---- 3. deletion cleanup goes on past a refused call, and the metrics go with the resource --------------

def test_3_cleanup_goes_on_past_a_403_and_forgets_the_metrics(api, operator, kit):
    """RBAC without `delete` on a kind (403) must not leak the result ConfigMaps or leave the deleted
    resource's metric series (an alert could fire for a resource that no longer exists)."""
    k = kit.k
    _deploy_ready(api, kit)
    operator.wait_idle()
    _annotate(api, kit, "before-delete")
    job = _job_for(api, kit, "before-delete")
    kit.job_finishes(api, job, kit.calibration_result("FSSSSSSS", loss_delta=0.0))
    kit.wait_for(lambda: _status(api, kit)["recalibration"].get("last", {}).get("job") == job)
    assert operator.metric('indexcache_operator_condition{condition="Ready",name="chat"') is not None
    api.inject("delete", "persistentvolumeclaims", 403)
    api.kube.delete(kit.ICDS, kit.NS, NAME)
    kit.wait_for(lambda: api.get(k.CONFIGMAPS, f"{job}-result") is None, what="the result ConfigMap deleted")
    kit.wait_for(lambda: not api.names(k.JOBS) and not api.names(k.RAYSERVICES), what="Job and RayService deleted")
    kit.wait_for(lambda: operator.metric('indexcache_operator_condition{condition="Ready",name="chat"') is None,
                 what="the deleted resource's series gone")
    assert operator.metric('indexcache_operator_errors_total{reason="Api403",source="cleanup"}') == 1


# ---- 4. quantities compare by value: the API server's canonical strings are no drift -----------------

def test_4_children_are_not_patched_again_when_nothing_changed(api, operator, kit):
    """The API server returns resource quantities as strings ("1", "500m"); a reconcile that compares
    them with the ints it wrote patches the CronJob (and posts "Updated") every time."""
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, recalibration={"schedule": "0 3 * * *"}))
    kit.wait_for(lambda: api.get(kit.k.CRONJOBS, "chat-recal"), what="CronJob")
    operator.wait_idle()
    since = len(api.calls)
    for i in range(3):  # three reconciles with nothing to change
        api.kube.patch(kit.ICDS, kit.NS, NAME, {"metadata": {"labels": {"touch": str(i)}}})
        operator.wait_idle()
    writes = [c for c, _ in api.calls[since:] if c[2] in ("create", "patch", "update", "delete")
              and c[1] not in (kit.PLURAL, "events")]
    assert writes == [], f"children written with nothing to change: {writes}"
    assert not [e for e in api.events() if e["reason"] == "Updated"]


# ---- 5. status sections are written whole: nothing stale survives from an earlier run -----------------

def test_5_rejected_then_applied_then_failed_leaves_no_stale_status(api, operator, kit):
    _deploy_ready(api, kit)
    runs = [("rejected", kit.calibration_result("FFFSSSSS", loss_delta=0.3)),
            ("applied", kit.calibration_result("FSSSSSSS", loss_delta=0.01)),
            ("failed", None)]
    seen = {}
    for token, result in runs:
        operator.wait_idle()
        _annotate(api, kit, token)
        job = _job_for(api, kit, token)
        kit.job_finishes(api, job, result, failure_reason="DeadlineExceeded")
        seen[token] = kit.wait_for(lambda: (s := _status(api, kit))["recalibration"].get("last", {}).get("job") == job
                                   and s, what=f"{token} recorded")["recalibration"]
    assert seen["rejected"]["recommendedPattern"] == "FFFSSSSS"
    assert "recommendedPattern" not in seen["applied"]
    assert seen["failed"]["last"]["job"] == _job_for(api, kit, "failed")
    assert seen["failed"]["last"]["result"] == "Failed" and seen["failed"]["last"]["decision"] == "None"
    # The failed run carries no pattern or loss delta of the run before it.
    assert not {"pattern", "lossDelta", "fullLayers"} & set(seen["failed"]["last"]), seen["failed"]["last"]
    assert "recommendedPattern" not in seen["failed"]
    assert _status(api, kit)["pattern"] == "FSSSSSSS"


# ---- 6. names KubeRay refuses are refused up front, and KubeRay's refusal is surfaced ------------------

def test_6_kuberay_validation_failure_is_surfaced_not_waited_on(api, operator, kit):
    """KubeRay marks an invalid RayService Ready=False reason ValidationFailed without observedGeneration
    (the CRD now refuses the names it refused; other validation errors still reach KubeRay)."""
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME))
    kit.wait_for(lambda: api.get(kit.k.RAYSERVICES, NAME), what="RayService")
    api.kube.patch(kit.k.RAYSERVICES, kit.NS, NAME, {"status": {"conditions": [{
        "type": "Ready", "status": "False", "reason": "ValidationFailed", "lastTransitionTime": "2026-11-29T00:00:00Z",
        "message": "RayService name should be no more than 63 characters and a DNS-1035 label"}]}},
        subresource="status")
    body = kit.wait_for(lambda: (b := api.get(kit.ICDS, NAME))["status"].get("phase") == "Degraded" and b,
                        what="Degraded")
    ready, degraded = kit.condition(body, "Ready"), kit.condition(body, "Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "RayServiceInvalid")
    assert degraded["status"] == "True" and "DNS-1035" in degraded["message"]


# ---- 7. one recalibration at a time; a reused token starts nothing and says so ------------------------

def _jobs(api, kit) -> set[str]:
    return api.names(kit.k.JOBS)


def test_7_a_second_token_waits_for_the_running_job(api, operator, kit):
    _deploy_ready(api, kit, recalibration={"schedule": "0 3 * * *"})
    operator.wait_idle()
    _annotate(api, kit, "first")
    first = _job_for(api, kit, "first")
    operator.wait_idle()
    _annotate(api, kit, "second")
    status = kit.wait_for(lambda: (s := _status(api, kit))["recalibration"].get("queuedToken") == "second" and s,
                          what="the second token queued in status")
    assert status["recalibration"]["activeJob"] == first
    operator.wait_idle()
    assert _jobs(api, kit) == {first}, "a second GPU Job started while the first ran"
    # The CronJob holds its schedule while an on-demand run has the GPUs (its own Forbid sees only its Jobs).
    assert api.get(kit.k.CRONJOBS, "chat-recal")["spec"]["suspend"] is True
    kit.wait_for(lambda: any(e["reason"] == "RecalibrationQueued" for e in api.events()), what="a Queued event")

    kit.job_finishes(api, first, kit.calibration_result("FSSSSSSS", loss_delta=0.0))
    second = _job_for(api, kit, "second")
    status = kit.wait_for(lambda: (s := _status(api, kit))["recalibration"].get("activeJob") == second and s,
                          what="the queued token's Job running")
    assert "queuedToken" not in status["recalibration"] and status["recalibration"]["requestToken"] == "second"
    assert api.get(kit.k.CRONJOBS, "chat-recal")["spec"]["suspend"] is True
    kit.job_finishes(api, second, None)
    kit.wait_for(lambda: api.get(kit.k.CRONJOBS, "chat-recal")["spec"]["suspend"] is False,
                 what="the schedule resumed")
    kit.wait_for(lambda: "activeJob" not in _status(api, kit)["recalibration"], what="no Job active")


def test_7_a_reused_token_starts_nothing_and_status_says_so(api, operator, kit):
    _deploy_ready(api, kit)
    for token in ("one", "two"):
        operator.wait_idle()
        _annotate(api, kit, token)
        job = _job_for(api, kit, token)
        kit.job_finishes(api, job, kit.calibration_result("FSSSSSSS", loss_delta=0.0))
        kit.wait_for(lambda: _status(api, kit)["recalibration"].get("last", {}).get("job") == job)
    jobs = _jobs(api, kit)
    operator.wait_idle()
    _annotate(api, kit, "one")  # the first token again
    kit.wait_for(lambda: _status(api, kit)["recalibration"]["requestToken"] == "one", what="the token handled")
    operator.wait_idle()
    assert _jobs(api, kit) == jobs
    rec = _status(api, kit)["recalibration"]
    assert "activeJob" not in rec, f"status claims Job {rec.get('activeJob')} started for a reused token"
    warning = kit.wait_for(lambda: [e for e in api.events() if e["reason"] == "RecalibrationTokenReused"],
                           what="a warning event")[0]
    assert warning["type"] == "Warning" and "new value" in warning["message"]


def test_7_restart_mid_reconcile_after_the_job_was_created_starts_no_second_job(api, make_operator, kit):
    operator = make_operator()
    operator.start()
    _deploy_ready(api, kit)
    operator.wait_idle()
    api.inject("patch", kit.PLURAL, 500, name=NAME, subresource="status")  # the Job exists, status never says so
    _annotate(api, kit, "across")
    job = _job_for(api, kit, "across")
    operator.stop()
    api.clear_faults()
    operator.start()
    kit.wait_for(lambda: _status(api, kit)["recalibration"].get("activeJob") == job, what="the Job adopted")
    operator.wait_idle()
    assert _jobs(api, kit) == {job}
    assert len(api.writes("jobs", "create")) == 1


# ---- 8. the recalibration Job computes on the GPUs it holds ---------------------------------------------

def test_8_the_job_created_on_kmock_calibrates_on_cuda_with_cpu_and_memory_requested(api, operator, kit):
    _deploy_ready(api, kit, gpusPerReplica=2)
    operator.wait_idle()
    _annotate(api, kit, "gpu")
    job = api.get(kit.k.JOBS, _job_for(api, kit, "gpu"))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--device") + 1] == "cuda"
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(container["resources"]["requests"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # as the API server stores it


# ---- 10. two operators at once: one works, the other stands by and takes over; status writes are
# conditional on the resourceVersion read ------------------------------------------------------------------

def test_10_status_writes_carry_the_resource_version_and_a_conflict_is_redone(api, operator, kit):
    _deploy_ready(api, kit)
    operator.wait_idle()
    conflict = api.inject("patch", kit.PLURAL, 409, name=NAME, subresource="status", times=1)
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"indexCache": {"pattern": "FSSSFSSS"}}})
    kit.wait_for(lambda: _status(api, kit).get("pattern") == "FSSSFSSS", timeout=5, what="the redone write")
    assert conflict.hits == 1
    status_patches = [body for (c, body) in api.writes(kit.PLURAL, "patch") if c[5] == "status"]
    assert status_patches and all(body["metadata"]["resourceVersion"] for body in status_patches)
    assert _status(api, kit)["patternVersion"] == 2  # the lost attempt's bump was not kept twice


PEERS = {"INDEXCACHE_OPERATOR_RESYNC_SECONDS": "1", "INDEXCACHE_OPERATOR_PEERING_LIFETIME": "4"}


def test_10_two_operators_one_active_the_other_takes_over(api, make_operator, kit):
    k = kit.k
    peering = ("-A", "--peering", "indexcache-operator")
    first, second = make_operator(peering, **PEERS), make_operator(peering, **PEERS)
    first.start()
    second.start()
    # The peers find each other within a resync period (the gauge is set by each replica's check).
    kit.wait_for(lambda: sorted([first.metric("indexcache_operator_active"), second.metric("indexcache_operator_active")])
                 == [0.0, 1.0], what="one active replica, one standing by")
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME))
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    t0 = time.monotonic()
    # Both stay up for several resync periods; exactly one of them ever reconciles.
    kit.wait_for(lambda: time.monotonic() - t0 > 4 and max(first.reconciles(), second.reconciles()) >= 4,
                 what="resync passes")
    counts = sorted([first.reconciles(), second.reconciles()])
    assert counts[0] == 0, f"both operators reconciled: {counts}"
    active, standby = (first, second) if first.reconciles() else (second, first)
    assert (active.metric("indexcache_operator_active"), standby.metric("indexcache_operator_active")) == (1.0, 0.0)
    assert active.healthy() is True and standby.healthy() is True
    active.stop()
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"replicas": 3}})
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3,
                 timeout=15, what="the standby took over")
    kit.wait_for(lambda: standby.reconciles() > 0 and standby.metric("indexcache_operator_active") == 1.0,
                 what="the standby counted its reconcile and says it is active")


# ---- 11. generated pods pass PodSecurity "restricted"; scheduling settings reach them ------------------

def test_11_pods_on_kmock_are_restricted_and_scheduled_as_the_spec_says(api, operator, kit):
    from pod_security import restricted_violations
    spec = {"imagePullSecrets": [{"name": "regcred"}],
            "workers": {"nodeSelector": {"pool": "h200"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "recalibration": {"job": {"nodeSelector": {"pool": "h200"}, "env": [{"name": "X", "value": "1"}]}}}
    _deploy_ready(api, kit, **spec)
    operator.wait_idle()
    _annotate(api, kit, "pods")
    job = api.get(kit.k.JOBS, _job_for(api, kit, "pods"))["spec"]["template"]["spec"]
    cluster = api.get(kit.k.RAYSERVICES, NAME)["spec"]["rayClusterConfig"]
    head, worker = cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]
    for pod in (head, worker, job):
        assert restricted_violations(pod) == []
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert worker["nodeSelector"] == job["nodeSelector"] == {"pool": "h200"} and "nodeSelector" not in head
    assert worker["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert {"name": "X", "value": "1"} in job["containers"][0]["env"]
    # A bad setting degrades the resource, naming the field, and leaves the children alone.
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"workers": {"resources": {"limits": {"memory": "lots"}}}}})
    degraded = kit.wait_for(lambda: (c := kit.condition(api.get(kit.ICDS, NAME), "Degraded")).get("status") == "True"
                            and c, what="Degraded")
    assert "spec.workers.resources.limits.memory" in degraded["message"]
