"""A bf16 GEMV for CPU decode: y (M, N) = x (M, K) @ w (N, K)^T for a few rows M, streaming each weight once.

A CPU decode step reads every weight of the model once and multiplies it by one row per request. On the
2-core development machine (Xeon with AVX-512 BF16 and AMX, torch 2.13) PyTorch's bf16 GEMM streams
weights from memory at 7-12 GB/s at M = 1, well below the ~19 GB/s a plain read reaches; the bundled model
reads 269 MB per token, so a decode step was ~30 ms of GEMV alone (bench/cpu_decode.py, bench/RESULTS.md).
`cpu_gemv_bf16.c` is the kernel: AVX-512 BF16 dot products with fp32 sums, rounded to bf16 once, rows of w
split over the OpenMP threads PyTorch uses.

The kernel is C, compiled on first use with the system C compiler (`cc`, gcc 12 on Debian 12) into
$INDEXCACHE_HOME/kernels (default ~/.cache/indexcache/kernels, keyed by the source's digest; ~0.6 s once),
and loaded with ctypes: no PyTorch headers, no ninja. Where it cannot run (no compiler, no AVX-512 BF16
in /proc/cpuinfo, a shape it does not take) `available()` says why and callers keep F.linear.
`ref_gemv_bf16` is the slow, obviously-right twin (fp32 product, one rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_gemv_bf16.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
K_MULTIPLE = 32          # one AVX-512 BF16 dot product covers 32 values of K

_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_loaded = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build() -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("INDEXCACHE_HOME") or Path.home() / ".cache" / "indexcache") / "kernels"
    target = root / f"cpu_gemv_bf16-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, text=True)
        built.replace(target)    # atomic: a concurrent build of the same source writes the same bytes
    return target


def _load() -> None:
    global _lib, _why_not, _loaded
    _loaded = True
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        _why_not = f"this CPU lacks {', '.join(missing)}"
        return
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        _why_not = f"the kernel could not be built or loaded ({exc}{': ' + detail[-500:] if detail else ''})"
        log.warning("CPU bf16 GEMV unavailable, decode uses F.linear: %s", _why_not)
        return
    lib.gemv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.gemv_bf16.restype = None
    _lib = lib


def available() -> str | None:
    """None when the kernel runs here; else why not (built and loaded on the first call)."""
    if not _loaded:
        _load()
    return _why_not


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv_bf16 takes these operands: bf16 CPU tensors, w (N, K) contiguous, K a multiple of 32."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and w.dim() == 2 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.is_contiguous() and w.shape[1] % K_MULTIPLE == 0
            and x.shape[-1] == w.shape[1])


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, threads: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (..., K) bf16 @ w (N, K)^T -> (..., N) in out_dtype (bf16 or fp32); fp32 sums. Needs available()
    is None and takes(x, w)."""
    if _lib is None:
        raise RuntimeError(f"the CPU bf16 GEMV is not available: {available()}")
    if not takes(x, w):
        raise ValueError(f"gemv_bf16 takes bf16 CPU x (..., K) and contiguous w (N, K), K % {K_MULTIPLE} == 0; "
                         f"got x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be bf16 or fp32, got {out_dtype}")
    lead, K, N = x.shape[:-1], w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K).contiguous()                                                    # (M, K)
    y = torch.empty(x2.shape[0], N, dtype=out_dtype)                                      # (M, N)
    _lib.gemv_bf16(x2.data_ptr(), x2.shape[0], K, w.data_ptr(), N, y.data_ptr(), int(out_dtype == torch.float32),
                   threads)
    return y.view(*lead, N)


def ref_gemv_bf16(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The twin: the product in fp32, rounded once to out_dtype."""
    return F.linear(x.float(), w.float()).to(out_dtype)
