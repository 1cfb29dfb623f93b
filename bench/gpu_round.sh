#!/usr/bin/env bash
# One GPU round on the H200: the GPU tests, kernel probes, then the served-model benchmark, all under $OUT.
#   BENCH_COMMIT=<sha> bash bench/gpu_round.sh [bench_model.py args...]   (BENCH_BUDGET seconds, default 360)
# (pass the commit: the device machine's copy of the tree may carry another git HEAD)
#   GPU_ROUND_SERVED=1: also `bench_kernels.py --only-served` (MoE paths, in-place indexer) and the FP8
#   indexer probe (tools/fp8_indexer_probe.py) before the model benchmark.
#   GPU_ROUND_DECODE_TOPK=1: time the decode top-k paths first and run the model with the faster one.
#   GPU_ROUND_MLA_LAYOUT=1: time the sparse MLA prefill layouts at the 200K shape first and run the model with
#   the faster one on clustered indices (INDEXCACHE_MLA_PREFILL), when its output matches (rel. diff < 1e-2).
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=serving PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_round}; mkdir -p "$OUT"
echo "${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" > "$OUT/commit.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE tests/kernels \
    tests/serving/test_engine_cuda_graphs.py ${GPU_TESTS_EXTRA:-} > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"
if [ -n "${GPU_ROUND_SERVED:-}" ]; then
    timeout 60 python3 tools/fp8_indexer_probe.py --seeds 4 > "$OUT/fp8_probe.jsonl" 2>&1; tail -4 "$OUT/fp8_probe.jsonl"
    timeout 120 python3 bench/bench_kernels.py --only-served --out "$OUT/kernels_served.json" 2>&1 | tail -12
fi
if [ -n "${GPU_ROUND_DECODE_TOPK:-}" ]; then    # pick the decode top-k path from a measurement, for the model run
    timeout 120 python3 bench/bench_kernels.py --only-decode-topk --out "$OUT/decode_topk.json" 2>&1 | tail -14
    min_s=$(python3 -c "import json; print(json.load(open('$OUT/decode_topk.json'))['min_keys'] or '')" 2>/dev/null)
    [ -n "$min_s" ] && export INDEXCACHE_DECODE_TOPK_MIN_S=$min_s
    echo "INDEXCACHE_DECODE_TOPK_MIN_S=${INDEXCACHE_DECODE_TOPK_MIN_S:-unset}" | tee "$OUT/decode_topk_choice.txt"
fi
if [ -n "${GPU_ROUND_MLA_LAYOUT:-}" ]; then
    timeout 180 python3 bench/bench_kernels.py --only-mla-layouts --out "$OUT/mla_layouts.json" 2>&1 | tail -12
    layout=$(python3 -c "import json; print(json.load(open('$OUT/mla_layouts.json'))['fastest_layout'] or '')" 2>/dev/null)
    [ -n "$layout" ] && export INDEXCACHE_MLA_PREFILL=$layout
    echo "INDEXCACHE_MLA_PREFILL=${INDEXCACHE_MLA_PREFILL:-unset}" | tee "$OUT/mla_layout_choice.txt"
fi
timeout $(( ${BENCH_BUDGET:-360} + 120 )) python3 bench/bench_model.py --out "$OUT/model.json" \
    --time-budget "${BENCH_BUDGET:-360}" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
