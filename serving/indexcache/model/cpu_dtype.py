"""`--dtype auto` on a CPU: bf16 or fp32 weights, whichever multiplies faster on this CPU.

CPUs with AVX-512 BF16 or AMX run bf16 GEMMs 2-4x faster than fp32 and read half the bytes per decode
token; CPUs without them emulate bf16 and run it slower than fp32. So the choice is measured, once per
(CPU model, torch version, threads), with a GEMM of the bundled model's shape (1024 tokens x 576 -> 1536),
and cached in $INDEXCACHE_HOME/cpu-dtype.json (default ~/.cache/indexcache) so that later starts cost
nothing. On CUDA, auto is bf16 (load_checkpoint's default) and no probe runs.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_file() -> Path:
    return Path(os.environ.get("INDEXCACHE_HOME") or Path.home() / ".cache" / "indexcache") / "cpu-dtype.json"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key() -> str:
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def matmul_gflops(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, seconds: float = 0.15) -> float:
    """Best-of GFLOP/s of (m, k) @ (k, n) in `dtype` over about `seconds`."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b                                                   # first call: allocation, kernel selection
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * m * k * n / best / 1e9


def probe() -> dict:
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return {"dtype": "bfloat16" if bf16 > fp32 else "float32", "gflops_float32": round(fp32, 1),
            "gflops_bfloat16": round(bf16, 1)}


def resolve_cpu_dtype(choice: str) -> torch.dtype:
    """'float32' | 'bfloat16' -> that dtype; 'auto' -> the faster on this CPU (probed once, then cached)."""
    if choice in DTYPES:
        return DTYPES[choice]
    if choice != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {choice!r}")
    path, key = cache_file(), probe_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if not (isinstance(entry, dict) and entry.get("dtype") in DTYPES):
        entry = probe()
        known[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError as exc:   # a read-only home: the probe runs again next start, nothing breaks
            log.warning("cannot cache the CPU dtype probe in %s (%s)", path, exc)
        log.info("CPU dtype probe: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s -> %s", entry["gflops_bfloat16"],
                 entry["gflops_float32"], entry["dtype"])
    return DTYPES[entry["dtype"]]
