#!/usr/bin/env bash
# On the GPU machine, repository root: engine-bench with two sets of flags, alternating, at the
# Qwen2.5-1.5B shape (dummy bf16, CUDA graphs, context 1k), after optional CUDA tests. Carry
# .lab-p (engine-it.xz, engine-bench.xz from scripts/build-cuda.sh's .carry/). Writes
# $OUT/<RUN>/: cuda-tests.log, then eb-r<round>-a.* and eb-r<round>-b.*.
# env: RUN (default eb-ab), TESTS (engine-it filters; empty skips), TEST_TIMEOUT, ROUNDS
#      (default 2), BATCHES (default 1,8), A and B (the two runs' extra flags), EB (both runs'),
#      MODEL (default configs/qwen2.5-1.5b-instruct.json), ITERS (default 20), EB_TIMEOUT (120),
#      B_BIN (the b runs' binary from .lab-p, default engine-bench; e.g. engine-bench-base for an
#      earlier build).
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
run_dirs eb-ab /root/ebab
B_BIN=${B_BIN:-engine-bench}
unpack_bins "$L" engine-it engine-bench "$B_BIN"
join_smollm2 "$L"
gpu_line "$D/gpu.txt"
cuda_tests "$L/engine-it" "$D/cuda-tests.log" "${TESTS:-}" "^test |test result|panicked" 20
QW="--model ${MODEL:-configs/qwen2.5-1.5b-instruct.json} --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8} --prefill 16 --prefill-variants-max 0 --iters ${ITERS:-20} ${EB:-}"
for r in $(seq 1 "${ROUNDS:-2}"); do
    for v in a b; do
        flags=${A:-} bin=engine-bench
        [ "$v" = b ] && flags=${B:-} bin=$B_BIN
        echo "== round $r, $v ($bin): $flags"
        # shellcheck disable=SC2086
        eb_run "${EB_TIMEOUT:-120}" "$L/$bin" "$D/eb-r$r-$v" \
            "^decode batch [0-9]+: |^decode batch [0-9]+, as served|^decode parts" $QW $EBF $flags
    done
done
