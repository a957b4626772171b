#!/usr/bin/env bash
# On the accelerator machine: the figures still owed (see BENCHMARKS.md and the open issues), most wanted first,
# each step under its own timeout so one slow step cannot eat the others. Two calls cover them on an H200:
#   source .device/setup.sh; STEPS="attn prefix evalquant omni" bash benchmarks/device_pending.sh     # ~7 min
#   source .device/setup.sh; STEPS="suite profile profile-gemma4" bash benchmarks/device_pending.sh   # ~8 min
#   source .device/setup.sh; STEPS="spec" bash benchmarks/device_pending.sh                          # ~9 min
# Other steps (already measured, kept to rerun): quant matvec.
# Needs tests/fixtures/qwen2_vl/hf4 (make_random_checkpoint.py); "omni" also qwen2_audio and qwen2_vl/hf5;
# "profile" qwen3_5/hf5; "profile-gemma4" gemma4/hub. Keep those when moving the others aside.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CK=${CK:-/tmp/qwen2vl-2b-bf16}
PRESET=${PRESET:-2b}  # a dry run anywhere: PRESET=tiny DTYPE=float32 CK=/tmp/ck-tiny OMNI_PRESET=small OMNI_ARGS="--seconds 1 --frames 4"
DTYPE=${DTYPE:-bfloat16}
VLM="python3 -m vlm_models.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[ -f "$CK/config.json" ] || python3 benchmarks/make_random_checkpoint.py --preset "$PRESET" --dtype "$DTYPE" --out "$CK" | tail -1
for step in ${STEPS:-attn prefix evalquant omni}; do
  echo "== $step"
  case $step in
    attn)  # vlm_runtime.attention's products against MLX's CUDA kernel (cuDNN for several queries)
      timeout 120 python3 -m pytest -q --noconftest -p no:cacheprovider tests/runtime/test_attention.py 2>&1 \
        | tail -5 | tee "$OUT/attn.log" ;;
    prefix)  # issue 17: time to first token for an 8k shared prefix, cold vs warm memory vs warm disk
      timeout 150 python3 benchmarks/bench_prefix_cache.py --model "$CK" --prefix-tokens 8192 --runs 3 --breakdown \
        2>&1 | tee "$OUT/prefix.log" ;;
    evalquant)  # issue 20: the quality table at the 2B shape (random weights: relative numbers) and the demo's
      timeout 200 $VLM eval-quant --model "$CK" --modes affine4,affine8,mxfp4,mxfp8,nvfp4 \
        --json "$OUT/eval_quant_2b.json" 2>&1 | grep -v "^\s*[0-9]*%\|it/s" | tee "$OUT/evalquant.log"
      timeout 100 $VLM eval-quant --json "$OUT/eval_quant_demo.json" 2>&1 | grep -v "it/s" \
        | tee -a "$OUT/evalquant.log" ;;
    omni)  # issue 16: prefill time against audio length and video frames at full 2B depth
      # shellcheck disable=SC2086
      timeout 200 python3 benchmarks/bench_omni_prefill.py --preset "${OMNI_PRESET:-2b}" --dtype "$DTYPE" --runs 2 \
        ${OMNI_ARGS:-} 2>&1 \
        | tee "$OUT/omni.log" ;;
    suite)  # issue 14: the user-facing suite at the 2B shape, bf16 and 4-bit, with mlx-vlm alternating at batch 1
      for bits in "" 4; do
        # shellcheck disable=SC2086
        timeout 240 $VLM bench --shape "${SUITE_SHAPE:-qwen2-vl-2b}" --dtype "$DTYPE" ${bits:+--q-bits $bits} --suite \
          --peer mlx-vlm --runs 2 --json "$OUT/suite${bits:+-q$bits}.json" 2>&1 | grep -v "^bench:" \
          | tee -a "$OUT/suite.log"
      done ;;
    spec)  # issue 18: speculative decoding at the 2B shape: the target as its own drafter (every proposal right:
      # what verifying in blocks saves at best), a random drafter (the cost of a useless one), a distilled EAGLE-3
      # head (layers 3, 13, 25 of 28), alone and at batch 4; every run is checked token-equal to plain decoding
      for draft in "$CK" random; do
        timeout 150 python3 benchmarks/bench_speculative.py --model "$CK" --draft-model "$draft" \
          --image benchmarks/bench_448.png --max-tokens 128 --runs 2 2>&1 | tail -4 | tee -a "$OUT/spec.log"
      done
      timeout 240 python3 benchmarks/train_eagle3_head.py --model "$CK" --output /tmp/eagle3-2b --layers "${EAGLE_LAYERS:-3,13,25}" \
        --samples 128 --steps 400 2>&1 | tail -3 | tee -a "$OUT/spec.log"
      for batch in 0 4; do
        timeout 150 python3 benchmarks/bench_speculative.py --model "$CK" --draft-model /tmp/eagle3-2b \
          --image benchmarks/bench_448.png --max-tokens 128 --runs 2 --batch "$batch" 2>&1 | tail -4 \
          | tee -a "$OUT/spec.log"
      done ;;
    matvec)  # issue 14: the quantized matvec kernel's speed (then set FAST_ROWS in vlm_kernels.quantized_matvec)
      TESTS=0 timeout 240 bash benchmarks/device_matvec.sh 2>&1 | tee "$OUT/matvec.log" ;;
    quant)  # issue 20: mxfp8 / nvfp4 with and without activation quantization, next to affine 4-bit and bf16
      for mode in mxfp8 nvfp4 affine; do
        [ -f "$CK-$mode/config.json" ] || timeout 120 $VLM convert --hf-path "$CK" --mlx-path "$CK-$mode" \
          -q --q-mode "$mode" 2>&1 | tail -1
      done
      for run in "$CK" "$CK-affine" "$CK-mxfp8 --no-quantize-activations" "$CK-mxfp8 -qa" \
                 "$CK-nvfp4 --no-quantize-activations" "$CK-nvfp4 -qa"; do
        # shellcheck disable=SC2086
        timeout ${QUANT_TIMEOUT:-120} $VLM bench --model $run --image benchmarks/bench_448.png --max-tokens 128 \
          --runs 2 > "$OUT/one.log" 2>&1; rc=$?
        # The median line, or (a failure, a timeout) the run's last lines: nothing is filtered away unseen.
        { grep -E "median|notice" "$OUT/one.log" || { echo "exit $rc"; tail -4 "$OUT/one.log"; }; } \
          | sed "s|^|$run: |" | tee -a "$OUT/quant.log"
      done ;;
    profile)  # issue 14/15: where a Qwen3.5-4B decode step goes (plain 10.8 ms synchronous but 86 ms pipelined)
      [ -f /tmp/qwen35-4b/config.json ] || python3 benchmarks/make_random_qwen3_5.py --preset 4b --dtype bfloat16 \
        --out /tmp/qwen35-4b | tail -1
      timeout 90 python3 benchmarks/profile_decode.py --model /tmp/qwen35-4b --context 300 --steps 32 \
        --variants plain 2>&1 | tee "$OUT/profile_qwen35.log"
      VLM_KERNELS_BACKEND=reference timeout 60 python3 benchmarks/profile_decode.py --model /tmp/qwen35-4b \
        --context 300 --steps 32 --variants plain 2>&1 | sed "s/^/ops-only: /" | tee -a "$OUT/profile_qwen35.log"
      timeout 60 python3 benchmarks/profile_decode.py --model /tmp/qwen35-4b --context 300 --steps 8 \
        --variants compiled 2>&1 | tail -3 | tee -a "$OUT/profile_qwen35.log" ;;
    profile-gemma4)  # issue 14/15: the same for Gemma-4-E4B (0.75x the peer)
      [ -f /tmp/gemma4-e4b/config.json ] || python3 benchmarks/make_gemma4_checkpoint.py --preset e4b \
        --dtype bfloat16 --out /tmp/gemma4-e4b | tail -1
      timeout 90 python3 benchmarks/profile_decode.py --model /tmp/gemma4-e4b --context 300 --steps 32 \
        --variants plain 2>&1 | tee "$OUT/profile_gemma4.log" ;;
  esac
done
