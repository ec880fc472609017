#!/usr/bin/env bash
# On the GPU machine: the probe's lab experiments against our engine on CUDA, in back-to-back
# calls (a call carries at most 64 MiB; the SmolLM2 GGUF alone is 98 MB). Prepare the carried
# folders here with scripts/gpu/prepare-lab.sh, then on the device machine, repository root:
#
#   a (carry .lab-a: GGUF part aa)           copies it to /root/llmlab (the machine stays warm ~30 s)
#   b (carry .lab-b: GGUF part ab, engine, probe, engine-it, Qwen2.5 tokenizer), right after a:
#       0. CUDA tests: kernels vs CPU references, GPU KV swap, tiny-model and SmolLM2 logits/greedy
#       1. probe cold-warm on SmolLM2 (real GGUF, bf16)                       -> day-007-vllm-runtime-probes/
#       2. probe bench, seed-001 burst (50 prompts, ~1356 in / ~343 out, Qwen2.5-1.5B shape, dummy
#          weights, --max-num-seqs 16) under fcfs, fair, static, adaptive; probe compare -> day-008-scheduling/
#       3. probe kv-scaling --lens 2k,4k,8k,16k,32k at the Qwen2.5-1.5B shape  -> day-007-vllm-runtime-probes/
#   c (carry .lab-c: engine, probe, Qwen2.5 and Llama-2 tokenizers, optionally engine-it):
#       0. the CUDA tests again when engine-it is carried (SmolLM2 ones need stage b's GGUF)
#       1. the four-policy Qwen2.5 comparison again (QWEN_POLICIES=0 skips it)
#       2. CodeLlama-34B shape (dummy, bf16; needs the H200's 141 GB): the seed-001 burst under
#          fcfs, fair and static, probe compare                              -> day-009-codellama34b/
#       3. kv-scaling 2k..16k at the CodeLlama-34B shape with the time left
#   d (carry .lab-d: engine, probe, engine-bench, tokenizers): engine-bench; fair quantum 8 vs 16
#   e (carry .lab-e: engine, probe, engine-it with cuda_tp + cuda_model, Qwen2.5 tokenizer):
#       0. CUDA tests: TP=2 ranks on one GPU vs TP=1, NCCL one-rank group, tiny-model logits
#       1. `-tp 2` on a one-GPU machine: the startup refusal
#       2. fcfs vs fair (quantum 16, 8), seed-001 burst, ROUNDS rounds side by side (Qwen2.5-1.5B shape)
#       3. prefix caching on vs off: shared-prefix load (Qwen2.5-1.5B shape)  -> day-010-prefix-caching/
#   f (carry .lab-f: engine, probe, Qwen2.5 and Llama-2 tokenizers): the engine's exit on SIGINT right
#       after a burst was cut off mid-run, twice each at the CodeLlama-34B and Qwen2.5-1.5B shapes
#   g (carry .lab-g: engine-it with cuda_kernels/cuda_fused/cuda_model, engine-bench, optionally
#     engine, probe, the Llama-2 tokenizer and GGUF part ab after stage a): -> gpu-engine/$RUN/
#     (env: RUN (default run4), BENCH_QWEN=0, BENCH_34B=0, EB_FLAGS for the Qwen2.5 engine-bench, PER_POLICY,
#     CL_POLICIES, FAIR2="suffix|flags", TESTS to replace the CUDA test filters, TEST_TIMEOUT, BUDGET,
#     EB34_FLAGS to replace the CodeLlama-34B engine-bench's sizes, EB2_FLAGS for a second Qwen2.5
#     engine-bench with other flags -> engine-bench-2.md)
#       0. CUDA tests: attention kernels (paged and tensor-core prefill), fused ops, tiny-model
#          logits, and SmolLM2 logits/greedy when stage a ran first
#       1. engine-bench at the Qwen2.5-1.5B shape; 2. engine-bench at the CodeLlama-34B shape
#       3. (engine + probe carried) fcfs vs fair, seed-001 burst, CodeLlama-34B shape -> day-009-codellama34b/$RUN/
#   h (carry .lab-h: engine, probe, both tokenizers): ROUNDS rounds of VARIANTS (default fcfs, fair
#     --fair-first-token-quantum 1 and fair; a variant is a policy or policy:ftq1) at the
#     CodeLlama-34B shape, order alternating, then QWEN_ROUNDS rounds of QWEN_VARIANTS at the
#     Qwen2.5-1.5B shape
#     -> day-009-codellama34b/$RUN/, day-008-scheduling/$RUN/
#
# EXTRA_FLAGS (any stage) are added to every engine command line of the bursts, e.g.
# EXTRA_FLAGS="--max-num-batched-tokens 8192".
#
# Every step has a time limit inside the call's 10 minutes; results are packed into $OUT/lab.tgz
# (days/ tree) beside the server logs.
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
OUT=${OUT:-/tmp/lab-out}
LAB=/root/llmlab
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
BUDGET=${BUDGET:-555}   # seconds this call may use before packing
# The engine command lines of every burst (dummy weights, the seed-001 settings).
QWEN="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --tokenizer $LAB/qwen2.5 --device cuda --max-model-len 4096 --max-num-seqs 16 ${EXTRA_FLAGS:-}"
CL="--model configs/codellama-34b.json --load-format dummy --tokenizer $LAB/llama2 --device cuda --max-model-len 4096 --max-num-seqs 16 ${EXTRA_FLAGS:-}"
mkdir -p "$OUT" "$LAB"
DAYS=$LAB/days
mkdir -p "$DAYS"
export NCCL_NVLS_ENABLE=0 RUST_BACKTRACE=0
left() { echo $((BUDGET - SECONDS)); }
unpack() {  # xz, or Python's lzma where xz is missing
    xz -dc "$1" > "$2" 2>/dev/null ||
        python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
    chmod +x "$2"
}
pack() {
    tar czf "$OUT/lab-$STAGE.tgz" -C "$DAYS" . 2>/dev/null
    ls -la "$OUT"
}
trap pack EXIT


# bench_policies DAYDIR ENGINE_FLAGS TOKENIZER_JSON SECONDS_PER_POLICY POLICY...
bench_policies() {
    local dir=$1 flags=$2 tok=$3 per=$4; shift 4
    local runs=() port=8100
    mkdir -p "$dir"
    for pol in "$@"; do
        local label="$pol${SUFFIX:-}"
        if [ "$(left)" -lt $((per + 30)) ]; then echo "skipping $label: $(left) s left"; continue; fi
        port=$((port + 1))
        # shellcheck disable=SC2086
        RUST_LOG=${ENGINE_RUST_LOG:-info} "$LAB/engine" $flags --port $port --scheduling-policy "$pol" \
            > "$dir/serve-$label.log" 2>&1 &
        local pid=$!
        if wait_ready "http://127.0.0.1:$port" $pid; then
            grep -E "KV cache size|Maximum concurrency|Engine ready" "$dir/serve-$label.log" | sed 's/^.*INFO[^:]*: //'
            timeout -s INT "$per" "$LAB/probe" bench --base-url "http://127.0.0.1:$port" --label "$label" \
                --request-rate inf --num-prompts 50 --dataset-name random \
                --random-input-len 1356 --random-output-len 343 --random-range-ratio 0.5 \
                --tokenizer "$tok" --seed 1 --no-progress --request-timeout "$per" \
                --out "$dir/seed001-$label" > "$dir/bench-$label.txt" 2>&1
            echo "bench $label: exit $?"; head -16 "$dir/bench-$label.txt"
            curl -s "http://127.0.0.1:$port/metrics" > "$dir/metrics-$label.txt"
            grep -E "^(vllm:num_preemptions_total|vllm:num_swaps_total|engine_swap_bytes_total)" "$dir/metrics-$label.txt"
            runs+=("$dir/seed001-$label")
        else
            echo "engine ($label) did not become ready"; tail -20 "$dir/serve-$label.log"
        fi
        kill -INT $pid 2>/dev/null; sleep 1; kill $pid 2>/dev/null; wait $pid 2>/dev/null
    done
}

compare_runs() {  # DAYDIR: one report over every seed001-* run folder in it
    local runs=("$1"/seed001-*)
    [ ${#runs[@]} -ge 2 ] && [ -d "${runs[0]}" ] &&
        "$LAB/probe" compare "${runs[@]}" --out "$1/compare" 2>&1 | tail -20
}

STAGE=${1:-}
case "$STAGE" in
a)
    cp .lab-a/smolpart.* "$LAB/" && ls -la "$LAB"
    trap - EXIT
    exit 0 ;;
b)
    [ -f "$LAB/smolpart.aa" ] || { echo "machine went cold: $LAB/smolpart.aa missing, redo stage a"; trap - EXIT; exit 3; }
    cp .lab-b/smolpart.* "$LAB/"
    cat "$LAB"/smolpart.* > "$LAB/smollm2.gguf"
    echo "$SHA  $LAB/smollm2.gguf" | sha256sum -c - || exit 4
    ;;
d|e|f|h) ;;
g)
    if [ -f "$LAB/smolpart.aa" ] && [ -f .lab-g/smolpart.ab ]; then
        cp .lab-g/smolpart.ab "$LAB/" && cat "$LAB"/smolpart.* > "$LAB/smollm2.gguf"
        echo "$SHA  $LAB/smollm2.gguf" | sha256sum -c - || rm -f "$LAB/smollm2.gguf"
    fi
    ;;
c)
    # Optional: SmolLM2 for the CUDA tests when stage a ran first on this machine.
    if [ -f "$LAB/smolpart.aa" ] && [ -f .lab-c/smolpart.ab ]; then
        cp .lab-c/smolpart.ab "$LAB/" && cat "$LAB"/smolpart.* > "$LAB/smollm2.gguf"
        echo "$SHA  $LAB/smollm2.gguf" | sha256sum -c - || rm -f "$LAB/smollm2.gguf"
    fi
    ;;
*) echo "usage: $0 a|b|c|d|e|f|g" >&2; trap - EXIT; exit 2 ;;
esac

for f in engine probe engine-it engine-bench; do
    [ -f ".lab-$STAGE/$f.xz" ] && unpack ".lab-$STAGE/$f.xz" "$LAB/$f"
done
for t in qwen2.5 llama2; do
    if [ -d ".lab-$STAGE/$t" ]; then
        mkdir -p "$LAB/$t" && cp .lab-"$STAGE"/$t/* "$LAB/$t/"
        [ -f "$LAB/$t/tokenizer.json.xz" ] && unpack "$LAB/$t/tokenizer.json.xz" "$LAB/$t/tokenizer.json"
    fi
done
export ENGINE_BIN=$LAB/engine
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
cp "$OUT/gpu.txt" "$DAYS/gpu-$STAGE.txt"

if [ "$STAGE" = b ]; then
    echo "== 0. CUDA tests (kernels, KV swap, model logits and greedy)"
    if [ -x "$LAB/engine-it" ]; then
        SMOLLM2_GGUF=$LAB/smollm2.gguf timeout 150 "$LAB/engine-it" --test-threads=1 --nocapture \
            > "$DAYS/cuda-tests.log" 2>&1
        grep -E "^test |test result|relative|greedy|restored|argmax" "$DAYS/cuda-tests.log" | tail -40
    fi

    echo "== 1. cold-warm, SmolLM2 on CUDA"
    timeout -s INT 150 "$LAB/probe" cold-warm --model "$LAB/smollm2.gguf" \
        --engine-args '--device cuda --max-model-len 2048' --out "$DAYS" 2>&1 | tail -25

    echo "== 2. seed-001 burst under four policies (Qwen2.5-1.5B shape)"
    bench_policies "$DAYS/day-008-scheduling" "$QWEN" "$LAB/qwen2.5/tokenizer.json" 90 fcfs fair static adaptive
    compare_runs "$DAYS/day-008-scheduling"

    echo "== 3. kv-scaling, Qwen2.5-1.5B shape ($(left) s left)"
    if [ "$(left)" -gt 60 ]; then
        timeout -s INT $(($(left) - 15)) "$LAB/probe" kv-scaling --lens 2k,4k,8k,16k,32k --concurrency 1,4,16 \
            --requests-per-level 16 --max-tokens 32 --model configs/qwen2.5-1.5b-instruct.json \
            --engine-args "--load-format dummy --tokenizer $LAB/qwen2.5 --device cuda" \
            --out "$DAYS" 2>&1 | tail -30
    fi
fi

if [ "$STAGE" = c ]; then
    if [ -x "$LAB/engine-it" ]; then
        echo "== 0. CUDA tests"
        SMOLLM2_GGUF=$LAB/smollm2.gguf timeout 90 "$LAB/engine-it" --test-threads=1 --nocapture \
            > "$DAYS/cuda-tests.log" 2>&1
        grep -E "^test |test result|greedy|top-3|restored|argmax" "$DAYS/cuda-tests.log" | tail -30
    fi
    if [ "${QWEN_POLICIES:-1}" = 1 ]; then
        echo "== 1. seed-001 burst under four policies (Qwen2.5-1.5B shape)"
        bench_policies "$DAYS/day-008-scheduling" "$QWEN" "$LAB/qwen2.5/tokenizer.json" 60 fcfs fair static adaptive
        compare_runs "$DAYS/day-008-scheduling"
    fi
    echo "== 2. seed-001 burst, CodeLlama-34B shape (dummy, bf16)"
    bench_policies "$DAYS/day-009-codellama34b" "$CL" "$LAB/llama2/tokenizer.json" 120 fcfs fair static
    compare_runs "$DAYS/day-009-codellama34b"
    echo "== 3. kv-scaling, CodeLlama-34B shape ($(left) s left)"
    if [ "$(left)" -gt 90 ]; then
        timeout -s INT $(($(left) - 15)) "$LAB/probe" kv-scaling --lens 2k,4k,8k,16k --concurrency 1,8 \
            --requests-per-level 8 --max-tokens 32 --model configs/codellama-34b.json \
            --engine-args "--load-format dummy --tokenizer $LAB/llama2 --device cuda" \
            --day day-009-codellama34b --out "$DAYS" 2>&1 | tail -30
    fi
fi
if [ "$STAGE" = d ]; then
    echo "== 1. engine-bench, Qwen2.5-1.5B shape (decode/prefill against the floors)"
    timeout 150 "$LAB/engine-bench" --model configs/qwen2.5-1.5b-instruct.json --load-format dummy \
        --dtype bfloat16 --device cuda --out "$DAYS/engine-bench.md" > "$DAYS/engine-bench.log" 2>&1
    tail -22 "$DAYS/engine-bench.log"
    echo "== 2. fair quantum 16 vs 8 beside fcfs, Qwen2.5-1.5B shape"
    bench_policies "$DAYS/fair-quantum-qwen" "$QWEN" "$LAB/qwen2.5/tokenizer.json" 45 fcfs fair
    SUFFIX=-q8 bench_policies "$DAYS/fair-quantum-qwen" "$QWEN --fair-quantum 8" "$LAB/qwen2.5/tokenizer.json" 45 fair
    compare_runs "$DAYS/fair-quantum-qwen"
    echo "== 3. fair quantum 8, CodeLlama-34B shape"
    SUFFIX=-q8 bench_policies "$DAYS/fair-quantum-codellama34b" "$CL --fair-quantum 8" "$LAB/llama2/tokenizer.json" 100 fair
fi
if [ "$STAGE" = e ]; then
    # libnccl from the machine's Python packages (nvidia-nccl-cu13), under the name cudarc opens.
    ncl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
    mkdir -p "$LAB/nccl" && [ -n "$ncl" ] && ln -sf "$ncl/libnccl.so.2" "$LAB/nccl/libnccl.so"
    export LD_LIBRARY_PATH=$LAB/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "== 0. CUDA tests: tensor parallelism on one GPU, NCCL, tiny-model logits"
    timeout 120 "$LAB/engine-it" --test-threads=1 --nocapture cuda_tp cuda_bf16_logits \
        > "$DAYS/cuda-tests-tp.log" 2>&1
    grep -E "^test |test result|relative|panicked" "$DAYS/cuda-tests-tp.log" | tail -20
    echo "== 1. -tp 2 on a one-GPU machine"
    # shellcheck disable=SC2086
    timeout 60 "$LAB/engine" $QWEN -tp 2 --port 8199 > "$DAYS/tp2-one-gpu.log" 2>&1
    echo "exit $?"; tail -2 "$DAYS/tp2-one-gpu.log"
    echo "== 2. fcfs vs fair (quantum 16 and 8), ${ROUNDS:=3} rounds (Qwen2.5-1.5B shape)"
    for r in $(seq 1 "$ROUNDS"); do
        SUFFIX=-r$r bench_policies "$DAYS/day-008-scheduling/rounds" "$QWEN" "$LAB/qwen2.5/tokenizer.json" 40 fcfs fair
        SUFFIX=-q8-r$r bench_policies "$DAYS/day-008-scheduling/rounds" "$QWEN --fair-quantum 8" "$LAB/qwen2.5/tokenizer.json" 40 fair
    done
    compare_runs "$DAYS/day-008-scheduling/rounds"
    echo "== 3. prefix caching on vs off ($(left) s left)"
    dir=$DAYS/day-010-prefix-caching/gpu-h200
    mkdir -p "$dir"
    port=8300
    for mode in on off; do
        [ "$(left)" -gt 60 ] || { echo "skipping cache-$mode: $(left) s left"; continue; }
        port=$((port + 1))
        flag=--enable-prefix-caching; [ "$mode" = off ] && flag=--no-enable-prefix-caching
        # shellcheck disable=SC2086
        "$LAB/engine" $QWEN $flag --port $port > "$dir/serve-cache-$mode.log" 2>&1 &
        pid=$!
        if wait_ready "http://127.0.0.1:$port" $pid; then
            # 8 groups x 8 prompts: a 2048-token shared system prompt + a 64-token question, 32
            # tokens out, Poisson arrivals at 4 requests/s.
            timeout -s INT 50 "$LAB/probe" bench --base-url "http://127.0.0.1:$port" --label "cache-$mode" \
                --dataset-name shared-prefix --num-groups 8 --num-prompts-per-group 8 \
                --system-prompt-len 2048 --question-len 64 --output-len 32 --request-rate 4 \
                --tokenizer "$LAB/qwen2.5/tokenizer.json" --seed 3 --no-progress --request-timeout 45 \
                --out "$dir/cache-$mode" > "$dir/bench-cache-$mode.txt" 2>&1
            grep -E "Successful|Failed|Prefix-cached|Mean TTFT|Median TTFT|P99 TTFT|Mean TPOT" "$dir/bench-cache-$mode.txt"
            curl -s "http://127.0.0.1:$port/metrics" | grep -E "^vllm:prefix_cache_(queries|hits)_total" | tee "$dir/prefix-cache-$mode.txt"
        else
            echo "engine (cache-$mode) did not become ready"; tail -5 "$dir/serve-cache-$mode.log"
        fi
        kill -INT $pid 2>/dev/null; sleep 1; kill $pid 2>/dev/null; wait $pid 2>/dev/null
    done
    [ -d "$dir/cache-off" ] && "$LAB/probe" compare "$dir/cache-on" "$dir/cache-off" --out "$dir/compare" | tail -3
fi
if [ "$STAGE" = g ]; then
    RUN=${RUN:-run4}  # results folder under gpu-engine/ and day-009-codellama34b/
    dir=$DAYS/gpu-engine/$RUN
    mkdir -p "$dir"
    cp "$OUT/gpu.txt" "$dir/gpu.txt"
    { lscpu | grep -E "^Model name|^CPU\(s\)|^CPU max MHz"; } >> "$dir/gpu.txt" 2>/dev/null
    echo "== 0. CUDA tests: attention kernels, fused ops, model logits and greedy"
    tests=${TESTS:-cuda_kernels cuda_fused cuda_bf16_logits}
    [ -z "${TESTS:-}" ] && [ -f "$LAB/smollm2.gguf" ] && tests="$tests cuda_smollm2"
    # shellcheck disable=SC2086
    SMOLLM2_GGUF=$LAB/smollm2.gguf timeout ${TEST_TIMEOUT:-240} "$LAB/engine-it" --test-threads=${TEST_THREADS:-2} --nocapture $tests \
        > "$dir/cuda-tests.log" 2>&1
    grep -E "^test |test result|panicked" "$dir/cuda-tests.log" | tail -30
    echo "== 1. engine-bench, Qwen2.5-1.5B shape ($(left) s left)"
    if [ "${BENCH_QWEN:-1}" = 1 ]; then
        timeout 240 "$LAB/engine-bench" --model configs/qwen2.5-1.5b-instruct.json --load-format dummy \
            --dtype bfloat16 --device cuda --prefill 1024,2048,4096 ${EB_FLAGS:-} --out "$dir/engine-bench.md" > "$dir/engine-bench.log" 2>&1
        tail -24 "$dir/engine-bench.log"
    fi
    if [ -n "${EB2_FLAGS:-}" ]; then
        echo "== 1b. engine-bench again, Qwen2.5-1.5B shape, $EB2_FLAGS ($(left) s left)"
        # shellcheck disable=SC2086
        timeout 200 "$LAB/engine-bench" --model configs/qwen2.5-1.5b-instruct.json --load-format dummy \
            --dtype bfloat16 --device cuda $EB2_FLAGS --out "$dir/engine-bench-2.md" > "$dir/engine-bench-2.log" 2>&1
        tail -24 "$dir/engine-bench-2.log"
    fi
    # SM clock, power and temperature every 200 ms from here on (sustained-load throttling).
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 200 \
        > "$dir/smi.csv" 2>/dev/null &
    smi=$!
    echo "== 2. engine-bench, CodeLlama-34B shape ($(left) s left)"
    if [ "${BENCH_34B:-1}" = 1 ] && [ "$(left)" -gt 200 ]; then
        # shellcheck disable=SC2086
        timeout 180 "$LAB/engine-bench" --model configs/codellama-34b.json --load-format dummy \
            --dtype bfloat16 --device cuda ${EB34_FLAGS:---batch-sizes 1,16 --prefill 1024,2048 --iters 5} \
            --out "$dir/engine-bench-codellama34b.md" > "$dir/engine-bench-codellama34b.log" 2>&1
        tail -20 "$dir/engine-bench-codellama34b.log"
    fi
    if [ -x "$LAB/engine" ] && [ -x "$LAB/probe" ] && [ -f "$LAB/llama2/tokenizer.json" ]; then
        echo "== 3. fcfs vs fair, seed-001 burst, CodeLlama-34B shape ($(left) s left)"
        # One line per engine step in the serve logs (composition and milliseconds).
        export ENGINE_RUST_LOG=${ENGINE_RUST_LOG:-info,engine::core=debug}
        # Optional first fair run with other flags, e.g. FAIR2="-ftq1|--fair-first-token-quantum 1".
        if [ -n "${FAIR2:-}" ]; then
            SUFFIX=${FAIR2%%|*} bench_policies "$DAYS/day-009-codellama34b/$RUN" "$CL ${FAIR2#*|}" \
                "$LAB/llama2/tokenizer.json" "${PER_POLICY:-110}" fair
        fi
        bench_policies "$DAYS/day-009-codellama34b/$RUN" "$CL" "$LAB/llama2/tokenizer.json" "${PER_POLICY:-110}" ${CL_POLICIES:-fair fcfs}
        compare_runs "$DAYS/day-009-codellama34b/$RUN"
    fi
    kill $smi 2>/dev/null
fi
if [ "$STAGE" = h ]; then
    # Side-by-side rounds, order alternating between rounds (the GPU's clock under a sustained load
    # depends on what ran just before): fcfs, fair and fair --fair-first-token-quantum 1 at the
    # CodeLlama-34B shape, then at the Qwen2.5-1.5B shape.
    export ENGINE_RUST_LOG=${ENGINE_RUST_LOG:-info,engine::core=debug}
    FTQ="--fair-first-token-quantum 1"
    round() {  # DIR FLAGS TOKENIZER SECONDS ROUND VARIANT... (VARIANT = policy or policy:ftq1)
        local dir=$1 flags=$2 tok=$3 per=$4 r=$5; shift 5
        for v in "$@"; do
            case $v in
                *:ftq1) SUFFIX=-ftq1-r$r bench_policies "$dir" "$flags $FTQ" "$tok" "$per" "${v%%:*}" ;;
                *) SUFFIX=-r$r bench_policies "$dir" "$flags" "$tok" "$per" "$v" ;;
            esac
        done
        local runs=("$dir"/seed001-*-r$r)
        [ ${#runs[@]} -ge 2 ] && "$LAB/probe" compare "${runs[@]}" --out "$dir/compare-r$r" 2>&1 | tail -3
    }
    # VARIANTS / QWEN_VARIANTS: the round's runs in odd rounds' order (even rounds reverse it).
    rev() { local out=""; for v in "$@"; do out="$v $out"; done; echo "$out"; }
    for r in $(seq 1 "${ROUNDS:-2}"); do
        # shellcheck disable=SC2086
        if [ $((r % 2)) = 1 ]; then order=${VARIANTS:-fcfs fair:ftq1 fair}; else order=$(rev ${VARIANTS:-fcfs fair:ftq1 fair}); fi
        # shellcheck disable=SC2086
        round "$DAYS/day-009-codellama34b/${RUN:-rounds}" "$CL" "$LAB/llama2/tokenizer.json" "${PER_POLICY:-100}" "$r" $order
    done
    if [ -f "$LAB/qwen2.5/tokenizer.json" ]; then
        for r in $(seq 1 "${QWEN_ROUNDS:-0}"); do
            # shellcheck disable=SC2086
            if [ $((r % 2)) = 1 ]; then order=${QWEN_VARIANTS:-fcfs fair fair:ftq1}; else order=$(rev ${QWEN_VARIANTS:-fcfs fair fair:ftq1}); fi
            # shellcheck disable=SC2086
            round "$DAYS/day-008-scheduling/${RUN:-rounds}" "$QWEN" "$LAB/qwen2.5/tokenizer.json" 60 "$r" $order
        done
    fi
fi
if [ "$STAGE" = f ]; then
    dir=$DAYS/day-011-tensor-parallel/sigint-exit
    mkdir -p "$dir"
    port=8400
    for run in cl-1 cl-2 qwen-1 qwen-2; do
        case $run in cl-*) flags=$CL tok=$LAB/llama2/tokenizer.json ;; *) flags=$QWEN tok=$LAB/qwen2.5/tokenizer.json ;; esac
        port=$((port + 1))
        # shellcheck disable=SC2086
        "$LAB/engine" $flags --port $port > "$dir/serve-$run.log" 2>&1 &
        pid=$!
        wait_ready "http://127.0.0.1:$port" $pid || { echo "$run: not ready"; continue; }
        "$LAB/probe" bench --base-url "http://127.0.0.1:$port" --request-rate inf --num-prompts 50 \
            --dataset-name random --random-input-len 1356 --random-output-len 343 --random-range-ratio 0.5 \
            --tokenizer "$tok" --seed 1 --no-progress --out "$dir/bench-$run" > "$dir/bench-$run.txt" 2>&1 &
        bpid=$!
        sleep 6
        kill -INT $bpid; sleep 0.5; kill -INT $pid
        t0=$SECONDS; wait $pid; code=$?
        echo "$run: engine exit status $code after SIGINT ($((SECONDS - t0)) s to exit)" | tee -a "$dir/exits.txt"
        wait $bpid 2>/dev/null
    done
fi
echo "== done after $SECONDS s"
