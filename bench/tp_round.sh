#!/usr/bin/env bash
# One command on the GPU machine for issue #16, everything under $OUT, within 5 minutes:
#   BENCH_COMMIT=<sha> bash bench/tp_round.sh [bench_tp.py args...]
# TP_WORLD=1 (default, one GPU): the worker-path GPU test, then the in-process engine against the worker
#   path on the 30B shape, interleaved twice (prefill TTFT at 16K, decode at 16K, batch-16 decode at 2K).
# TP_WORLD=2 or 4 (that many GPUs of one node): the SPMD run, one NCCL process per GPU (rank 0 reports).
#   If the CUDA-graph capture of the all-reduce fails, run it again with --enforce-eager.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=serving PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tp_round}; mkdir -p "$OUT"
WORLD=${TP_WORLD:-1}
echo "${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" > "$OUT/commit.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$WORLD" = 1 ]; then
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE \
        tests/parallel/test_worker_path_gpu.py > "$OUT/gpu_tests.log" 2>&1
    tail -3 "$OUT/gpu_tests.log"
    timeout 200 python3 bench/bench_tp.py --mode worker --repeat --time-budget 150 --out "$OUT/tp1.json" "$@" \
        2>&1 | tee "$OUT/bench.log" | tail -24
else
    timeout 270 python3 bench/bench_tp.py --mode spmd --world "$WORLD" --time-budget 180 \
        --out "$OUT/tp$WORLD.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -24
fi
