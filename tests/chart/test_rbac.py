"""Least-privilege RBAC: the ClusterRole grants exactly what the operator calls (chart_helpers.OPERATOR_API_CALLS)."""
from __future__ import annotations

from chart_helpers import OPERATOR_API_CALLS, one


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_clusterrole_covers_every_operator_call(default_objects):
    missing = OPERATOR_API_CALLS - granted(one(default_objects, "ClusterRole"))
    assert not missing, f"the operator would get 403 Forbidden on: {sorted(missing)}"


def test_clusterrole_grants_nothing_beyond_operator_calls(default_objects):
    role = one(default_objects, "ClusterRole")
    extra = granted(role) - OPERATOR_API_CALLS
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
