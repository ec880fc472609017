#!/usr/bin/env bash
# On the GPU machine: the probe's lab experiments against our engine on CUDA, in two back-to-back
# calls (a call carries at most 64 MiB; the SmolLM2 GGUF alone is 98 MB).
#   stage a (carry .lab-a: SmolLM2 GGUF part aa): copies it to /root/llmlab.
#   stage b (carry .lab-b: GGUF part ab, engine.xz (CUDA build), probe.xz, qwen2.5/ tokenizer):
#     1. probe cold-warm on SmolLM2 (real GGUF, bf16 on the GPU)           -> day-007 first_token_latency.md
#     2. probe bench, seed-001 burst (50 prompts, ~1356 in / ~343 out, Qwen2.5-1.5B shape, dummy
#        weights) under fcfs, fair and static, then probe compare          -> day-008-scheduling/
#     3. probe kv-scaling --lens 2k,4k,8k,16k,32k at the Qwen2.5-1.5B shape -> day-007 kv_cache_scaling.csv
#   Everything is packed into $OUT/lab.tgz (the tool returns at most 8 files).
# Prepare here (repository root): see scripts/gpu/prepare-lab.sh.
set -uo pipefail
OUT=${OUT:-/tmp/lab-out}
LAB=/root/llmlab
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STAGES=${STAGES:-coldwarm bench kvscaling}
mkdir -p "$OUT" "$LAB"
unpack() { xz -dc "$1" > "$2" 2>/dev/null || python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"; chmod +x "$2"; }

case "${1:-}" in
a)
    cp .lab-a/smolpart.* "$LAB/" && ls -la "$LAB"
    exit 0 ;;
b) ;;
*) echo "usage: $0 a|b" >&2; exit 2 ;;
esac

[ -f "$LAB/smolpart.aa" ] || { echo "machine went cold: $LAB/smolpart.aa missing, redo stage a"; exit 3; }
cp .lab-b/smolpart.* "$LAB/"
cat "$LAB"/smolpart.* > "$LAB/smollm2.gguf"
echo "$SHA  $LAB/smollm2.gguf" | sha256sum -c - || exit 4
unpack .lab-b/engine.xz "$LAB/engine"
unpack .lab-b/probe.xz "$LAB/probe"
cp -r .lab-b/qwen2.5 "$LAB/"
[ -f "$LAB/qwen2.5/tokenizer.json.xz" ] && unpack "$LAB/qwen2.5/tokenizer.json.xz" "$LAB/qwen2.5/tokenizer.json"
export ENGINE_BIN=$LAB/engine NCCL_NVLS_ENABLE=0
DAYS=$LAB/days
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
QWEN="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --tokenizer $LAB/qwen2.5 --device cuda"

wait_ready() {  # url, pid
    for _ in $(seq 1 600); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

if [[ " $STAGES " == *" coldwarm "* ]]; then
    echo "== 1. cold-warm, SmolLM2 on CUDA"
    timeout 240 "$LAB/probe" cold-warm --model "$LAB/smollm2.gguf" \
        --engine-args '--device cuda --max-model-len 2048' --out "$DAYS" 2>&1 | tail -40
fi

if [[ " $STAGES " == *" bench "* ]]; then
    echo "== 2. seed-001 burst under fcfs, fair, static (Qwen2.5-1.5B shape)"
    runs=()
    for pol in fcfs fair static; do
        port=$((8100 + ${#runs[@]}))
        "$LAB/engine" $QWEN --port $port --max-model-len 4096 --max-num-seqs 16 \
            --scheduling-policy $pol > "$OUT/serve-$pol.log" 2>&1 &
        pid=$!
        if wait_ready "http://127.0.0.1:$port" $pid; then
            timeout 240 "$LAB/probe" bench --base-url "http://127.0.0.1:$port" --label "$pol" \
                --request-rate inf --num-prompts 50 --dataset-name random \
                --random-input-len 1356 --random-output-len 343 --random-range-ratio 0.5 \
                --tokenizer "$LAB/qwen2.5/tokenizer.json" --seed 1 --no-progress \
                --out "$DAYS/day-008-scheduling/seed001-$pol" 2>&1 | tail -32
            runs+=("$DAYS/day-008-scheduling/seed001-$pol")
        else
            echo "engine ($pol) did not become ready"; tail -20 "$OUT/serve-$pol.log"
        fi
        kill $pid 2>/dev/null; wait $pid 2>/dev/null
        cp "$OUT/serve-$pol.log" "$DAYS/day-008-scheduling/" 2>/dev/null
    done
    [ ${#runs[@]} -ge 2 ] && "$LAB/probe" compare "${runs[@]}" --out "$DAYS/day-008-scheduling/compare" 2>&1 | tail -20
fi

if [[ " $STAGES " == *" kvscaling "* ]]; then
    echo "== 3. kv-scaling, Qwen2.5-1.5B shape"
    timeout 300 "$LAB/probe" kv-scaling --lens 2k,4k,8k,16k,32k --concurrency 1,4,16 \
        --requests-per-level 16 --max-tokens 32 --model configs/qwen2.5-1.5b-instruct.json \
        --engine-args "--load-format dummy --tokenizer $LAB/qwen2.5 --device cuda" \
        --out "$DAYS" 2>&1 | tail -30
fi

tar czf "$OUT/lab.tgz" -C "$DAYS" . && ls -la "$OUT"
