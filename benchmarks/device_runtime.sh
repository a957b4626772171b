#!/usr/bin/env bash
# On the accelerator machine (see ../shared/device/README.md): the runtime's tests on MLX's CUDA backend, then
# the cache, batching and vision-cache benchmarks on a Qwen2-VL-2B-shaped random bf16 checkpoint.
#   source .device/setup.sh; bash benchmarks/device_runtime.sh tests|bench
set -uo pipefail
OUT=${OUT:-/tmp/out}
CKPT=/tmp/qwen2vl-2b-bf16
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${1:-bench}" = tests ]; then
  MLX_ENABLE_TF32=0 python3 -m pytest -q -n 8 -p no:cacheprovider tests/runtime tests/models 2>&1 | tail -25
  exit 0
fi
[ -f "$CKPT/config.json" ] || python3 benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out "$CKPT" | tail -1
[ -n "${SKIP_CACHES:-}" ] || python3 benchmarks/bench_caches.py --model "$CKPT" --contexts 4096 16384 --prompt 8192 --tokens 128 --decode-window 4096 --rounds 3
python3 benchmarks/bench_batch.py --model "$CKPT" --sizes 1 8 32 --tokens 128 --rounds 2 --peer
python3 benchmarks/bench_vision_cache.py --model "$CKPT" --image benchmarks/bench_448.png --pairs 5 --warmup 1
