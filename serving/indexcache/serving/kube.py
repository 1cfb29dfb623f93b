"""Kubernetes from the serving side: a recalibration Job reports its result to the ConfigMap the operator
reads (`indexcache calibrate --report-configmap NAMESPACE/NAME`; name and key in indexcache_contracts)."""

import json
import os

from indexcache_contracts.calibration import RESULT_KEY, check_calibration_result


def parse_configmap_target(target: str) -> tuple[str, str]:
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"--report-configmap must be NAMESPACE/NAME, got {target!r}")
    return namespace, name


def report_configmap(result: dict, target: str, api=None) -> None:
    """Write the result to ConfigMap NAMESPACE/NAME, key result.json (create, or replace its data).

    Uses in-cluster credentials (the Job's service account), else the local kubeconfig.
    """
    namespace, name = parse_configmap_target(target)
    check_calibration_result(result)   # what the operator will accept, checked before it travels
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    if api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            # kubernetes reads $KUBECONFIG once, when first imported: read it now instead
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        api = client.CoreV1Api()
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "indexcache",
                                    "app.kubernetes.io/component": "calibration-result"}},
            "data": {RESULT_KEY: json.dumps(result, indent=2)}}
    try:
        api.create_namespaced_config_map(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        api.patch_namespaced_config_map(name, namespace, {"data": body["data"]})
