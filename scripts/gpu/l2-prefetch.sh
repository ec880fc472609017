#!/usr/bin/env bash
# On the GPU machine, repository root: the L2 prefetch on a side stream (engine-bench
# --l2-prefetch) at the Qwen2.5-1.5B shape (dummy bf16, CUDA graphs, context 1k).
# Carry .lab-p: engine-it.xz (with the cuda_model module) and engine-bench.xz from
# scripts/build-cuda.sh (.carry/); optionally engine-bench-base.xz, an earlier build timed as
# served in the same call for comparison, and engine-bench-alt.xz, a build of a kernel variant
# (KERNEL_DEFINES) run with the same flags as engine-bench. Writes $OUT/<RUN>/: the CUDA test
# log, then ROUNDS rounds of (base build, this build with the sweep, the variant build).
# env: RUN (default l2-prefetch), TESTS (engine-it filters; empty skips), ROUNDS (default 1),
#      BATCHES (default 1,8), SPECS (GATE_UP:DOWN:O settings), EB (extra engine-bench flags).
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
run_dirs l2-prefetch /root/l2p
unpack_bins "$L" engine-it engine-bench engine-bench-base engine-bench-alt
gpu_line "$D/gpu.txt"
cuda_tests "$L/engine-it" "$D/cuda-tests.log" "${TESTS-cuda_model::cuda_l2_prefetch}" \
    "^test |test result|bit for bit|panicked|differ" 20
QW="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8} --prefill 16 --prefill-variants-max 0 --iters 20 ${EB:-}"
SPECS=${SPECS:-0:0:1,0.3:0:1,0.5:0:1,0.3:0.3:1,0.5:0.5:1,0.7:0:1}
for r in $(seq 1 "${ROUNDS:-1}"); do
    if [ -x "$L/engine-bench-base" ]; then
        echo "== round $r, base build"
        # shellcheck disable=SC2086
        eb_run 120 "$L/engine-bench-base" "$D/eb-r$r-base" \
            "^decode batch [0-9]+: |^decode batch [0-9]+, as served" $QW $EBF
    fi
    for b in engine-bench engine-bench-alt; do
        [ -x "$L/$b" ] || continue
        n=sweep; [ "$b" = engine-bench-alt ] && n=alt
        echo "== round $r, $b, L2 prefetch sweep $SPECS"
        # shellcheck disable=SC2086
        eb_run 200 "$L/$b" "$D/eb-r$r-$n" \
            "^decode batch [0-9]+: |^decode batch [0-9]+, (as served|L2 prefetch)|^projections alone" \
            $QW $EBF --l2-prefetch "$SPECS"
    done
done
