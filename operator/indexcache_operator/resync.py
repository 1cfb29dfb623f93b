"""The periodic resync: a supervised loop that reconciles every IndexCacheDeployment kopf has shown us.

It catches what a watch missed (a child event whose reconcile failed, KubeRay status without an event).
Supervised: whatever goes wrong in a pass (an unreachable API server, a 404 on a status PATCH, a bug) is
logged, counted in `indexcache_operator_errors_total{source="resync"}` and retried with exponential
backoff; it never ends the loop. `ResyncHealth` turns "no successful pass for a while" (or a dead task)
into an unhealthy /healthz, so that Kubernetes restarts an operator that cannot work.

Scope: only the resources kopf delivered to the handlers (`KnownDeployments`), so it honours whatever
namespaces kopf watches (`-n`, `-A`) and needs no list permission of its own.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from indexcache_operator.context import Context, ReconcileError, count_error

log = logging.getLogger(__name__)


class KnownDeployments:
    """(namespace, name) of every IndexCacheDeployment kopf's watch delivered and did not delete."""

    def __init__(self) -> None:
        self._items: set[tuple[str, str]] = set()
        self._guard = threading.Lock()

    def add(self, namespace: str, name: str) -> None:
        with self._guard:
            self._items.add((namespace, name))

    def discard(self, namespace: str, name: str) -> None:
        with self._guard:
            self._items.discard((namespace, name))

    def snapshot(self) -> list[tuple[str, str]]:
        with self._guard:
            return sorted(self._items)


class ResyncHealth:
    """Unhealthy when the resync task has died, or when no pass succeeded for `grace_s` seconds."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s, self.clock = grace_s, clock
        self.started = clock()
        self.last_success: float | None = None
        self.failures = 0
        self.task: asyncio.Task | None = None

    def succeeded(self) -> None:
        self.last_success, self.failures = self.clock(), 0

    def failed(self) -> None:
        self.failures += 1

    def problem(self) -> str | None:
        if self.task is not None and self.task.done():
            err = None if self.task.cancelled() else self.task.exception()
            return f"the resync task has stopped ({err!r})"
        since = self.last_success if self.last_success is not None else self.started
        age = self.clock() - since
        if age > self.grace_s:
            return (f"no successful resync for {age:.0f}s (more than {self.grace_s:.0f}s; "
                    f"{self.failures} failed passes in a row)")
        return None


def resync_pass(ctx: Context, known: KnownDeployments, reconcile: Callable[[Context, str, str], dict | None]) -> bool:
    """Reconcile every known resource once. False if the API server failed us (unreachable, 5xx) or
    something unexpected happened: the pass is then retried sooner, and counts against /healthz.
    A 4xx on one resource is that resource's problem: counted and logged, the pass goes on."""
    ok = True
    for ns, name in known.snapshot():
        try:
            if reconcile(ctx, ns, name) is None:
                known.discard(ns, name)  # deleted while a watch was down: nothing left to resync
        except ReconcileError as e:
            reason = count_error(ctx, "resync", e)
            log.warning("resync of %s/%s failed (%s): %s", ns, name, reason, e)
            if e.status is None or e.status == 0 or e.status >= 500:
                ok = False
        except Exception as e:  # a bug must not end the loop; say so loudly and keep going
            count_error(ctx, "resync", e)
            log.exception("resync of %s/%s failed unexpectedly", ns, name)
            ok = False
    return ok


def backoff_seconds(failures: int, interval: float) -> float:
    """The wait before the next pass: the interval after a good pass; after failures 1, 2, 4, ... s,
    at most the interval."""
    return interval if failures == 0 else min(interval, 2.0 ** (failures - 1))


async def run(ctx: Context, known: KnownDeployments, health: ResyncHealth,
              reconcile: Callable[[Context, str, str], dict | None],
              active: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Forever: wait, then one pass (in a thread: the client blocks). `active` returns False while this
    operator is a paused standby (HA): it then does nothing and stays healthy."""
    failures = 0
    while True:
        await asyncio.sleep(backoff_seconds(failures, ctx.config.resync_seconds))
        try:
            if active is not None and not await active():
                ok = True
            else:
                ok = await asyncio.to_thread(resync_pass, ctx, known, reconcile)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            count_error(ctx, "resync", e)
            log.exception("resync pass failed")
            ok = False
        if ok:
            failures = 0
            health.succeeded()
        else:
            failures += 1
            health.failed()
            log.warning("resync pass failed (%d in a row); next in %.0fs", failures,
                        backoff_seconds(failures, ctx.config.resync_seconds))
