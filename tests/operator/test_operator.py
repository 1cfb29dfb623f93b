"""The real kopf operator (KopfRunner) against the kmock API emulator: what a user sees after
`kubectl apply`, edits, deletes, annotations, finished Jobs and an operator restart."""
import urllib.request

import yaml

NAME = "chat"


def _status(api, kit):
    return (api.get(kit.ICDS, NAME) or {}).get("status") or {}


def _user_config(rs: dict) -> dict:
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")["user_config"]


def _ready(api, kit):
    return kit.condition(api.get(kit.ICDS, NAME), "Ready").get("status") == "True"


def _deploy_ready(api, kit, **spec):
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, **spec))
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    kit.kuberay_reports_healthy(api, NAME, ready=2)
    kit.wait_for(lambda: _ready(api, kit), what="Ready=True")


def _metric(port: int, line_start: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_create_builds_owned_children_and_truthful_status(api, operator, kit):
    k = kit.k
    created = api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME))
    rs = kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    for res, name in [(k.PVCS, "chat-samples"), (k.SERVICEACCOUNTS, "chat-recalibration"),
                      (k.ROLES, "chat-recalibration"), (k.ROLEBINDINGS, "chat-recalibration")]:
        child = kit.wait_for(lambda: api.get(res, name), what=name)
        assert child["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert api.names(k.CRONJOBS) == set()  # no schedule, no CronJob
    assert _user_config(rs)["pattern"] == "FFSSFSSS"

    # KubeRay has not reported yet: reconciled, but not Ready.
    status = kit.wait_for(lambda: _status(api, kit).get("phase") == "Deploying" and _status(api, kit))
    assert kit.condition({"status": status}, "Reconciled")["status"] == "True"
    assert kit.condition({"status": status}, "Ready")["reason"] == "RayServiceUpdating"
    assert (status["pattern"], status["fullLayers"], status["patternVersion"]) == ("FFSSFSSS", 3, 1)

    kit.kuberay_reports_healthy(api, NAME, ready=2)
    kit.wait_for(lambda: _ready(api, kit), what="Ready=True")
    body = api.get(kit.ICDS, NAME)
    ready = kit.condition(body, "Ready")
    assert ready["observedGeneration"] == body["metadata"]["generation"] == body["status"]["observedGeneration"]
    assert (body["status"]["phase"], body["status"]["readyReplicas"]) == ("Ready", 2)
    kit.wait_for(lambda: any(e["reason"] == "Created" and "RayService chat" in e["message"] for e in api.events()), what="event")

    port = operator.metrics_port
    assert _metric(port, 'indexcache_operator_condition{condition="Ready",name="chat",namespace="serving",status="True"}') == 1.0
    assert _metric(port, 'indexcache_operator_reconciles_total{name="chat",namespace="serving",result="success"}') >= 1
    assert _metric(port, 'indexcache_operator_full_layers{name="chat",namespace="serving"}') == 3.0


def test_update_replicas_and_pattern(api, operator, kit):
    k = kit.k
    _deploy_ready(api, kit)
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"replicas": 3}})
    rs = kit.wait_for(lambda: (r := api.get(k.RAYSERVICES, NAME))["spec"]["rayClusterConfig"]
                      ["workerGroupSpecs"][0]["replicas"] == 3 and r, what="3 workers")
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["num_replicas"] == 3
    # The RayService changed; until KubeRay observes it, the resource is not Ready.
    body = kit.wait_for(lambda: (b := api.get(kit.ICDS, NAME))["status"]["observedGeneration"] == 2 and b)
    assert kit.condition(body, "Ready") | {} and kit.condition(body, "Ready")["status"] == "False"
    kit.kuberay_reports_healthy(api, NAME, ready=3)
    kit.wait_for(lambda: _ready(api, kit) and _status(api, kit)["readyReplicas"] == 3)

    cluster_before = api.get(k.RAYSERVICES, NAME)["spec"]["rayClusterConfig"]
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"indexCache": {"pattern": "FSSSFSSS"}}})
    rs = kit.wait_for(lambda: (r := api.get(k.RAYSERVICES, NAME)) and _user_config(r)["pattern"] == "FSSSFSSS" and r)
    assert rs["spec"]["rayClusterConfig"] == cluster_before  # no new cluster, no pod restarts
    assert _user_config(rs)["pattern_version"] == 2
    assert kit.wait_for(lambda: _status(api, kit)["fullLayers"] == 2)
    kit.wait_for(lambda: any(e["reason"] == "PatternChanged" for e in api.events()), what="event")


def test_scale_to_zero_removes_the_rayservice_and_scaling_up_brings_it_back(api, operator, kit):
    """replicas: 0 frees every pod (Ray Serve cannot run a deployment at 0 replicas, so the RayService goes);
    the samples claim and the pattern stay, and replicas: 2 serves the same pattern again."""
    k = kit.k
    _deploy_ready(api, kit)
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"replicas": 0}})
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME) is None, what="RayService removed")
    body = kit.wait_for(lambda: (x := api.get(kit.ICDS, NAME))["status"].get("phase") == "ScaledToZero" and x)
    assert kit.condition(body, "Ready")["reason"] == "ScaledToZero"
    assert kit.condition(body, "Degraded")["status"] == "False"
    assert api.get(k.PVCS, "chat-samples") is not None and body["status"]["pattern"] == "FFSSFSSS"
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"replicas": 2}})
    rs = kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService back")
    assert _user_config(rs)["pattern"] == "FFSSFSSS"
    kit.kuberay_reports_healthy(api, NAME, ready=2)
    kit.wait_for(lambda: _ready(api, kit), what="Ready=True again")


def test_children_edited_or_deleted_by_hand_are_restored(api, operator, kit):
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, recalibration={"schedule": "0 3 * * *"}))
    original = kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    kit.wait_for(lambda: api.get(k.CRONJOBS, "chat-recal"), what="CronJob")

    api.kube.delete(k.RAYSERVICES, kit.NS, NAME)
    restored = kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService recreated")
    assert restored["spec"] == original["spec"]

    api.kube.patch(k.RAYSERVICES, kit.NS, NAME, {"spec": {"serveConfigV2": "applications: []\n"}})
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME)["spec"]["serveConfigV2"] == original["spec"]["serveConfigV2"],
                 what="serve config restored")
    api.kube.patch(k.CRONJOBS, kit.NS, "chat-recal", {"spec": {"schedule": "* * * * *"}})
    kit.wait_for(lambda: api.get(k.CRONJOBS, "chat-recal")["spec"]["schedule"] == "0 3 * * *",
                 what="schedule restored")
    api.kube.delete(k.ROLEBINDINGS, kit.NS, "chat-recalibration")
    kit.wait_for(lambda: api.get(k.ROLEBINDINGS, "chat-recalibration"), what="RoleBinding recreated")
    kit.wait_for(lambda: any(e["reason"] == "Updated" for e in api.events()), what="event")


def test_deleting_the_resource_removes_everything(api, operator, kit):
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, recalibration={"schedule": "@daily"}))
    kinds = [k.RAYSERVICES, k.PVCS, k.CRONJOBS, k.SERVICEACCOUNTS, k.ROLES, k.ROLEBINDINGS]
    kit.wait_for(lambda: all(api.names(res) for res in kinds), what="all children")
    api.kube.delete(kit.ICDS, kit.NS, NAME)
    kit.wait_for(lambda: not any(api.names(res) for res in kinds), what="children deleted")
    assert api.get(kit.ICDS, NAME) is None
    assert _metric(operator.metrics_port, 'indexcache_operator_condition{condition="Ready",name="chat"') is None


def _recalibrate(api, kit, token: str, operator=None) -> str:
    if operator is not None:
        operator.wait_idle()  # so that only the annotation's own watch event can start the Job
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"metadata": {"annotations": {"indexcache.io/recalibrate": token}}})
    return kit.wait_for(lambda: next(iter(api.names(kit.k.JOBS) - _recalibrate.seen), None), what="a new Job")


_recalibrate.seen = set()


def test_annotation_recalibration_through_the_quality_gate(api, operator, kit):
    k = kit.k
    _recalibrate.seen = set()
    _deploy_ready(api, kit, recalibration={"autoApply": "Gated", "maxLossDelta": 0.02})
    cluster_before = api.get(k.RAYSERVICES, NAME)["spec"]["rayClusterConfig"]

    job = _recalibrate(api, kit, "first", operator)
    _recalibrate.seen.add(job)
    assert job.startswith("chat-recal-")
    assert api.get(k.JOBS, job)["spec"]["template"]["spec"]["containers"][0]["args"][0] == "calibrate"
    kit.job_finishes(api, job, kit.calibration_result("FSSSSSSS", loss_delta=0.01))
    rs = kit.wait_for(lambda: (r := api.get(k.RAYSERVICES, NAME)) and _user_config(r)["pattern"] == "FSSSSSSS" and r,
                      what="calibrated pattern rolled out")
    assert rs["spec"]["rayClusterConfig"] == cluster_before
    status = kit.wait_for(lambda: _status(api, kit).get("fullLayers") == 1 and _status(api, kit))
    last = status["recalibration"]["last"]
    assert (last["job"], last["result"], last["decision"], last["lossDelta"]) == (job, "Succeeded", "Applied", 0.01)
    assert kit.condition({"status": status}, "Calibrated")["reason"] == "PatternApplied"

    job2 = _recalibrate(api, kit, "second", operator)
    kit.job_finishes(api, job2, kit.calibration_result("FFFSSSSS", loss_delta=0.3))
    status = kit.wait_for(lambda: _status(api, kit)["recalibration"]["last"]["job"] == job2 and _status(api, kit))
    assert status["recalibration"]["last"]["decision"] == "Rejected"
    assert status["recalibration"]["recommendedPattern"] == "FFFSSSSS"
    assert status["pattern"] == "FSSSSSSS" == _user_config(api.get(k.RAYSERVICES, NAME))["pattern"]
    calibrated = kit.condition({"status": status}, "Calibrated")
    assert calibrated["reason"] == "GateRejected" and "maxLossDelta" in calibrated["message"]
    # The same annotation value again starts nothing new.
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"metadata": {"labels": {"touch": "1"}}})
    kit.wait_for(lambda: api.get(kit.ICDS, NAME)["metadata"]["labels"].get("touch"))
    assert len(api.names(k.JOBS)) == 2
    port = operator.metrics_port
    assert _metric(port, 'indexcache_operator_gate_decisions_total{decision="applied",name="chat"') == 1.0
    assert _metric(port, 'indexcache_operator_gate_decisions_total{decision="rejected",name="chat"') == 1.0


def test_a_failed_job_keeps_the_pattern_and_says_so(api, operator, kit):
    _recalibrate.seen = set()
    _deploy_ready(api, kit)
    job = _recalibrate(api, kit, "will-fail", operator)
    kit.job_finishes(api, job, None, failure_reason="DeadlineExceeded")
    status = kit.wait_for(lambda: (_status(api, kit).get("recalibration") or {}).get("last") and _status(api, kit))
    assert (status["recalibration"]["last"]["result"], status["recalibration"]["last"]["reason"]) == \
        ("Failed", "DeadlineExceeded")
    assert status["pattern"] == "FFSSFSSS"
    assert kit.condition({"status": status}, "Calibrated")["reason"] == "RecalibrationFailed"
    assert kit.wait_for(lambda: [e for e in api.events() if e["reason"] == "RecalibrationFailed"
                                 and e["type"] == "Warning"])


def test_operator_restart_mid_recalibration_resumes_without_duplicates(api, operator, kit):
    k = kit.k
    _recalibrate.seen = set()
    _deploy_ready(api, kit)
    job = _recalibrate(api, kit, "across-restart", operator)
    kit.wait_for(lambda: _status(api, kit)["recalibration"].get("requestToken") == "across-restart")
    operator.stop()
    kit.job_finishes(api, job, kit.calibration_result("FSSSFSSS", loss_delta=0.0))  # while it is down
    operator.start()
    kit.wait_for(lambda: (_status(api, kit)["recalibration"].get("last") or {}).get("job") == job,
                 what="result recorded after restart")
    kit.wait_for(lambda: _user_config(api.get(k.RAYSERVICES, NAME))["pattern"] == "FSSSFSSS")
    assert api.names(k.JOBS) == {job}
    assert _metric(operator.metrics_port,
                   'indexcache_operator_gate_decisions_total{decision="applied",name="chat"') == 1.0
    assert _status(api, kit)["patternVersion"] == 2


def test_a_pattern_of_the_wrong_length_degrades_without_crash_looping(api, operator, kit):
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, indexCache={"pattern": "FFSS"}))  # numLayers is 8
    body = kit.wait_for(lambda: kit.condition(b := api.get(kit.ICDS, NAME), "Degraded").get("status") == "True" and b)
    degraded = kit.condition(body, "Degraded")
    assert degraded["reason"] == "PatternLengthMismatch" and "model.numLayers is 8" in degraded["message"]
    assert body["status"]["phase"] == "Degraded"
    assert api.get(k.RAYSERVICES, NAME) is None
    assert urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/healthz").status == 200
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"indexCache": {"pattern": "FFSSFFSS"}}})
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService after the fix")
    kit.wait_for(lambda: kit.condition(api.get(kit.ICDS, NAME), "Degraded")["status"] == "False")
