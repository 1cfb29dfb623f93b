"""The Ray Serve app: an OpenAI-compatible API over the continuous batching engine.

Roles as in `ray.serve.llm`: the engine (`indexcache.engine`), the server deployment that owns it
(server.py, one per replica), and the ingress deployment with the HTTP routes (ingress.py); what passes
between them is in protocol.py. Here: `build_app(args)`, the application builder the operator and
`indexcache serve` use (`indexcache.serving.app:build_app`), and `start_local`, the embedded default
(local Ray on loopback).
"""

import logging
import os
import time
from pathlib import Path
from typing import Any

from indexcache_contracts.serve_app import (INGRESS_DEPLOYMENT, INGRESS_HEADROOM, SERVER_DEPLOYMENT, parse_app_args,
                                            server_resources)
from ray import serve

from .ingress import OpenAIIngress
from .server import IndexCacheServer


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def build_app(args: dict[str, Any]) -> serve.Application:
    """`indexcache.serving.app:build_app`: the ingress bound to the server deployment."""
    a = parse_app_args(args)   # the schema the operator writes to (indexcache_contracts.serve_app)
    user_config: dict = {"sample_rate": a.sample_rate, "gpu_hourly_usd": a.gpu_hourly_usd}
    if a.pattern:
        user_config.update(pattern=a.pattern, pattern_version=0)
    server_args = dict(model=a.model, served_model_name=a.served_model_name, deployment=a.deployment,
                       max_batch_size=a.max_batch_size, max_model_len=a.max_model_len, chunk_size=a.chunk_size,
                       long_prefill_token_threshold=a.long_prefill_token_threshold,
                       samples_dir=a.samples_dir, sample_rate=a.sample_rate, gpu_hourly_usd=a.gpu_hourly_usd,
                       metrics_port=a.metrics_port, dtype=a.dtype, model_cache=a.model_cache,
                       enforce_eager=a.enforce_eager, kv_cache_tokens=a.kv_cache_tokens,
                       gpu_memory_utilization=a.gpu_memory_utilization, block_size=a.block_size,
                       prefix_caching=a.prefix_caching, tensor_parallel_size=a.tensor_parallel_size,
                       threads=a.threads, quantization=a.quantization)
    app_limit = a.ingress_max_ongoing_requests or a.max_ongoing_requests * a.num_replicas
    if a.ingress_in_server:   # one deployment: the routes and the server in one replica (local_server.py)
        ingress = serve.deployment(OpenAIIngress, name=INGRESS_DEPLOYMENT).options(
            max_ongoing_requests=app_limit + INGRESS_HEADROOM, health_check_period_s=10,
            user_config={"max_ongoing_requests": app_limit, "server": user_config},
            **server_resources(a.tensor_parallel_size, a.num_gpus, a.num_cpus))
        return ingress.bind(None, max_ongoing_requests=app_limit, api_key=a.api_key, num_replicas=1,
                            server_args=server_args)
    server = serve.deployment(IndexCacheServer, name=SERVER_DEPLOYMENT).options(
        num_replicas=a.num_replicas, user_config=user_config,
        # headroom over the ingress limit for /metrics and /healthz calls while saturated
        max_ongoing_requests=a.max_ongoing_requests + 8, health_check_period_s=10,
        **server_resources(a.tensor_parallel_size, a.num_gpus, a.num_cpus))
    # One ingress replica counts every request in flight, whichever server replica runs it; its limit
    # is the app's: the per-replica limit times the replicas (user_config, so it changes in place).
    ingress = serve.deployment(OpenAIIngress, name=INGRESS_DEPLOYMENT).options(
        max_ongoing_requests=app_limit + INGRESS_HEADROOM, user_config={"max_ongoing_requests": app_limit},
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(server.bind(**server_args), max_ongoing_requests=app_limit, api_key=a.api_key,
                        num_replicas=a.num_replicas)


# Ray Serve's throughput mode (Ray's "Enable High Throughput on Ray Serve" guide: gRPC between the ingress and
# the server replicas, user code on each replica's own event loop, buffered access logs), less two of its parts:
# direct ingress, which replaces Serve's HTTP proxy with per-replica ports meant to sit behind HAProxy (the local
# app keeps one port), and silenced replica logs (the console keeps the replicas' warnings). Measured while every
# streamed token crossed two replicas (before ingress_in_server): on 2 cores, 8 streams went from 135-146 to
# 164-182 tok/s (bench/RESULTS.md).
LOCAL_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                   "RAY_SERVE_LOG_TO_STDERR": "1"}


def local_serve_env() -> dict[str, str]:
    """LOCAL_SERVE_ENV under whatever the user set: put into os.environ before the local Ray starts (its
    processes inherit it) and returned for the runtime env."""
    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in LOCAL_SERVE_ENV}


def start_local(app_args: dict, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
                name: str = "indexcache") -> str:
    """The embedded default: Ray on loopback, Serve's HTTP proxy on host:port, the app at "/".
    Returns the base URL. Workers import this very checkout of `indexcache` (PYTHONPATH), not another
    installed copy."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # else Ray binds the external interface
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15 (worker_niceness); here the replica is the work, at normal priority
    os.environ.setdefault("RAY_worker_niceness", "0")
    num_cpus = num_cpus or usable_cpus()
    # Ray turns token authentication on for a new local cluster and announces it with a WARNING on every
    # start, which reads like a problem. Auth stays on; only the announcement is dropped. (Setting
    # RAY_AUTH_MODE=token instead is read only before Ray is imported, which the CLI already did.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    package_root = str(Path(__file__).resolve().parents[2])   # the folder holding the `indexcache` package
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    # OpenMP threads that sleep at barriers instead of spinning: on a machine whose cores are shared (a
    # laptop, a development box), a spinning thread that loses its core stalls every op of the forward.
    # Measured on 2 shared cores at load ~7: a bf16 decode step took 1050 ms spinning, 91 ms passive.
    env_vars = {"PYTHONPATH": pythonpath, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                **local_serve_env()}
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env_vars}, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_args), name=name, route_prefix="/")
    url = f"http://{host}:{port}"
    if app_args.get("ingress_in_server"):   # serve.run returned with the routes up; the model loads behind them
        wait_until_ready(url, name)
    return url


def wait_until_ready(url: str, name: str, poll_s: float = 0.5) -> None:
    """Until GET /readyz answers 200 (the model is loaded and the engine runs); RuntimeError if the app stops
    deploying (a model that failed to load fails the replica's health checks)."""
    import urllib.error
    import urllib.request

    from ray import serve

    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        app = serve.status().applications.get(name)
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = "; ".join(f"{d}: {s.message}" for d, s in app.deployments.items() if s.message)
            raise RuntimeError(f"the app failed to start ({app.status}): {details or app.message}")
        time.sleep(poll_s)

