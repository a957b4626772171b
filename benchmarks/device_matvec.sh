#!/usr/bin/env bash
# On the accelerator machine: quantized_matvec's CUDA tests, its kernel bench next to MLX's products, and batch-1
# decode of a Qwen2-VL-2B-shaped random checkpoint with and without the kernel (4- and 8-bit).
#   source .device/setup.sh; bash benchmarks/device_matvec.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CK=/tmp/qwen2vl-2b-bf16
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
(VLM_KERNELS_EXAMPLES=${EXAMPLES:-20} timeout 240 python3 -m pytest -x -q -p no:cacheprovider -m "not slow" \
  tests/kernels/test_quantized_matvec.py tests/models/test_kernel_linear.py 2>&1 | tail -25) | tee "$OUT/tests.log"
python3 -m vlm_kernels.cli info | tee "$OUT/info.log"
timeout 200 python3 -m vlm_kernels.cli bench --kernels matvec-4 --rows ${ROWS4:-1 4 8 32} --repeats 10 \
  --json "$OUT/matvec4.json" 2>&1 | tee "$OUT/bench4.log"
timeout 150 python3 -m vlm_kernels.cli bench --kernels matvec-8 matvec-bf16 --rows ${ROWS8:-1 8} --repeats 10 \
  --json "$OUT/matvec8.json" 2>&1 | tee "$OUT/bench8.log"
[ -f "$CK/config.json" ] || python3 benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out "$CK" | tail -1
for bits in ${DECODE_BITS:-4 8}; do
  timeout 150 python3 benchmarks/bench_matvec_decode.py --model "$CK" --bits "$bits" --group-size 64 --steps 128 \
    --pairs 3 2>&1 | grep -v "PyTorch was not found" | tee "$OUT/decode$bits.log"
done
