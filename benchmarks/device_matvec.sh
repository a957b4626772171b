#!/usr/bin/env bash
# On the accelerator machine: quantized_matvec's CUDA tests, its kernel bench next to MLX's products, and batch-1
# decode of a Qwen2-VL-2B-shaped random checkpoint before/after (MLX's product, the kernel, the kernel + fused
# projections). Steps in order of importance, each printing as it goes (NVRTC compiles each kernel shape on first
# use, about 5 s each on a fresh machine: the tests took 180 s at 20 examples, so they default to 10 here).
#   source .device/setup.sh; bash benchmarks/device_matvec.sh            # everything
#   TESTS=0 bash benchmarks/device_matvec.sh                               # benchmarks only
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CK=/tmp/qwen2vl-2b-bf16
BENCH="python3 -m vlm_kernels.cli bench --repeats 10"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
  (VLM_KERNELS_EXAMPLES=${EXAMPLES:-10} timeout 240 python3 -m pytest -x -q -p no:cacheprovider -m "not slow" \
    tests/kernels/test_quantized_matvec.py tests/models/test_kernel_linear.py 2>&1 | tail -25) | tee "$OUT/tests.log"
fi
timeout 90 $BENCH --kernels matvec-4 --rows 1 2>&1 | tee "$OUT/bench4_rows1.log"
[ -f "$CK/config.json" ] || python3 benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out "$CK" | tail -1
timeout 90 python3 benchmarks/bench_matvec_decode.py --model "$CK" --bits 4 --group-size 64 --steps 128 --pairs 2 \
  2>&1 | grep -v "PyTorch was not found" | tee "$OUT/decode4.log"
timeout 40 $BENCH --kernels matvec-bf16 --rows 1 --shapes 1536x8960 8960x1536 2>&1 | tee "$OUT/bench_bf16.log"
timeout 40 $BENCH --kernels matvec-4 matvec-8 --rows 8 --shapes 1536x8960 2>&1 | tee "$OUT/bench_rows8.log"
