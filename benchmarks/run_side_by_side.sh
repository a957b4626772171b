#!/usr/bin/env bash
# Side-by-side benchmark: ours (`vlm bench`) against the peer (mlx-vlm, benchmarks/bench_mlx_vlm.py) on one
# checkpoint, image and token count, greedy, alternating ours, peer, ours, peer, ... in one invocation.
#
#   benchmarks/run_side_by_side.sh CHECKPOINT IMAGE MAX_TOKENS
#
# Environment (all optional):
#   OURS_PY   python that imports vlm_models / vlm_runtime (a venv, or python3 with PYTHONPATH=packages/*/src)
#             default: python3
#   PEER_PY   python that imports mlx_vlm; default: python3
#   ROUNDS    alternations (each runs ours once, then the peer once); default 2
#   RUNS      timed runs per tool per round; default 3
#   WARMUP    warm-up runs per tool per round; default 1
#   PROMPT    the user message; default "Describe this image."
#   LOG_DIR   where the full outputs go; default a new temporary folder
#
# Prints each round's median line per tool, then per tool the median over rounds with the min-max range, and
# the ratios ours/peer of the medians. Alternating rounds spread slow phases of a noisy host over both tools.
# Exit status: 0, or 1 if a tool failed or the peer did not generate exactly MAX_TOKENS tokens.
set -euo pipefail

if [ $# -ne 3 ]; then
    sed -n "2,19p" "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CHECKPOINT=$1
IMAGE=$2
MAX_TOKENS=$3
OURS_PY=${OURS_PY:-python3}
PEER_PY=${PEER_PY:-python3}
ROUNDS=${ROUNDS:-2}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
PROMPT=${PROMPT:-Describe this image.}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/side_by_side.XXXXXX)}
mkdir -p "$LOG_DIR"

echo "checkpoint: $CHECKPOINT | image: $IMAGE | max tokens: $MAX_TOKENS | rounds: $ROUNDS x (warmup $WARMUP + runs $RUNS)"
echo "ours: $OURS_PY -m vlm_models.cli bench | peer: $PEER_PY $HERE/bench_mlx_vlm.py | logs: $LOG_DIR"
echo "host: $(uname -sm), $(nproc 2>/dev/null || echo '?') cores | $(date -u '+%Y-%m-%d %H:%M UTC')"

status=0
run_ours() {
    "$OURS_PY" -m vlm_models.cli bench --model "$CHECKPOINT" --image "$IMAGE" --prompt "$PROMPT" \
        --max-tokens "$MAX_TOKENS" --runs "$RUNS" --warmup "$WARMUP"
}
run_peer() {
    "$PEER_PY" "$HERE/bench_mlx_vlm.py" --model "$CHECKPOINT" --image "$IMAGE" --prompt "$PROMPT" \
        --max-tokens "$MAX_TOKENS" --runs "$RUNS" --warmup "$WARMUP"
}

for round in $(seq 1 "$ROUNDS"); do
    for tool in ours peer; do
        log="$LOG_DIR/${tool}_${round}.log"
        if ! "run_$tool" >"$log" 2>&1; then
            echo "round $round $tool: FAILED (exit status), see $log" >&2
            tail -n 20 "$log" >&2
            status=1
        fi
        line=$(grep '^median:' "$log" | tail -n 1 || true)
        printf 'round %s %-4s %s\n' "$round" "$tool" "${line:-<no median line>}"
    done
done

# VALUE after KEY in each round's median line ("median: vision V s | prompt P tok/s | generation G tok/s |
# peak M GB"), then the median over rounds, or with a second argument "range", "min-max" over rounds.
summary() {
    local tool=$1 key=$2 what=${3:-median}
    grep -h '^median:' "$LOG_DIR"/"${tool}"_*.log 2>/dev/null |
        awk -v key="$key" '{ for (i = 1; i < NF; i++) if ($i == key) print $(i + 1) }' |
        sort -g |
        awk -v what="$what" '{ v[NR] = $1 }
            END {
                if (NR == 0) { print "nan"; exit }
                if (what == "range") { printf "%s-%s\n", v[1], v[NR]; exit }
                if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2
            }'
}

echo
echo "median over rounds [min-max over rounds]"
printf '%-6s %-24s %-26s %-26s %s\n' tool vision_s prompt_tok/s generation_tok/s peak_GB
for tool in ours peer; do
    printf '%-6s %-24s %-26s %-26s %s\n' "$tool" \
        "$(summary "$tool" vision) [$(summary "$tool" vision range)]" \
        "$(summary "$tool" prompt) [$(summary "$tool" prompt range)]" \
        "$(summary "$tool" generation) [$(summary "$tool" generation range)]" \
        "$(summary "$tool" peak)"
done
awk -v op="$(summary ours prompt)" -v pp="$(summary peer prompt)" \
    -v og="$(summary ours generation)" -v pg="$(summary peer generation)" \
    -v ov="$(summary ours vision)" -v pv="$(summary peer vision)" 'BEGIN {
        printf "ratio ours/peer: prompt %.2fx | generation %.2fx", (pp > 0 ? op / pp : 0), (pg > 0 ? og / pg : 0)
        if (ov > 0 && pv > 0) printf " | vision time %.2fx (ours/peer, lower is better)", (ov / pv)
        printf "\n"
    }'

if grep -q '^warning: run .* generated' "$LOG_DIR"/peer_*.log 2>/dev/null; then
    echo "warning: the peer stopped before MAX_TOKENS in some run (see $LOG_DIR/peer_*.log)" >&2
    status=1
fi
exit $status
