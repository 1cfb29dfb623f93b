#!/usr/bin/env bash
# Issue 15 on the H200 (~3 min, at most 6): the paged KV cache's GPU tests, then one 200K request + 32 short ones
# served together from one paged pool (bench/paged_mixed.py), JSON and logs under $OUT.
#   BENCH_COMMIT=<sha> bash bench/paged_gpu.sh [paged_mixed.py args...]
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=serving PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/paged_gpu}; mkdir -p "$OUT"
echo "${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" > "$OUT/commit.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# paged fast path vs the slot cache (in-place sparse attention over the pool, indexer through the table),
# graph decode on paged tables vs eager, and the existing fast-path tests the indexer change touches
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE tests/kernels/test_paged_fast_path.py \
    tests/serving/test_engine_cuda_graphs.py tests/kernels/test_model_fast_path.py \
    tests/kernels/test_triton_kernels.py > "$OUT/paged_gpu_tests.log" 2>&1
tail -5 "$OUT/paged_gpu_tests.log"
timeout 240 python3 bench/paged_mixed.py --out "$OUT/paged_mixed.json" "$@" 2>&1 | tee "$OUT/paged_mixed.log" | tail -8
