"""Kernels of the CPU decode step (bf16): GEMVs that stream the weights, and the small per-layer operations fused
so that a layer is ~10 calls instead of ~100 PyTorch ops.

A CPU decode step reads every weight of the model once and multiplies it by one row per request. On the
2-core development machine (Xeon with AVX-512 BF16 and AMX, torch 2.13) PyTorch's bf16 GEMM streamed the
bundled model's 269 MB of weights at 8-13 GB/s at one row, where a plain read reaches 24-30 GB/s
(bench/cpu_decode.py, bench/RESULTS.md round 4). `cpu_decode.c` holds the kernels: the AVX-512 GEMV (BF16 dot
products with fp32 sums, rounded to bf16 once, software prefetch, rows of w split over the OpenMP threads
PyTorch uses; `gemv_add_bf16` adds it to a residual in place), the AMX GEMM for 1-64 rows from weights packed
once into tiles (`pack_amx`), RMSNorm, SiLU-and-multiply, RoPE of q and k with the KV cache write,
one-position attention over a slot's cache, and the indexer's scores + top-k + mask for many query rows
(`index_select_bf16`). After the GEMV, per-op cost was the step: ~3,000 PyTorch calls per
decode token at 3-10 us each.

The kernels are C, compiled on first use with the system C compiler (`cc`, gcc 12 on Debian 12) into
$INDEXCACHE_HOME/kernels (default ~/.cache/indexcache/kernels, keyed by the source's digest; ~1.6 s once on
2 cores), and loaded with ctypes: no PyTorch headers, no ninja. Where they cannot run (no compiler, no AVX-512
BF16 in /proc/cpuinfo, a shape they do not take) `available()` says why and callers keep the PyTorch path;
`amx_available()` likewise for the AMX GEMM. Each kernel has a `ref_` twin in plain PyTorch that rounds to
bf16 where the kernel does (the AMX GEMM's twin is `ref_gemv_bf16`).
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
SOURCE = Path(__file__).with_name("cpu_decode.c")
# -ffp-contract=off: no fused multiply-adds the twins do not make
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
         "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16")
AMX_MAX_ROWS = 64        # 4 accumulator tiles of 16 rows
K_MULTIPLE = 32          # one AVX-512 BF16 dot product covers 32 values of K

_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_amx_why_not: str | None = "not loaded"
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
    target = root / f"cpu_decode-{digest}.so"
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
        log.warning("CPU decode kernels unavailable, decode runs PyTorch ops: %s", _why_not)
        return
    P, I, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {"gemv_bf16": [P, I, I, P, I, P, I, I], "gemv_add_bf16": [P, I, I, P, I, P, I],
                  "rms_norm_bf16": [P, I, I, P, F32, P, I], "silu_mul_bf16": [P, I, I, P, I],
                  "rope_qkv_bf16": [P, I, I, I, I, I, P, P, P, P, I, P, P, P, I],
                  "attend_bf16": [P, I, I, I, I, P, P, I, P, P, P, I, F32, P, P, I, I],
                  "index_select_bf16": [P, P, I, I, I, P, I, P, I, I],
                  "amx_gemv_bf16": [P, I, I, P, I, P, I, I], "amx_init": []}
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.amx_init.restype = ctypes.c_int
    _lib = lib
    global _amx_why_not
    missing = [f for f in AMX_FLAGS if f not in _cpu_flags()]
    if missing:
        _amx_why_not = f"this CPU lacks {', '.join(missing)}"
    elif os.environ.get("INDEXCACHE_CPU_AMX", "1") == "0":
        _amx_why_not = "turned off by INDEXCACHE_CPU_AMX=0"
    elif lib.amx_init() != 0:
        _amx_why_not = "the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    else:
        _amx_why_not = None


def available() -> str | None:
    """None when the kernel runs here; else why not (built and loaded on the first call)."""
    if not _loaded:
        _load()
    return _why_not


def amx_available() -> str | None:
    """None when the AMX GEMV runs here (the kernels load, the CPU has AMX-BF16, Linux grants tile state)."""
    return available() or _amx_why_not


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv_bf16 takes these operands: bf16 CPU tensors, w (N, K) contiguous, K a multiple of 32."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and w.dim() == 2 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.is_contiguous() and w.shape[1] % K_MULTIPLE == 0
            and x.shape[-1] == w.shape[1])


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, threads: int, out_dtype: torch.dtype = torch.bfloat16,
              check: bool = True) -> torch.Tensor:
    """x (..., K) bf16 @ w (N, K)^T -> (..., N) in out_dtype (bf16 or fp32); fp32 sums. Needs available() is None
    and takes(x, w); check=False: the caller has checked takes(x, w) and that x is a contiguous (M, K) bf16 CPU
    tensor (the decode step, ~120 calls per token, checks its weights once)."""
    if check:
        if _lib is None:
            raise RuntimeError(f"the CPU decode kernels are not available: {available()}")
        if not takes(x, w):
            raise ValueError(f"gemv_bf16 takes bf16 CPU x (..., K) and contiguous w (N, K), K % {K_MULTIPLE} == 0; "
                             f"got x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
        if out_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"out_dtype must be bf16 or fp32, got {out_dtype}")
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).contiguous()                                          # (M, K)
    M, K, N = x.shape[0], x.shape[1], w.shape[0]
    y = torch.empty(M, N, dtype=out_dtype)                                                   # (M, N)
    _lib.gemv_bf16(x.data_ptr(), M, K, w.data_ptr(), N, y.data_ptr(), int(out_dtype == torch.float32), threads)
    return y.view(*lead, N) if check else y


def ref_gemv_bf16(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The twin: the product in fp32, rounded once to out_dtype."""
    return F.linear(x.float(), w.float()).to(out_dtype)


def _check_rows(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} takes contiguous bf16 CPU tensors, got {t.dtype} {tuple(t.shape)} "
                             f"contiguous={t.is_contiguous()}")


def gemv_add_bf16(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, threads: int,
                  check: bool = True) -> torch.Tensor:
    """residual (M, N) += bf16(x (M, K) @ w (N, K)^T), in place, rounded as `residual + F.linear(x, w)`.
    check=False: the caller has checked the operands (as for gemv_bf16)."""
    if check:
        if _lib is None:
            raise RuntimeError(f"the CPU decode kernels are not available: {available()}")
        if not takes(x, w) or x.dim() != 2:
            raise ValueError(f"gemv_add_bf16: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
        x = x.contiguous()
        _check_rows("gemv_add_bf16", residual)
        if residual.shape != (x.shape[0], w.shape[0]):
            raise ValueError(f"gemv_add_bf16: residual {tuple(residual.shape)} for x {tuple(x.shape)}, w {tuple(w.shape)}")
    _lib.gemv_add_bf16(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[0], residual.data_ptr(), threads)
    return residual


def ref_gemv_add_bf16(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual + ref_gemv_bf16(x, w)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float, check: bool = True, threads: int = 1) -> torch.Tensor:
    """x (M, D) -> bf16(F.rms_norm(x in fp32)) * weight (D,), per row. check=False: the caller has checked that
    both are contiguous bf16 CPU tensors of matching width. threads: rows split over that many from 32 rows on
    (a prefill chunk; fewer rows run on one)."""
    if check:
        _check_rows("rms_norm_bf16", x, weight)
        if x.dim() != 2 or weight.shape != (x.shape[1],):
            raise ValueError(f"rms_norm_bf16: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    y = torch.empty_like(x)
    _lib.rms_norm_bf16(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, y.data_ptr(), threads)
    return y


def ref_rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def silu_mul_bf16(gate_up: torch.Tensor, check: bool = True, threads: int = 1) -> torch.Tensor:
    """gate_up (M, 2I) = [g | u] -> silu(g) * u (M, I), each in bf16; I a multiple of 16. check=False: the caller
    has checked that. threads: as rms_norm_bf16's."""
    if check:
        _check_rows("silu_mul_bf16", gate_up)
    M, I2 = gate_up.shape
    if check and I2 % 32:
        raise ValueError(f"silu_mul_bf16 takes (M, 2I) with I a multiple of 16, got {tuple(gate_up.shape)}")
    y = torch.empty(M, I2 // 2, dtype=torch.bfloat16)
    _lib.silu_mul_bf16(gate_up.data_ptr(), M, I2 // 2, y.data_ptr(), threads)
    return y


def ref_silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, -1)
    return F.silu(g) * u


def rope_qkv_bf16(proj: torch.Tensor, hq: int, hkv: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, check: bool = True,
                  threads: int = 1) -> torch.Tensor:
    """proj (M, P) = [q (Hq*Dh) | k (Hkv*Dh) | v (Hkv*Dh) | ...] of one position per row; cos/sin (max_len, Dh) fp32
    tables [cos | cos], [-sin | sin]; positions, slots (M,) int64. Writes rotated k and v into the caches
    (slots, max_len, Hkv, Dh) at [slots[m], positions[m]]; returns rotated q (M, Hq*Dh). check=False: the caller
    has checked the operands (contiguous bf16, shapes) and the positions and slots against the cache (the kernel
    indexes memory with them unchecked). One row per position: a prefill chunk is M rows of one slot at
    consecutive positions. threads: as rms_norm_bf16's."""
    n_slots, max_len, h, dh = k_cache.shape
    if check:
        _check_rows("rope_qkv_bf16", proj, k_cache, v_cache)
    if check and (h != hkv or v_cache.shape != k_cache.shape or proj.shape[1] < (hq + 2 * hkv) * dh or cos.shape[1] != dh
            or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous())
            or positions.dtype != torch.int64 or slots.dtype != torch.int64 or len(positions) != proj.shape[0]
            or len(slots) != proj.shape[0]):
        raise ValueError("rope_qkv_bf16: inconsistent shapes or dtypes")
    if check and (int(positions.max()) >= min(max_len, cos.shape[0]) or int(slots.max()) >= n_slots
                  or int(positions.min()) < 0 or int(slots.min()) < 0):
        raise ValueError("rope_qkv_bf16: a position or slot outside the cache")
    q = torch.empty(proj.shape[0], hq * dh, dtype=torch.bfloat16)
    _lib.rope_qkv_bf16(proj.data_ptr(), proj.shape[0], proj.shape[1], hq, hkv, dh, cos.data_ptr(), sin.data_ptr(),
                       positions.data_ptr(), slots.data_ptr(), max_len, q.data_ptr(), k_cache.data_ptr(),
                       v_cache.data_ptr(), threads)
    return q


def ref_rope_qkv_bf16(proj, hq, hkv, cos, sin, positions, slots, k_cache, v_cache) -> torch.Tensor:
    dh = k_cache.shape[-1]
    M = proj.shape[0]
    qk = proj[:, : (hq + hkv) * dh].float().view(M, hq + hkv, dh)
    swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    qk = (qk * cos[positions][:, None] + swapped * sin[positions][:, None]).to(torch.bfloat16)
    k_cache[slots, positions] = qk[:, hq:]
    v_cache[slots, positions] = proj[:, (hq + hkv) * dh: (hq + 2 * hkv) * dh].view(M, hkv, dh)
    return qk[:, :hq].reshape(M, hq * dh)


def attend_bf16(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                kv_lens: torch.Tensor, allowed: torch.Tensor | None, scale: float, threads: int,
                check: bool = True) -> torch.Tensor:
    """q (M, Hq*Dh) one position per row -> (M, Hq*Dh): softmax(q k^T * scale) v over the keys [0, kv_lens[m]) of
    slot slots[m] in the caches (slots, max_len, Hkv, Dh), or those allowed (M, S) bool admits; GQA.
    check=False: the caller has checked the operands (contiguous bf16, shapes), slots and kv_lens against the cache."""
    n_slots, max_len, hkv, dh = k_cache.shape
    M, hq = q.shape[0], q.shape[1] // dh
    if check:
        _check_rows("attend_bf16", q, k_cache, v_cache)
    if check and (hq % hkv or hq // hkv > 16 or dh > 256 or dh % 16 or slots.dtype != torch.int64 or kv_lens.dtype != torch.int64 or len(slots) != M
            or len(kv_lens) != M):
        raise ValueError("attend_bf16: inconsistent shapes or dtypes")
    if check and (int(kv_lens.max()) > max_len or int(kv_lens.min()) < 1 or int(slots.max()) >= n_slots
                  or int(slots.min()) < 0):
        raise ValueError("attend_bf16: a length or slot outside the cache")
    S = 0
    if allowed is not None:
        if allowed.dtype != torch.bool or allowed.shape[0] != M or (check and allowed.shape[1] < int(kv_lens.max())):
            raise ValueError(f"attend_bf16: allowed must be (M, >= max kv_len) bool, got {tuple(allowed.shape)}")
        allowed = allowed.contiguous()
        S = allowed.shape[1]
    out = torch.empty(M, hq * dh, dtype=torch.bfloat16)
    s_max = S or int(kv_lens.max())                     # allowed covers every kv_len (checked above)
    scratch = torch.empty(M * hq, s_max, dtype=torch.float32)
    _lib.attend_bf16(q.data_ptr(), M, hq, hkv, dh, k_cache.data_ptr(), v_cache.data_ptr(), max_len, slots.data_ptr(),
                     kv_lens.data_ptr(), allowed.data_ptr() if allowed is not None else None, S, scale, out.data_ptr(),
                     scratch.data_ptr(), s_max, threads)
    return out


def ref_attend_bf16(q, k_cache, v_cache, slots, kv_lens, allowed, scale) -> torch.Tensor:
    """One request at a time: fp32 softmax attention over its visible (and allowed) keys."""
    dh = k_cache.shape[-1]
    out = []
    for m in range(q.shape[0]):
        n = int(kv_lens[m])
        k = k_cache[slots[m], :n].float()                                        # (n, Hkv, Dh)
        v = v_cache[slots[m], :n].float()
        qm = q[m].float().view(-1, dh)                                           # (Hq, Dh)
        group = qm.shape[0] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)      # (n, Hq, Dh)
        scores = torch.einsum("hd,nhd->hn", qm, k) * scale                       # (Hq, n)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[m, :n], float("-inf"))
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v).reshape(-1))
    return torch.stack(out).to(torch.bfloat16)


def index_select_bf16(logits: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, k: int, threads: int,
                      additive: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer's top-k for M query rows: logits (M, Hi, S) bf16 (q . k per index head and key), w (M, Hi) fp32
    (the per-head weights), n_visible (M,) int64 (keys [0, n_visible) may be chosen) -> (M, S), bool (chosen) or,
    with additive, bf16 0 / -inf (the mask attention adds). score[m, s] = sum_h w[m, h] * relu(logits[m, h, s]) in
    fp32; the k highest visible scores are chosen, ties at the k-th from the lowest key index; every visible key
    when n_visible <= k. out: a contiguous (M, S) tensor of that dtype to write into."""
    if logits.dim() != 3 or logits.dtype != torch.bfloat16 or not logits.is_contiguous():
        raise ValueError(f"index_select_bf16: logits must be contiguous (M, Hi, S) bf16, got {tuple(logits.shape)} {logits.dtype}")
    M, hi, S = logits.shape
    if w.shape != (M, hi) or w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError(f"index_select_bf16: w must be contiguous ({M}, {hi}) fp32, got {tuple(w.shape)} {w.dtype}")
    if n_visible.shape != (M,) or n_visible.dtype != torch.int64 or not n_visible.is_contiguous() or k < 1:
        raise ValueError("index_select_bf16: n_visible must be (M,) int64 and k >= 1")
    dtype = torch.bfloat16 if additive else torch.bool
    if out is None:
        out = torch.empty(M, S, dtype=dtype)
    elif out.shape != (M, S) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"index_select_bf16: out must be contiguous ({M}, {S}) {dtype}, got {tuple(out.shape)} {out.dtype}")
    _lib.index_select_bf16(logits.data_ptr(), w.data_ptr(), M, hi, S, n_visible.data_ptr(), k, out.data_ptr(),
                           int(additive), threads)
    return out


def ref_index_select_bf16(logits: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, k: int,
                          additive: bool = False) -> torch.Tensor:
    """The twin: the scores summed head by head in fp32, a stable descending sort per row (equal scores keep key
    order), the first k visible keys of it."""
    M, hi, S = logits.shape
    lf = logits.float().relu()
    score = lf[:, 0] * w[:, :1]
    for h in range(1, hi):
        score = score + lf[:, h] * w[:, h: h + 1]                                  # (M, S) fp32
    chosen = torch.zeros(M, S, dtype=torch.bool)
    for m in range(M):
        n = int(min(n_visible[m], S))
        order = torch.sort(score[m, :n], descending=True, stable=True).indices
        chosen[m, order[:k]] = True
    if not additive:
        return chosen
    return torch.zeros(M, S, dtype=torch.bfloat16).masked_fill_(~chosen, float("-inf"))


def pack_amx(w: torch.Tensor) -> torch.Tensor:
    """A (N, K) bf16 weight, N % 16 == 0 and K % 32 == 0, as AMX B tiles (N/16, K/32, 16, 16, 2): tile (nb, kb)
    holds w[nb*16 + n, kb*32 + 2*kk + j] at [kk, n, j]. The first r/16 tiles along N are the packing of w[:r]."""
    N, K = w.shape
    if w.dtype != torch.bfloat16 or N % 16 or K % 32:
        raise ValueError(f"pack_amx takes a bf16 (N, K) weight with N % 16 == 0, K % 32 == 0, got {tuple(w.shape)} {w.dtype}")
    return w.view(N // 16, 16, K // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def amx_gemv_bf16(x: torch.Tensor, packed: torch.Tensor, threads: int, residual: torch.Tensor | None = None,
                  check: bool = True) -> torch.Tensor:
    """x (M, K) bf16, M <= 64, @ w^T for w packed by pack_amx -> (M, N) bf16; with residual (M, N): residual +=
    bf16(x @ w^T) in place, returned. check=False: the caller has checked the operands."""
    N, K = packed.shape[0] * 16, packed.shape[1] * 32
    if check:
        if amx_available() is not None:
            raise RuntimeError(f"the AMX GEMV is not available: {amx_available()}")
        if packed.dim() != 5 or packed.shape[2:] != (16, 16, 2) or packed.dtype != torch.bfloat16 or not packed.is_contiguous():
            raise ValueError(f"amx_gemv_bf16 takes a weight packed by pack_amx, got {tuple(packed.shape)}")
        x = x.contiguous()
        _check_rows("amx_gemv_bf16", x)
        if x.dim() != 2 or x.shape[1] != K or not 1 <= x.shape[0] <= AMX_MAX_ROWS:
            raise ValueError(f"amx_gemv_bf16: x {tuple(x.shape)} for K {K}, at most {AMX_MAX_ROWS} rows")
        if residual is not None:
            _check_rows("amx_gemv_bf16", residual)
            if residual.shape != (x.shape[0], N):
                raise ValueError(f"amx_gemv_bf16: residual {tuple(residual.shape)}, want {(x.shape[0], N)}")
    y = residual if residual is not None else torch.empty(x.shape[0], N, dtype=torch.bfloat16)
    _lib.amx_gemv_bf16(x.data_ptr(), x.shape[0], K, packed.data_ptr(), N, y.data_ptr(), int(residual is not None), threads)
    return y
