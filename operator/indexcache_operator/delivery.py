"""Model delivery as the operator sees it: what the `fetch-model` init containers reported.

Every replica pod and recalibration Job pod starts with `indexcache fetch <uri> --cache /model-cache`
(builders.fetch_model_container), whose termination message is its result: the JSON it printed
(`{"uri", "path", "revision", "name", "downloaded_bytes"}`) or `error (<Reason>): <message>` with a
storage.FetchError reason (Auth, NotFound, DiskFull, Checksum, Network, Invalid, Unsupported, NotCached).
Should it crash before writing one, the kubelet keeps its last log lines instead (FallbackToLogsOnError).
Pure functions: reconcile.py lists the pods and writes what `model_report` says into status.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from indexcache_operator import COMPONENT_LABEL
from indexcache_operator.builders import FETCH_CONTAINER
from indexcache_operator.models import ModelStatus

# `indexcache fetch: error (Auth): ...` (the log's last line) or `error (Auth): ...` (the termination message)
_ERROR_LINE = re.compile(r"error \(([A-Za-z][A-Za-z0-9]{0,63})\): (.*)")


@dataclass(frozen=True)
class FetchOutcome:
    """How one pod's latest fetch ended."""
    pod: str
    uri: str | None         # the URI its init container was given
    serving: bool           # a replica pod (else a recalibration Job's)
    ok: bool
    retrying: bool          # failed, and the kubelet runs it again (a replica pod's restartPolicy)
    finished_at: str        # RFC 3339, as the kubelet wrote it
    reason: str             # a FetchError reason, or the kubelet's (OOMKilled, ...), or Fetched
    message: str
    result: dict            # indexcache fetch's JSON on success (may be empty for an older image)


def _fetch_uri(pod: dict) -> str | None:
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") == FETCH_CONTAINER:
            args = container.get("args") or []
            return args[1] if len(args) > 1 and args[0] == "fetch" else None
    return None


def _failure(terminated: dict) -> tuple[str, str]:
    """(reason, message) of a failed fetch from its termination record."""
    text = (terminated.get("message") or "").strip()
    for line in reversed(text.splitlines()):
        if m := _ERROR_LINE.search(line):
            # the message runs to the end of the text (a FetchError message may span lines)
            return m.group(1), text[text.index(line) + m.start(2):].strip()
    kubelet = terminated.get("reason") or ""
    last = text.splitlines()[-1].strip() if text else ""
    reason = kubelet if kubelet and kubelet != "Error" else "FetchFailed"
    return reason, last or f"exit code {terminated.get('exitCode')} ({kubelet or 'no message'})"


def fetch_outcome(pod: dict) -> FetchOutcome | None:
    """None while the pod's fetch has not ended yet (or it has no fetch-model init container)."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    status = next((s for s in (pod.get("status") or {}).get("initContainerStatuses") or []
                   if s.get("name") == FETCH_CONTAINER), None)
    if status is None:
        return None
    terminated = (status.get("state") or {}).get("terminated")
    retrying = False
    if terminated is None:   # running or waiting again: the previous attempt is the news, if it failed
        terminated = (status.get("lastState") or {}).get("terminated")
        if terminated is None or terminated.get("exitCode") == 0:
            return None
        retrying = True
    serving = (meta.get("labels") or {}).get(COMPONENT_LABEL) == "serving"
    base = dict(pod=meta.get("name", "?"), uri=_fetch_uri(pod), serving=serving,
                finished_at=terminated.get("finishedAt") or "")
    if terminated.get("exitCode") == 0:
        try:
            result = json.loads(terminated.get("message") or "")
        except ValueError:
            result = None
        return FetchOutcome(**base, ok=True, retrying=False, reason="Fetched", message="",
                            result=result if isinstance(result, dict) else {})
    reason, message = _failure(terminated)
    return FetchOutcome(**base, ok=False, retrying=retrying, reason=reason, message=message, result={})


@dataclass(frozen=True)
class ModelReport:
    """status.model and the ModelReady condition; `serving_failed`: a replica pod cannot get the model (the
    deployment is not Ready)."""
    ready: bool | None
    reason: str
    message: str
    model: ModelStatus | None
    serving_failed: bool


def _model_status(outcome: FetchOutcome, uri: str) -> ModelStatus:
    r = outcome.result
    downloaded = r.get("downloaded_bytes")
    return ModelStatus(uri=uri, revision=r.get("revision") or None, path=r.get("path") or None,
                       downloaded_bytes=downloaded if isinstance(downloaded, int) and downloaded >= 0 else 0,
                       pod=outcome.pod, fetched_at=outcome.finished_at or None)


def model_report(uri: str, outcomes: list[FetchOutcome | None], previous: ModelStatus | None) -> ModelReport | None:
    """What the pods of the current spec.model.uri say; None when none has finished a fetch and status
    already describes this URI (pods gone, or fetching again): leave status as it is.

    A failure counts when it is a replica pod's latest attempt (each replica must load the model; it is
    retried, and clears when that pod's fetch succeeds), or a Job pod's newer than every success (a Job pod
    is not retried; once a later fetch succeeds, the failure is history, told by the Calibrated condition)."""
    mine = [o for o in outcomes if o is not None and o.uri == uri]
    successes = sorted((o for o in mine if o.ok), key=lambda o: o.finished_at)
    newest_ok = successes[-1] if successes else None
    failures = sorted((o for o in mine if not o.ok and (o.serving or newest_ok is None
                                                         or o.finished_at > newest_ok.finished_at)),
                      key=lambda o: o.finished_at)
    if newest_ok is not None:
        model = _model_status(newest_ok, uri)
    else:
        model = previous if previous is not None and previous.uri == uri else None
    if failures:
        worst = failures[-1]
        where = f"{'replica' if worst.serving else 'recalibration Job'} pod {worst.pod}"
        more = f"; {len(failures) - 1} more pods fail" if len(failures) > 1 else ""
        again = " (retrying)" if worst.retrying else ""
        return ModelReport(False, worst.reason, f"{where}: {worst.message}{again}{more}", model,
                           serving_failed=any(f.serving for f in failures))
    if newest_ok is not None:
        where = f" at {model.path}" if model.path else ""
        rev = f" (revision {model.revision})" if model.revision else ""
        return ModelReport(True, "Fetched", f"{uri} is in the model cache{where}{rev}", model, False)
    if model is not None:
        return None
    return ModelReport(None, "Fetching", f"no replica or Job pod has fetched {uri} yet", None, False)
