"""What every reconcile step shares: the API client, configuration, metrics, the event sink and the
per-resource locks; and the error a caller retries on."""
from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from indexcache_operator import kube as k
from indexcache_operator.config import OperatorConfig
from indexcache_operator.metrics import OperatorMetrics

# Post a Kubernetes Event on the IndexCacheDeployment: (body, type, reason, message).
EventSink = Callable[[dict, str, str, str], None]


@dataclass
class Context:
    kube: k.Kube
    config: OperatorConfig
    metrics: OperatorMetrics
    events: EventSink
    _locks: dict = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    # In an attempt(): events and metric updates wait here until commit().
    pending: list[Callable[[], None]] | None = None

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def attempt(self) -> "Context":
        """A view for one reconcile attempt: its events and deferred metric updates wait until commit(). An
        attempt whose status write lost a race (409) is dropped and redone on fresh data: it must not have
        posted or counted anything."""
        pending: list[Callable[[], None]] = []
        return replace(self, pending=pending,
                       events=lambda *args: pending.append(lambda: self.events(*args)))

    def defer(self, update: Callable[[], None]) -> None:
        """Run `update` (a metric change) at commit(), or now outside an attempt."""
        if self.pending is None:
            update()
        else:
            self.pending.append(update)

    def commit(self) -> None:
        for update in self.pending or ():
            update()
        if self.pending is not None:
            self.pending.clear()


class ReconcileError(Exception):
    """A transient failure (API error); the caller retries later. `status` is the HTTP status of the
    API error behind it (0: the API server could not be reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StatusConflict(Exception):
    """The resource changed between our read and our status write (409 on the resourceVersion
    precondition): redo the reconcile on what is there now."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_reason(err: BaseException) -> str:
    """A bounded label value for an error (metrics.ERROR_REASONS): ApiUnreachable, Api403, Api404,
    Api409, Api5xx, Unexpected (anything else, other 4xx included)."""
    status = err.status if isinstance(err, (k.KubeError, ReconcileError)) else None
    if status == 0:
        return "ApiUnreachable"
    if status is not None and status >= 500:
        return "Api5xx"
    if status in (403, 404, 409):
        return f"Api{status}"
    return "Unexpected"


def count_error(ctx: Context, source: str, err: BaseException) -> str:
    reason = error_reason(err)
    ctx.metrics.operator_errors.labels(source, reason).inc()
    return reason
