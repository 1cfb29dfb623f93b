"""Operator configuration, read from environment variables once at startup (never at import)."""
from __future__ import annotations

import os
from dataclasses import dataclass


class ConfigError(ValueError):
    pass


def _int(env: dict, name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer: set it to a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class OperatorConfig:
    serving_image: str = "ghcr.io/indexcache/serving:0.1.0"
    ray_version: str = "2.60.0"
    metrics_port: int = 9090  # /metrics and /healthz; 0 = do not serve
    resync_seconds: int = 60  # periodic reconcile, catches anything a watch missed
    # /healthz fails when no resync pass succeeded for this long (0: 3 resync intervals + 30 s).
    health_grace_seconds: int = 0
    peering_lifetime_seconds: int = 60  # HA: a replica that stops renewing its peering record is gone after this
    job_backoff_limit: int = 1
    job_ttl_seconds: int = 7 * 86400  # finished recalibration Jobs are kept a week for inspection
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    namespaces: tuple[str, ...] = ()  # watched namespaces (empty: all); where namespaced peering objects live

    @property
    def health_grace(self) -> int:
        return self.health_grace_seconds or 3 * self.resync_seconds + 30

    @classmethod
    def from_env(cls, env: dict | None = None) -> "OperatorConfig":
        env = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            serving_image=env.get("INDEXCACHE_SERVING_IMAGE") or d.serving_image,
            ray_version=env.get("INDEXCACHE_RAY_VERSION") or d.ray_version,
            metrics_port=_int(env, "INDEXCACHE_OPERATOR_METRICS_PORT", d.metrics_port),
            resync_seconds=_int(env, "INDEXCACHE_OPERATOR_RESYNC_SECONDS", d.resync_seconds, minimum=1),
            health_grace_seconds=_int(env, "INDEXCACHE_OPERATOR_HEALTH_GRACE_SECONDS", d.health_grace_seconds),
            peering_lifetime_seconds=_int(env, "INDEXCACHE_OPERATOR_PEERING_LIFETIME", d.peering_lifetime_seconds,
                                          minimum=1),
            job_backoff_limit=_int(env, "INDEXCACHE_JOB_BACKOFF_LIMIT", d.job_backoff_limit),
            job_ttl_seconds=_int(env, "INDEXCACHE_JOB_TTL_SECONDS", d.job_ttl_seconds),
            head_cpu=env.get("INDEXCACHE_HEAD_CPU") or d.head_cpu,
            head_memory=env.get("INDEXCACHE_HEAD_MEMORY") or d.head_memory,
            worker_cpu=env.get("INDEXCACHE_WORKER_CPU") or d.worker_cpu,
            worker_memory=env.get("INDEXCACHE_WORKER_MEMORY") or d.worker_memory,
            namespaces=tuple(n for n in env.get("INDEXCACHE_OPERATOR_NAMESPACES", "").split(",") if n),
        )
