"""High availability through kopf peering: several operator replicas, one active, the others paused.

kopf peering: every replica keeps a record (priority, lastseen, lifetime) in the status of one peering
object (ClusterKopfPeering when watching all namespaces, KopfPeering per namespace otherwise); a replica
that sees a live record with a higher priority pauses all its watches. Each replica takes a random
priority at startup (equal priorities would pause them all), so exactly one works; when it stops, its
record goes (or expires after `lifetime` seconds if it died) and the next-highest takes over.

kopf pauses its watches, not tasks of ours: the periodic resync asks `Peering.active()` before each pass.
"""
from __future__ import annotations

import datetime
import logging
import random
from dataclasses import dataclass

from indexcache_operator import kube as k

log = logging.getLogger(__name__)

CLUSTER_PEERINGS = k.Resource("kopf.dev", "v1", "clusterkopfpeerings")
NAMESPACED_PEERINGS = k.Resource("kopf.dev", "v1", "kopfpeerings")


def random_priority() -> int:
    """A priority no other replica will draw (kopf pauses every replica that shares the top priority)."""
    return random.SystemRandom().randint(1, 2**31 - 1)


@dataclass
class Peering:
    name: str
    priority: int
    clusterwide: bool
    namespaces: tuple[str, ...] = ()

    def _objects(self) -> list[tuple[k.Resource, str | None]]:
        if self.clusterwide:
            return [(CLUSTER_PEERINGS, None)]
        return [(NAMESPACED_PEERINGS, ns) for ns in self.namespaces]

    def ensure_objects(self, kube: k.Kube) -> None:
        """kopf needs the peering object to exist (with mandatory peering it waits for it forever)."""
        for res, ns in self._objects():
            if kube.get(res, ns, self.name) is None:
                meta = {"name": self.name, **({"namespace": ns} if ns else {})}
                try:
                    kube.create(res, ns, {"apiVersion": "kopf.dev/v1", "kind": _KIND[res.plural], "metadata": meta})
                    log.info("created %s %s", _KIND[res.plural], self.name)
                except k.KubeError as e:
                    if e.status != 409:  # another replica created it first
                        raise

    def active(self, kube: k.Kube, now: datetime.datetime | None = None) -> bool:
        """True unless a live peer with a higher priority exists (kopf's own rule for pausing)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        for res, ns in self._objects():
            obj = kube.get(res, ns, self.name) or {}
            for record in (obj.get("status") or {}).values():
                if not isinstance(record, dict) or int(record.get("priority", 0)) <= self.priority:
                    continue
                try:
                    seen = datetime.datetime.fromisoformat(str(record["lastseen"]))
                except (KeyError, ValueError):
                    continue
                if seen.tzinfo is None:
                    seen = seen.replace(tzinfo=datetime.timezone.utc)
                if seen + datetime.timedelta(seconds=int(record.get("lifetime", 60))) > now:
                    return False
        return True


_KIND = {"clusterkopfpeerings": "ClusterKopfPeering", "kopfpeerings": "KopfPeering"}
