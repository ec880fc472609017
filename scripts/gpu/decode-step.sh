#!/usr/bin/env bash
# On the GPU machine, repository root: the persistent decode step against the per-op launches.
# Carry .lab-p (engine-it.xz with the cuda_model module, engine-bench.xz; scripts/build-cuda.sh
# makes both under .carry/). Writes $OUT/<RUN>/: the CUDA test log, then engine-bench tables at
# the Qwen2.5-1.5B shape (dummy bf16, CUDA graphs, context 1k) as served and with
# `--without persistent`, alternating, ROUNDS rounds; with CL34=1 also CodeLlama-34B batch 1.
# env: RUN (default decode-step), TESTS (engine-it filters; empty skips), ROUNDS (default 2),
#      BATCHES (default 1,8), EB (extra engine-bench flags), CL34=1.
set -uo pipefail
OUT=${OUT:-/tmp/out}
RUN=${RUN:-decode-step}
D=$OUT/$RUN
L=/root/dstep
mkdir -p "$D" "$L"
for f in engine-it engine-bench; do
    [ -f ".lab-p/$f.xz" ] && { xz -dc ".lab-p/$f.xz" > "$L/$f" && chmod +x "$L/$f"; }
done
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader | tee "$D/gpu.txt"
if [ -n "${TESTS-cuda_model::cuda_persistent}" ]; then
    echo "== CUDA tests: ${TESTS-cuda_model::cuda_persistent}"
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-150}" "$L/engine-it" --test-threads=1 --nocapture \
        ${TESTS-cuda_model::cuda_persistent} > "$D/cuda-tests.log" 2>&1
    echo "exit $?"
    grep -E "^test |test result|relative|panicked|differ" "$D/cuda-tests.log" | tail -40
fi
QW="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8} --prefill 16 --prefill-variants-max 0 --iters 20 ${EB:-}"
for r in $(seq 1 "${ROUNDS:-2}"); do
    for v in served per-op; do
        w=""; [ "$v" = per-op ] && w="--without persistent"
        echo "== round $r, $v"
        # shellcheck disable=SC2086
        timeout 120 "$L/engine-bench" $QW $EBF $w --out "$D/eb-r$r-$v.md" > "$D/eb-r$r-$v.log" 2>&1
        echo "exit $?"; grep -E "^decode batch [0-9]+: |^decode batch 1, (as served|per-op)" "$D/eb-r$r-$v.log"
    done
done
if [ "${CL34:-0}" = 1 ]; then
    CLF="--model configs/codellama-34b.json --load-format dummy --dtype bfloat16 --device cuda"
    for v in served per-op; do
        w=""; [ "$v" = per-op ] && w="--without persistent"
        echo "== CodeLlama-34B, $v"
        # shellcheck disable=SC2086
        timeout 150 "$L/engine-bench" $CLF --cuda-graphs --batch-sizes 1 --prefill 16 \
            --prefill-variants-max 0 --iters 5 $w --out "$D/eb34-$v.md" > "$D/eb34-$v.log" 2>&1
        echo "exit $?"; grep -E "^decode batch [0-9]+: " "$D/eb34-$v.log"
    done
fi
