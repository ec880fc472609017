#!/usr/bin/env bash
# Prefix caching on the CPU: the same shared-prefix load against the engine with and without
# --enable-prefix-caching (SmolLM2, real GGUF), ROUNDS times each (the cache is reset before every
# round, so each round starts cold), then `probe compare` of the first round of each.
# Writes days/day-010-prefix-caching/{cache-on-N,cache-off-N,compare}/, prefix-cache metrics and
# the two server logs.
# Usage (repository root, after `cargo build --release -p engine -p probe`):
#   scripts/lab/prefix-caching-cpu.sh [BIN_DIR (default target/release)]   env: ROUNDS (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
MODEL=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
DAY=days/day-010-prefix-caching
bash scripts/fetch-model.sh >/dev/null
mkdir -p "$DAY"
port=8420
for mode in on off; do
    port=$((port + 1))
    flag=--enable-prefix-caching; [ "$mode" = off ] && flag=--no-enable-prefix-caching
    "$BIN/engine" "$MODEL" --device cpu --port $port --max-model-len 2048 $flag > "$DAY/serve-cache-$mode.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null' EXIT
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
    for round in $(seq 1 "$ROUNDS"); do
        curl -sf -X POST "http://127.0.0.1:$port/reset_prefix_cache" >/dev/null
        # 3 groups x 5 prompts: a 256-token shared system prompt + a 16-token question, 16 tokens
        # out, one every 4 s: each ends before the next starts even without the cache (no
        # queueing anywhere, so TTFT is the prefill itself), and every prompt after a group's
        # first can hit the cache.
        "$BIN/probe" bench --base-url "http://127.0.0.1:$port" --label "cache-$mode-$round" \
            --dataset-name shared-prefix --num-groups 3 --num-prompts-per-group 5 \
            --system-prompt-len 256 --question-len 16 --output-len 16 --constant-rate 0.25 \
            --seed 3 --no-progress --out "$DAY/cache-$mode-$round" |
            grep -E "Successful|Failed|Prefix-cached|Mean TTFT|Median TTFT|P99 TTFT|Mean TPOT|Mean queue"
    done
    curl -s "http://127.0.0.1:$port/metrics" | grep -E "^vllm:prefix_cache_(queries|hits)_total" | tee "$DAY/prefix-cache-$mode.txt"
    kill $pid; wait $pid 2>/dev/null || true
    trap - EXIT
done
"$BIN/probe" compare "$DAY/cache-on-1" "$DAY/cache-off-1" --out "$DAY/compare" | tail -5
