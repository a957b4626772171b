#!/usr/bin/env bash
# On the accelerator machine: batch-1 decode of the two flagship families at real shapes (random weights), ours and
# mlx-vlm alternating in one process (bench_interleaved.py), bf16, one 448x448 image, greedy tokens.
#   source .device/setup.sh; bash benchmarks/device_flagships.sh            # both
#   MODELS=qwen35 PAIRS=3 TOKENS=256 bash benchmarks/device_flagships.sh     # one
# Needs tests/fixtures/qwen3_5/hf5 and tests/fixtures/gemma4/hub (tokenizers, templates) in the tree.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for name in ${MODELS:-qwen35 gemma4}; do
  case $name in
    qwen35) ck=/tmp/qwen35-4b; make="python3 benchmarks/make_random_qwen3_5.py --preset 4b" ;;
    gemma4) ck=/tmp/gemma4-e4b; make="python3 benchmarks/make_gemma4_checkpoint.py --preset e4b" ;;
  esac
  [ -f "$ck/config.json" ] || $make --dtype bfloat16 --out "$ck" | tail -1
  echo "== $ck"
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_interleaved.py --model "$ck" --image benchmarks/bench_448.png \
    --max-tokens ${TOKENS:-256} --pairs ${PAIRS:-3} --warmup 1 2>&1 | grep -v "^note\|UserWarning\|warnings.warn"
done
