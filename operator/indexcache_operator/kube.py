"""A thin, dict-in dict-out Kubernetes REST client over the official client's auth and transport.

The operator reads and writes a handful of kinds (RayService, Job, CronJob, ...) as plain JSON
objects built by `builders`; typed models would only add conversions. Every write is a JSON merge
patch, which both the real API server and the test emulator (kmock) understand.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import kubernetes
import urllib3


class Resource(NamedTuple):
    group: str  # "" for the core API
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """namespace None: a cluster-scoped kind."""
        root = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{root}/{self.plural}" if namespace is None else f"{root}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


RAYSERVICES = Resource("ray.io", "v1", "rayservices")
JOBS = Resource("batch", "v1", "jobs")
CRONJOBS = Resource("batch", "v1", "cronjobs")
PVCS = Resource("", "v1", "persistentvolumeclaims")
CONFIGMAPS = Resource("", "v1", "configmaps")
PODS = Resource("", "v1", "pods")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings")


class KubeError(Exception):
    """A non-2xx answer from the API server; `status` is the HTTP code, `reason` the Status reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeUnavailable(KubeError):
    """The API server could not be reached at all (connection refused, reset, timed out); status 0."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "Unreachable", message)


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def from_environment(cls) -> "Kube":
        """In a pod: the service account; elsewhere: $KUBECONFIG / ~/.kube/config (as kubectl)."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            # The client reads $KUBECONFIG when it is imported; read it now instead.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        return cls(kubernetes.client.ApiClient())

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, header_params=headers, body=body,
                                         _request_timeout=30)
            raw = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:  # MaxRetryError, ProtocolError, timeouts
            raise KubeUnavailable(f"{method} {path}: {e}") from e
        data = json.loads(raw) if raw else None
        if not 200 <= response.status < 300:
            data = data if isinstance(data, dict) else {}
            raise KubeError(response.status, str(data.get("reason", response.reason)),
                            str(data.get("message", raw[:200])))
        return data

    def get(self, res: Resource, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", res.path(namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str, labels: dict[str, str] | None = None) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        data = self._call("GET", res.path(namespace), query=[("labelSelector", selector)] if selector else [])
        items = data.get("items", []) if data else []
        # Filter again here: a server (or emulator) that ignores the selector must not make us
        # act on objects that are not ours.
        return [o for o in items
                if all(o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in (labels or {}).items())]

    def create(self, res: Resource, namespace: str, body: dict) -> dict:
        return self._call("POST", res.path(namespace), body=body)

    def patch(self, res: Resource, namespace: str, name: str, patch: dict,
              subresource: str | None = None) -> dict:
        return self._call("PATCH", res.path(namespace, name, subresource), body=patch,
                          content_type="application/merge-patch+json")

    def delete(self, res: Resource, namespace: str, name: str) -> bool:
        """True if something was deleted; False if it was already gone."""
        try:
            self._call("DELETE", res.path(namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise
