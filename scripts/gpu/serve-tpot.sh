#!/usr/bin/env bash
# On the GPU machine, repository root: decode speed as served, beside engine-bench's step. The
# engine at the Qwen2.5-1.5B shape (dummy bf16 weights, real Qwen2.5 tokenizer) under each
# variant's flags, then `probe bench` at each max concurrency: 1,024-token prompts, 128 output
# tokens (EOS ignored), all requests queued at once, TTFT / TPOT / ITL from the client's stream;
# the seed is the concurrency, so that no level reuses an earlier level's prompts (prefix caching).
# Carry .lab-s (engine.xz, probe.xz, qwen2.5/ with tokenizer.json.xz and tokenizer_config.json;
# engine-<variant>.xz, when there, serves that variant instead of engine.xz). The engines inherit
# the environment: CUDA_CACHE_DISABLE=1 makes every start JIT its PTX as on a new machine.
# Writes $OUT/<RUN>/: gpu.txt, serve-<variant>.log, bench-<variant>-c<N>.txt and the probe's run
# folders <variant>-c<N>/.
# env: RUN (default serve-tpot), VARIANTS (space-separated name:flags, flags joined by commas;
#      default "graphs:--cuda-graphs eager:"), CONC (default "1 8"), PROMPTS (default 24),
#      WARMUP (default 2), IN (default 1024), OUT_LEN (default 128), BENCH_TIMEOUT (default 120).
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
run_dirs serve-tpot /root/stpot
for f in .lab-s/*.xz; do
    b=$(basename "$f" .xz)
    xz -dc "$f" > "$L/$b" && chmod +x "$L/$b"
done
mkdir -p "$L/qwen2.5"
cp .lab-s/qwen2.5/tokenizer_config.json "$L/qwen2.5/"
xz -dc .lab-s/qwen2.5/tokenizer.json.xz > "$L/qwen2.5/tokenizer.json"
gpu_line "$D/gpu.txt"
QW="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --tokenizer $L/qwen2.5
    --device cuda --max-model-len 4096 --max-num-seqs 16"
port=8200
for v in ${VARIANTS:-graphs:--cuda-graphs eager:}; do
    name=${v%%:*} flags=${v#*:}
    flags=${flags//,/ }
    port=$((port + 1))
    bin=$L/engine
    [ -x "$L/engine-$name" ] && bin=$L/engine-$name
    echo "== $name: $(basename "$bin") $flags"
    # shellcheck disable=SC2086
    "$bin" $QW $flags --port $port > "$D/serve-$name.log" 2>&1 &
    pid=$!
    if ! wait_ready "http://127.0.0.1:$port" $pid 600; then
        echo "engine ($name) did not become ready"; tail -20 "$D/serve-$name.log"
        kill $pid 2> /dev/null; wait $pid 2> /dev/null
        continue
    fi
    grep -E "KV cache size|CUDA graphs|kernel modules|Engine ready" "$D/serve-$name.log" | sed 's/^.*INFO[^:]*: //'
    for c in ${CONC:-1 8}; do
        timeout -s INT "${BENCH_TIMEOUT:-120}" "$L/probe" bench --base-url "http://127.0.0.1:$port" \
            --label "$name-c$c" --request-rate inf --max-concurrency "$c" \
            --num-prompts "${PROMPTS:-24}" --warmup "${WARMUP:-2}" --dataset-name random \
            --random-input-len "${IN:-1024}" --random-output-len "${OUT_LEN:-128}" \
            --tokenizer "$L/qwen2.5/tokenizer.json" --seed "$c" --no-progress \
            --out "$D/$name-c$c" > "$D/bench-$name-c$c.txt" 2>&1
        echo "-- $name, max concurrency $c: exit $?"
        grep -E "Successful|Failed|TTFT|TPOT|ITL|Output token throughput" "$D/bench-$name-c$c.txt"
    done
    kill -INT $pid 2> /dev/null; sleep 1; kill $pid 2> /dev/null; wait $pid 2> /dev/null
done
