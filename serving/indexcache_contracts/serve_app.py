"""The serve app as the operator deploys it (docs/contracts.md, "Serving app").

A RayService's serve config names the import path of the application builder, the builder's args
(structural: a change redeploys) and each deployment's `user_config` (runtime knobs, applied by
`reconfigure()` without a restart). The operator writes them; the serving app parses them with the
functions below, so both sides read one schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .pattern import pattern_problem

SERVE_IMPORT_PATH = "indexcache.serving.app:build_app"
# RayServices deployed before the package was laid out by role carry this one; it still resolves.
LEGACY_SERVE_IMPORT_PATH = "indexcache.serve_app:build_app"
SERVER_DEPLOYMENT = "IndexCacheServer"
INGRESS_DEPLOYMENT = "OpenAIIngress"

# Ray Serve's own cap on the ingress replica sits this far above the app-wide limit, so that the ingress
# answers 429 itself (at Serve's cap, Ray would queue instead).
INGRESS_HEADROOM = 64


# ---------------------------------------------------------------------------------------------------
# builder args
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppArgs:
    """Structural settings (a change redeploys); runtime knobs go in IndexCacheServer's user_config."""
    model: str = "smollm2"                 # checkpoint dir, model URI, "smollm2" (bundled) or "tiny" (random demo)
    model_cache: str | None = None         # where `indexcache fetch` put remote models (the operator's cache volume)
    served_model_name: str | None = None
    deployment: str = "local"              # the IndexCacheDeployment name (metric label)
    max_ongoing_requests: int = 32         # per server replica (Ray Serve's cap on each)
    # the app-wide limit (429 beyond it); default max_ongoing_requests x num_replicas
    ingress_max_ongoing_requests: int | None = None
    max_batch_size: int = 8                # KV cache slots: requests decoded together
    max_model_len: int | None = 2048
    chunk_size: int | None = None          # prefill tokens per engine step (default: 256 on a GPU, 1024 on a CPU)
    # prompts with more tokens than this left to prefill yield each step's budget to shorter ones (vLLM's
    # --long-prefill-token-threshold); None: 4 x chunk_size; 0: first come, first served
    long_prefill_token_threshold: int | None = None
    samples_dir: str | None = None
    sample_rate: float = 0.0
    gpu_hourly_usd: float = 0.0
    metrics_port: int | None = None
    api_key: str | None = None
    pattern: str | None = None             # initial user_config pattern (default: the checkpoint's)
    num_replicas: int = 1
    num_gpus: float = 0
    num_cpus: float = 1
    # GPUs (ranks) of one replica: > 1 shards the model over that many worker actors in a placement group
    # of one node (tensor + expert parallel; the operator sets it from gpusPerReplica)
    tensor_parallel_size: int = 1
    dtype: str = "auto"                    # auto: bf16 on CUDA; on a CPU the faster of bf16/fp32 (measured once)
    threads: int | None = None             # torch CPU threads of the replica (default: every core it may use)
    quantization: str = "none"             # "int8": weight-only int8 on a CPU replica (the CPU fast forward)
    enforce_eager: bool = False            # decode without CUDA graphs (debugging), like vLLM's --enforce-eager
    # paged KV cache (off: the contiguous max_batch_size x max_model_len slot cache): a token budget, or the
    # share of the GPU's memory the replica may fill (vLLM's --gpu-memory-utilization); blocks of block_size
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    block_size: int = 64
    prefix_caching: bool = True            # reuse cached prefix blocks (paged cache only)
    # one deployment: the server in the ingress's process (`indexcache serve`: one replica on one machine, one
    # process less per streamed token); its user_config then goes in the ingress's, under "server"
    ingress_in_server: bool = False


# field -> (kind, minimum, maximum); kind "int" refuses floats and booleans, "number" takes ints too
_APP_ARG_TYPES: dict[str, tuple[str, float | None, float | None]] = {
    "model": ("str", None, None), "model_cache": ("str", None, None), "served_model_name": ("str", None, None), "deployment": ("str", None, None),
    "max_ongoing_requests": ("int", 1, None), "ingress_max_ongoing_requests": ("int", 1, None),
    "max_batch_size": ("int", 1, None), "max_model_len": ("int", 2, None), "chunk_size": ("int", 1, None),
    "samples_dir": ("str", None, None), "sample_rate": ("number", 0, 1), "gpu_hourly_usd": ("number", 0, None),
    "metrics_port": ("int", 1, 65535), "api_key": ("str", None, None), "pattern": ("str", None, None),
    "num_replicas": ("int", 1, None), "num_gpus": ("number", 0, None), "num_cpus": ("number", 0, None),
    "dtype": ("str", None, None), "enforce_eager": ("bool", None, None), "tensor_parallel_size": ("int", 1, 16),
    "kv_cache_tokens": ("int", 1, None), "gpu_memory_utilization": ("number", 0, 1), "block_size": ("int", 1, None),
    "prefix_caching": ("bool", None, None), "threads": ("int", 1, None),
    "long_prefill_token_threshold": ("int", 0, None), "quantization": ("str", None, None),
    "ingress_in_server": ("bool", None, None),
}
_NULLABLE = {f.name for f in dataclasses.fields(AppArgs) if f.default is None}
_DTYPES = ("auto", "float32", "bfloat16")
_QUANTIZATIONS = ("none", "int8")


def _check_value(where: str, name: str, value: Any, kind: str, lo: float | None, hi: float | None) -> str | None:
    """Why `value` is not a valid `kind` in [lo, hi] (None: it is)."""
    if kind == "str":
        return None if isinstance(value, str) else f"{where}.{name} must be a string, got {value!r}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"{where}.{name} must be true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind == "number" else int):
        noun = "an integer" if kind == "int" else "a number"
        return f"{where}.{name} must be {noun}, got {value!r}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        return f"{where}.{name} must be {bounds}, got {value!r}"
    return None


def parse_app_args(args: dict[str, Any] | None) -> AppArgs:
    """The builder args of `indexcache.serving.app:build_app`; a bad one raises ValueError naming it."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(_APP_ARG_TYPES))
    if unknown:
        raise ValueError(f"build_app args: unknown key(s) {unknown}; allowed: {', '.join(_APP_ARG_TYPES)}")
    for name, value in args.items():
        if value is None and name in _NULLABLE:
            continue
        why = _check_value("build_app args", name, value, *_APP_ARG_TYPES[name])
        if why:
            raise ValueError(why)
    if args.get("dtype", "auto") not in _DTYPES:
        raise ValueError(f"build_app args.dtype must be one of {', '.join(_DTYPES)}, got {args['dtype']!r}")
    if args.get("quantization", "none") not in _QUANTIZATIONS:
        raise ValueError(f"build_app args.quantization must be one of {', '.join(_QUANTIZATIONS)}, "
                         f"got {args['quantization']!r}")
    if args.get("pattern") is not None and (why := pattern_problem(args["pattern"], field="build_app args.pattern")):
        raise ValueError(why)
    if args.get("ingress_in_server") and args.get("num_replicas", 1) != 1:
        raise ValueError(f"build_app args.ingress_in_server runs the server inside the one ingress replica; it needs "
                         f"num_replicas 1, got {args['num_replicas']} (leave ingress_in_server off for several replicas)")
    return AppArgs(**args)


def server_resources(tensor_parallel_size: int, num_gpus: float, num_cpus: float) -> dict:
    """The server deployment's resources. One rank: the replica actor holds the GPU(s) itself. N ranks: each
    replica reserves a placement group on one node (STRICT_PACK): its own bundle (CPU only), then one bundle
    per shard worker (a GPU each when the app asks for GPUs); the replica starts the workers in them."""
    if tensor_parallel_size == 1:
        return {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus}}
    worker = {"GPU": 1, "CPU": 1} if num_gpus else {"CPU": 1}
    return {"ray_actor_options": {"num_gpus": 0, "num_cpus": num_cpus},
            "placement_group_bundles": [{"CPU": num_cpus}] + [worker] * tensor_parallel_size,
            "placement_group_strategy": "STRICT_PACK"}


# ---------------------------------------------------------------------------------------------------
# user_config
# ---------------------------------------------------------------------------------------------------
# freq/offset: the upstream rule, resolved by the replica (it knows its layer count; the operator need not)
USER_CONFIG_KEYS = ("pattern", "pattern_version", "sample_rate", "gpu_hourly_usd", "freq", "offset")
INGRESS_USER_CONFIG_KEYS = ("max_ongoing_requests", "server")   # server: with ingress_in_server only


def check_user_config(user_config: Any) -> dict:
    """IndexCacheServer's user_config: only USER_CONFIG_KEYS, each of the right kind (what the replica
    can check without its model; the pattern's length is checked against the model by the replica).
    Returns it; a bad one raises ValueError naming the key."""
    if not isinstance(user_config, dict):
        raise ValueError(f"user_config must be a mapping with keys {USER_CONFIG_KEYS}, got {user_config!r}")
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"user_config has unknown key(s) {unknown}; allowed: {', '.join(USER_CONFIG_KEYS)}")
    version = user_config.get("pattern_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"user_config.pattern_version must be a non-negative integer, got {version!r}")
    rate = user_config.get("sample_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ValueError(f"user_config.sample_rate must be a number in [0, 1], got {rate!r}")
    price = user_config.get("gpu_hourly_usd")
    if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0):
        raise ValueError(f"user_config.gpu_hourly_usd must be a number >= 0, got {price!r}")
    for key, lo in (("freq", 1), ("offset", 0)):
        value = user_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
            raise ValueError(f"user_config.{key} must be an integer >= {lo}, got {value!r}")
    pattern = user_config.get("pattern")   # absent or empty: keep the replica's current pattern
    if pattern and (why := pattern_problem(pattern, field="user_config.pattern")):
        raise ValueError(why)
    return user_config


def check_ingress_config(config: dict | None) -> int | None:
    """The ingress's user_config: {"max_ongoing_requests": n}, the app-wide limit on requests in flight
    (429 beyond it), and with ingress_in_server {"server": IndexCacheServer's user_config}. Returns n (None when
    the key is absent); a bad value raises naming the field."""
    config = config or {}
    unknown = set(config) - set(INGRESS_USER_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{INGRESS_DEPLOYMENT} user_config: unknown key(s) {sorted(unknown)}; "
                         "the keys are max_ongoing_requests and (ingress_in_server only) server")
    if "server" in config:
        check_user_config(config["server"])
    n = config.get("max_ongoing_requests")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{INGRESS_DEPLOYMENT} user_config max_ongoing_requests={n!r}: must be an integer >= 1 "
                         "(the app-wide limit: per-replica limit x replicas)")
    return n
