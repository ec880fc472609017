#!/usr/bin/env bash
# On the GPU machine, repository root: engine-bench with two sets of flags, alternating, at the
# Qwen2.5-1.5B shape (dummy bf16, CUDA graphs, context 1k), after optional CUDA tests. Carry
# .lab-p (engine-it.xz, engine-bench.xz from scripts/build-cuda.sh's .carry/). Writes
# $OUT/<RUN>/: cuda-tests.log, then eb-r<round>-a.* and eb-r<round>-b.*.
# env: RUN (default eb-ab), TESTS (engine-it filters; empty skips), TEST_TIMEOUT, ROUNDS
#      (default 2), BATCHES (default 1,8), A and B (the two runs' extra flags), EB (both runs'),
#      MODEL (default configs/qwen2.5-1.5b-instruct.json), ITERS (default 20), EB_TIMEOUT (120).
set -uo pipefail
OUT=${OUT:-/tmp/out}
RUN=${RUN:-eb-ab}
D=$OUT/$RUN
L=/root/ebab
mkdir -p "$D" "$L"
for f in engine-it engine-bench; do
    [ -f ".lab-p/$f.xz" ] && { xz -dc ".lab-p/$f.xz" > "$L/$f" && chmod +x "$L/$f"; }
done
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader | tee "$D/gpu.txt"
if [ -n "${TESTS:-}" ]; then
    echo "== CUDA tests: $TESTS"
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-150}" "$L/engine-it" --test-threads=1 --nocapture $TESTS \
        > "$D/cuda-tests.log" 2>&1
    echo "exit $?"
    grep -E "^test |test result|panicked" "$D/cuda-tests.log" | tail -20
fi
QW="--model ${MODEL:-configs/qwen2.5-1.5b-instruct.json} --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8} --prefill 16 --prefill-variants-max 0 --iters ${ITERS:-20} ${EB:-}"
for r in $(seq 1 "${ROUNDS:-2}"); do
    for v in a b; do
        flags=${A:-}; [ "$v" = b ] && flags=${B:-}
        echo "== round $r, $v: $flags"
        # shellcheck disable=SC2086
        timeout "${EB_TIMEOUT:-120}" "$L/engine-bench" $QW $EBF $flags --out "$D/eb-r$r-$v.md" > "$D/eb-r$r-$v.log" 2>&1
        echo "exit $?"; grep -E "^decode batch [0-9]+: |^decode batch [0-9]+, as served|^decode parts" "$D/eb-r$r-$v.log"
    done
done
