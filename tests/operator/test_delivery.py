"""What the operator reads from the fetch-model init containers (indexcache_operator.delivery): each pod's
latest fetch, and which of them decide status.model and ModelReady. Pure functions over pod objects shaped
as the kubelet writes them."""
import json

import pytest

from indexcache_operator.delivery import fetch_outcome, model_report
from indexcache_operator.models import ModelStatus

URI = "s3://models/glm5"
OK = {"uri": URI, "path": "/model-cache/abc", "revision": "s3-0123456789abcdef01234567", "name": "glm5",
      "downloaded_bytes": 4096}


def pod(name, exit_code=None, message="", when="2026-12-01T10:00:00Z", role="serving", uri=URI, retrying=False,
        kubelet_reason=None, running=False):
    """A pod as the kubelet reports it: exit_code None means the fetch has not ended (running or waiting)."""
    status = {"name": "fetch-model", "state": {"running": {"startedAt": when}} if running else
              {"waiting": {"reason": "PodInitializing"}}}
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "message": message, "finishedAt": when,
                      "reason": kubelet_reason or ("Completed" if exit_code == 0 else "Error")}
        if retrying:
            status.update(state={"waiting": {"reason": "CrashLoopBackOff"}}, lastState={"terminated": terminated})
        else:
            status["state"] = {"terminated": terminated}
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": role}},
            "spec": {"initContainers": [{"name": "fetch-model", "args": ["fetch", uri, "--cache", "/model-cache"]}],
                     "containers": [{"name": "main"}]},
            "status": {"initContainerStatuses": [status]}}


def test_a_success_carries_the_json_result():
    out = fetch_outcome(pod("a", 0, json.dumps(OK)))
    assert (out.ok, out.reason, out.uri, out.serving, out.result) == (True, "Fetched", URI, True, OK)


@pytest.mark.parametrize("message,kubelet,reason,text", [
    # what `indexcache fetch` writes as its termination message
    ("error (DiskFull): s3://models/glm5 needs 12.0 GB more", None, "DiskFull", "s3://models/glm5 needs 12.0 GB more"),
    # no message written (a crash): the kubelet kept the log's tail, whose last line is the CLI's error
    ("Traceback (most recent call last):\n  ...\nindexcache fetch: error (NotFound): s3://models/glm5: NoSuchBucket\n",
     None, "NotFound", "s3://models/glm5: NoSuchBucket"),
    # killed for memory before it could say anything
    ("", "OOMKilled", "OOMKilled", "exit code 137 (OOMKilled)"),
    ("Segmentation fault", None, "FetchFailed", "Segmentation fault"),
])
def test_a_failure_carries_its_reason(message, kubelet, reason, text):
    out = fetch_outcome(pod("a", 137 if kubelet else 2, message, kubelet_reason=kubelet, role="recalibration"))
    assert (out.ok, out.serving, out.reason, out.message) == (False, False, reason, text)


def test_a_fetch_that_has_not_ended_says_nothing_and_a_retried_failure_still_counts():
    assert fetch_outcome(pod("a")) is None
    assert fetch_outcome(pod("a", running=True)) is None
    assert fetch_outcome({"metadata": {"name": "head"}, "spec": {}, "status": {}}) is None   # the head: no fetch
    out = fetch_outcome(pod("a", 2, "error (Auth): denied", retrying=True))
    assert (out.ok, out.retrying, out.reason) == (False, True, "Auth")


def _report(*pods, previous=None):
    return model_report(URI, [fetch_outcome(p) for p in pods], previous)


def test_the_newest_success_is_the_status():
    report = _report(pod("a", 0, json.dumps(OK), "2026-12-01T10:00:00Z"),
                     pod("b", 0, json.dumps({**OK, "downloaded_bytes": 0}), "2026-12-01T10:05:00Z"))
    assert (report.ready, report.reason, report.serving_failed) == (True, "Fetched", False)
    assert report.model == ModelStatus(uri=URI, revision=OK["revision"], path=OK["path"], downloaded_bytes=0,
                                       pod="b", fetched_at="2026-12-01T10:05:00Z")


def test_a_replica_that_cannot_fetch_keeps_the_model_from_ready_whatever_the_others_did():
    report = _report(pod("a", 2, "error (DiskFull): no space", "2026-12-01T10:00:00Z", retrying=True),
                     pod("b", 0, json.dumps(OK), "2026-12-01T10:05:00Z"))
    assert (report.ready, report.reason, report.serving_failed) == (False, "DiskFull", True)
    assert report.message == "replica pod a: no space (retrying)"
    assert report.model.revision == OK["revision"]   # what the pods that have it run


def test_a_job_failure_counts_until_a_later_fetch_succeeds_and_never_blocks_ready():
    job_failed = pod("job-x", 2, "error (Network): reset", "2026-12-01T10:05:00Z", role="recalibration")
    newer = _report(pod("a", 0, json.dumps(OK), "2026-12-01T10:00:00Z"), job_failed)
    assert (newer.ready, newer.reason, newer.serving_failed) == (False, "Network", False)
    assert newer.message.startswith("recalibration Job pod job-x")
    older = _report(pod("a", 0, json.dumps(OK), "2026-12-01T10:10:00Z"), job_failed)
    assert (older.ready, older.reason) == (True, "Fetched")


def test_pods_of_another_uri_and_quiet_pods_leave_status_alone():
    previous = ModelStatus(uri=URI, revision="s3-old", path="/model-cache/old")
    other = pod("old", 2, "error (Auth): denied", uri="s3://models/previous")
    assert _report(other, pod("fetching", running=True), previous=previous) is None
    fresh = _report(other)
    assert (fresh.ready, fresh.reason, fresh.model) == (None, "Fetching", None)
    moved = model_report("hf://acme/glm5", [fetch_outcome(pod("a", 0, json.dumps(OK)))], previous)
    assert (moved.ready, moved.model) == (None, None)
