"""Least-privilege RBAC, checked against what the operator actually calls.

The real operator runs a scenario through every code path that talks to the API server (create, drift,
KubeRay status, an on-demand and a scheduled recalibration, scale to zero, dropping the schedule,
deletion) against the kmock emulator, which records each request as (apiGroup, resource, verb). The
chart's ClusterRole must grant every one of them, and nothing beyond them but EXTRA_GRANTS: grants the
real API server requires that an emulator cannot show, each with its reason. No hand-kept list of calls
can hide a missing verb: a new call in the code is recorded here the first time the scenario makes it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from chart_helpers import one

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
import kube_harness as kh  # noqa: E402

EXTRA_GRANTS = {
    # Children carry ownerReferences with blockOwnerDeletion: the API server's OwnerReferencesPermission-
    # Enforcement admission wants update on the owner's finalizers subresource (kmock has no admission).
    ("indexcache.io", "indexcachedeployments/finalizers", "update"):
        "blockOwnerDeletion on the children's owner references",
    # The Role the operator creates lets the recalibration Job write its result ConfigMap; RBAC's escalation
    # check only lets the operator create a Role granting verbs it holds itself.
    ("", "configmaps", "create"): "granted onward to the recalibration Job's Role",
    ("", "configmaps", "update"): "granted onward to the recalibration Job's Role",
    ("", "configmaps", "patch"): "granted onward to the recalibration Job's Role",
}


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def _scenario(api: kh.ApiServer, operator: kh.OperatorProcess) -> None:
    k, name = kh.k, "rbac"
    api.kube.create(kh.ICDS, kh.NS, kh.icd(name, recalibration={"schedule": "0 3 * * *"}))
    kh.wait_for(lambda: api.get(k.RAYSERVICES, name) and api.get(k.CRONJOBS, f"{name}-recal"), what="children")
    kh.kuberay_reports_healthy(api, name, ready=2)
    kh.wait_for(lambda: kh.condition(api.get(kh.ICDS, name), "Ready").get("status") == "True", what="Ready")
    # Drift: an edited child is patched back (each kind), a deleted one created again.
    drifted = "app.kubernetes.io/component"
    for res, child in ((k.RAYSERVICES, name), (k.PVCS, f"{name}-samples"), (k.SERVICEACCOUNTS, f"{name}-recalibration"),
                       (k.ROLES, f"{name}-recalibration"), (k.ROLEBINDINGS, f"{name}-recalibration"),
                       (k.CRONJOBS, f"{name}-recal")):
        original = api.get(res, child)["metadata"]["labels"][drifted]
        api.kube.patch(res, kh.NS, child, {"metadata": {"labels": {drifted: "edited"}}})
        kh.wait_for(lambda: api.get(res, child)["metadata"]["labels"][drifted] == original, what=f"{child} restored")
    api.kube.delete(k.ROLEBINDINGS, kh.NS, f"{name}-recalibration")
    kh.wait_for(lambda: api.get(k.ROLEBINDINGS, f"{name}-recalibration"), what="RoleBinding back")
    # An on-demand recalibration, then one the CronJob started (no run id: the operator writes one).
    operator.wait_idle()
    api.kube.patch(kh.ICDS, kh.NS, name, {"metadata": {"annotations": {"indexcache.io/recalibrate": "t1"}}})
    job = kh.wait_for(lambda: next(iter(api.names(k.JOBS)), None), what="Job")
    kh.job_finishes(api, job, kh.calibration_result("FSSSSSSS", loss_delta=0.0))
    kh.wait_for(lambda: api.get(kh.ICDS, name)["status"]["recalibration"].get("last", {}).get("job") == job)
    cron = api.get(k.CRONJOBS, f"{name}-recal")
    scheduled = {"apiVersion": "batch/v1", "kind": "Job",
                 "metadata": {"name": f"{name}-recal-29000000", "namespace": kh.NS,
                              "labels": cron["spec"]["jobTemplate"]["metadata"]["labels"]},
                 "spec": cron["spec"]["jobTemplate"]["spec"]}
    api.kube.create(k.JOBS, kh.NS, scheduled)
    kh.job_finishes(api, scheduled["metadata"]["name"], None)
    kh.wait_for(lambda: api.get(kh.ICDS, name)["status"]["recalibration"]["last"]["job"] == scheduled["metadata"]["name"])
    # Scale to zero (the RayService goes) and drop the schedule (the CronJob goes).
    api.kube.patch(kh.ICDS, kh.NS, name, {"spec": {"replicas": 0, "recalibration": {"schedule": None}}})
    kh.wait_for(lambda: api.get(k.RAYSERVICES, name) is None and api.get(k.CRONJOBS, f"{name}-recal") is None,
                what="RayService and CronJob removed")
    # Deletion: every child and the result ConfigMaps.
    api.kube.delete(kh.ICDS, kh.NS, name)
    kh.wait_for(lambda: not api.names(k.PVCS) and not api.names(k.JOBS) and not api.names(k.ROLES),
                what="children deleted")
    operator.wait_idle()


def _kopf_args(deployment: dict) -> tuple[str, ...]:
    """How the chart's Deployment runs the operator, as kopf arguments: peering when it sets
    INDEXCACHE_OPERATOR_PEERING (replicas > 1), else standalone; all namespaces."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    peering = env.get("INDEXCACHE_OPERATOR_PEERING")
    return ("-A", "--peering", peering) if peering else ("-A", "--standalone")


@pytest.fixture(scope="module")
def operator_calls(tmp_path_factory, default_objects) -> set[tuple[str, str, str]]:
    api = kh.ApiServer(tmp_path_factory.mktemp("rbac"))
    env = pytest.MonkeyPatch()
    operator = kh.OperatorProcess(api, env, kopf_args=_kopf_args(one(default_objects, "Deployment")))
    try:
        operator.start()
        _scenario(api, operator)
    finally:
        operator.stop()
        env.undo()
        api.close()
    calls = {(group, f"{plural}/{sub}" if sub else plural, verb)
             for (group, plural, verb, _, _, sub), _ in api.calls if plural and verb}
    assert len(api.calls) > 50, "the scenario hardly ran"
    return calls


def test_clusterrole_covers_every_call_the_operator_made(default_objects, operator_calls):
    missing = operator_calls - granted(one(default_objects, "ClusterRole"))
    assert not missing, f"the operator would get 403 Forbidden on: {sorted(missing)}"


def test_the_scenario_reached_every_kind_and_verb_it_must(operator_calls):
    """The recording has teeth: deletion cleanup deleted each kind it creates (the verbs issue 19 found
    missing), and the scheduled Job got its run id."""
    for kind in ("persistentvolumeclaims", "serviceaccounts", "configmaps", "jobs", "rayservices", "cronjobs"):
        group = {"jobs": "batch", "cronjobs": "batch", "rayservices": "ray.io"}.get(kind, "")
        assert (group, kind, "delete") in operator_calls, kind
    assert ("rbac.authorization.k8s.io", "roles", "delete") in operator_calls
    assert ("rbac.authorization.k8s.io", "rolebindings", "delete") in operator_calls
    assert ("batch", "jobs", "patch") in operator_calls
    # The chart runs two replicas with peering: kopf's keep-alives and the operator creating the object.
    assert {("kopf.dev", "clusterkopfpeerings", v) for v in ("create", "patch", "watch")} <= operator_calls


def test_clusterrole_grants_nothing_beyond_operator_calls(default_objects, operator_calls):
    role = one(default_objects, "ClusterRole")
    extra = granted(role) - operator_calls - set(EXTRA_GRANTS)
    assert not extra, f"more than the operator needs: {sorted(extra)}"
    flat = {x for rule in role["rules"] for key in ("apiGroups", "resources", "verbs") for x in rule[key]}
    assert "*" not in flat
    assert not {"secrets", "escalate", "bind", "impersonate"} & flat
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])


def test_binding_gives_the_role_to_the_operator_service_account(default_objects):
    role, binding, sa, dep = (one(default_objects, k) for k in
                              ("ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Deployment"))
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "indexcache-system"}]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_rbac_can_be_left_to_the_cluster_admin(helm):
    from chart_helpers import render
    objs = render(helm, "--set", "rbac.create=false")
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
