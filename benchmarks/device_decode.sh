#!/usr/bin/env bash
# On the accelerator machine: decode speed of the compiled step vs the plain one vs mlx-vlm, bf16 and 4-bit, on a
# Qwen2-VL-2B-shaped random checkpoint; batched throughput; and, where BASE holds an older tree's packages/ and
# benchmarks/, the same batch benchmark on that code (a before/after of one run).
#   source .device/setup.sh; BASE=/path/to/old/tree bash benchmarks/device_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CK=/tmp/qwen2vl-2b-bf16
Q4=/tmp/qwen2vl-2b-q4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$CK/config.json" ] || python3 benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out "$CK" | tail -1
[ -f "$Q4/config.json" ] || python3 benchmarks/quantize_checkpoint.py "$CK" "$Q4" --bits 4 --group-size 64 | tail -1
for m in "$CK" "$Q4"; do python3 benchmarks/profile_decode.py --model "$m" --context 300 --steps 64; done
for m in "$CK" "$Q4"; do
  python3 benchmarks/bench_interleaved.py --model "$m" --image benchmarks/bench_448.png --max-tokens 256 \
    --pairs 3 --warmup 1 --uncompiled --compiled
done
python3 benchmarks/bench_batch.py --model "$CK" --sizes 1 8 32 --tokens 128 --rounds 2 --peer
if [ -n "${BASE:-}" ]; then
  echo "== the same, on the code at $BASE"
  (cd "$BASE" && PYTHONPATH="$(ls -d "$BASE"/packages/*/src | tr '\n' ':')" \
    python3 benchmarks/bench_batch.py --model "$CK" --sizes 1 32 --tokens 128 --rounds 2)
  echo "== now"
  python3 benchmarks/bench_batch.py --model "$CK" --sizes 1 32 --tokens 128 --rounds 2
fi
