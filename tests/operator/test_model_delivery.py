"""Model delivery as a user sees it in `kubectl get icd -o yaml`: the real operator (kopf, against kmock)
reads the fetch-model init containers of the pods it owns and shows the resolved revision and cache path in
status.model, a failed download as condition ModelReady=False with the fetch's reason plus a Warning event,
and never reports Ready while a replica cannot get its model. A cacheVolume with a size is a claim the
operator creates, owns and removes."""
import json

NAME = "chat"
URI = "hf://acme/glm5@main"
COMMIT = "3f1a" * 10
PATH = "/model-cache/6b1e0c2f9d8a7b6c5d4e3f2a1b0c9d8e"
AUTH_ERROR = ("error (Auth): hf://acme/glm5: the Hub refused the token (401); check HF_TOKEN "
              "(spec.model.credentialsSecret)")


def _icd(api, kit):
    return api.get(kit.ICDS, NAME)


def _events(api, reason):
    return [e for e in api.events() if e.get("reason") == reason]


def test_a_failed_fetch_is_a_condition_and_an_event_and_never_ready_until_the_model_arrives(api, operator, kit):
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, model={"uri": URI, "numLayers": 8,
                                                           "credentialsSecret": "hf-token"}))
    kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    fetching = kit.wait_for(lambda: kit.condition(_icd(api, kit), "ModelReady").get("reason") == "Fetching"
                            and kit.condition(_icd(api, kit), "ModelReady"), what="ModelReady Unknown")
    assert fetching["status"] == "Unknown"

    # A replica's init container fails on the token and the kubelet retries it (CrashLoopBackOff); KubeRay
    # meanwhile reports the serve app healthy (e.g. the other replica runs): still not Ready.
    kit.replica_pod(api, NAME, "chat-gpu-a")
    kit.fetch_ends(api, "chat-gpu-a", 2, AUTH_ERROR, retrying=True)
    kit.kuberay_reports_healthy(api, NAME, ready=2)
    body = kit.wait_for(lambda: kit.condition(b := _icd(api, kit), "ModelReady").get("status") == "False" and b,
                        what="ModelReady=False")
    model_ready = kit.condition(body, "ModelReady")
    assert model_ready["reason"] == "Auth"
    assert "replica pod chat-gpu-a" in model_ready["message"] and "HF_TOKEN" in model_ready["message"]
    assert "(retrying)" in model_ready["message"]
    operator.wait_idle()
    body = _icd(api, kit)
    assert kit.condition(body, "Ready")["status"] == "False"
    assert kit.condition(body, "Ready")["reason"] == "ModelFetchFailed"
    assert body["status"]["phase"] == "Degraded" and "model" not in body["status"]
    (event,) = _events(api, "ModelFetchFailed")   # one event for the failure, however often it reconciles
    assert event["type"] == "Warning" and event["message"].startswith("Auth: replica pod chat-gpu-a")

    # The user fixes the Secret; the retry succeeds: revision and path in status, Ready.
    result = {"uri": URI, "path": PATH, "revision": COMMIT, "name": "glm5", "downloaded_bytes": 1234567}
    kit.fetch_ends(api, "chat-gpu-a", 0, json.dumps(result))
    body = kit.wait_for(lambda: kit.condition(b := _icd(api, kit), "Ready").get("status") == "True" and b,
                        what="Ready after the fetch succeeded")
    model = body["status"]["model"]
    assert {key: model[key] for key in ("uri", "revision", "path", "downloadedBytes", "pod")} == \
        {"uri": URI, "revision": COMMIT, "path": PATH, "downloadedBytes": 1234567, "pod": "chat-gpu-a"}
    assert kit.condition(body, "ModelReady")["status"] == "True"
    assert kit.condition(body, "ModelReady")["reason"] == "Fetched"
    assert kit.condition(body, "Degraded")["status"] == "False" and body["status"]["phase"] == "Ready"
    kit.wait_for(lambda: any(COMMIT in e["message"] and PATH in e["message"] for e in _events(api, "ModelFetched")),
                 what="ModelFetched event")

    # A second replica reuses the cache (0 bytes): still the same revision, no second ModelFetched event.
    kit.replica_pod(api, NAME, "chat-gpu-b")
    kit.fetch_ends(api, "chat-gpu-b", 0, json.dumps({**result, "downloaded_bytes": 0}))
    kit.wait_for(lambda: _icd(api, kit)["status"]["model"]["pod"] == "chat-gpu-b", what="newest fetch in status")
    operator.wait_idle()
    assert _icd(api, kit)["status"]["model"]["downloadedBytes"] == 0 and len(_events(api, "ModelFetched")) == 1

    # A new URI: what the old pods fetched says nothing about it.
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"model": {"uri": "s3://models/glm5"}}})
    body = kit.wait_for(lambda: kit.condition(b := _icd(api, kit), "ModelReady").get("reason") == "Fetching" and b,
                        what="the new URI not fetched yet")
    assert "model" not in body["status"]


def test_a_cache_volume_with_a_size_is_a_claim_the_operator_owns(api, operator, kit):
    k = kit.k
    created = api.kube.create(kit.ICDS, kit.NS, kit.icd(NAME, model={
        "uri": URI, "numLayers": 8, "cacheVolume": {"size": "200Gi", "storageClassName": "fast-rwx"}}))
    claim = kit.wait_for(lambda: api.get(k.PVCS, f"{NAME}-model-cache"), what="model cache claim")
    assert claim["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "fast-rwx"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    rs = kit.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": f"{NAME}-model-cache"}} in pod["volumes"]

    # Moving to a claim of the user's own: the operator's claim goes, the user's is mounted.
    api.kube.patch(kit.ICDS, kit.NS, NAME, {"spec": {"model": {"cacheVolume": {
        "size": None, "storageClassName": None, "claimName": "shared-models"}}}})
    kit.wait_for(lambda: api.get(k.PVCS, f"{NAME}-model-cache") is None, what="the operator's claim deleted")
    rs = kit.wait_for(lambda: (r := api.get(k.RAYSERVICES, NAME)) and {"name": "model-cache", "persistentVolumeClaim": {
        "claimName": "shared-models"}} in r["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "volumes"] and r, what="the user's claim mounted")
    assert api.names(k.PVCS) == {f"{NAME}-samples"}
