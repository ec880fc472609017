#!/usr/bin/env bash
# On the GPU machine, repository root: the engine's speed against the hardware floor on this GPU,
# after the CUDA tests. Carry .lab-p (engine-it.xz, engine-bench.xz from scripts/build-cuda.sh's
# .carry/; smolpart.ab too when `lab-runs.sh a` ran in the call just before, for the SmolLM2
# tests). Writes $OUT/<RUN>/:
#   gpu.txt, cuda-tests.log   the CUDA tests TESTS (engine-it filters; default: every test the
#                             binary holds; empty skips)
#   table-r<N>.md, .log       engine-bench at the Qwen2.5-1.5B shape (dummy bf16, CUDA graphs):
#                             decode at batch 1, 8, 32, 128 (context 1k) against the HBM floor and
#                             prefill of 1k and 4k tokens against the matmul floor, each floor from
#                             this GPU's measured copy bandwidth and bf16 TFLOP/s; TABLE_ROUNDS rounds
# env: RUN (default floor-table), TESTS, TEST_TIMEOUT (default 420), TABLE_ROUNDS (default 2),
#      BATCHES (default 1,8,32,128), PREFILL (default 1024,4096), ITERS (default 20),
#      EB (extra engine-bench flags), EB_TIMEOUT (default 300).
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
run_dirs floor-table /root/ftable
unpack_bins "$L" engine-it engine-bench
join_smollm2 "$L"
gpu_line "$D/gpu.txt"
TEST_TIMEOUT=${TEST_TIMEOUT:-420} cuda_tests "$L/engine-it" "$D/cuda-tests.log" "${TESTS- }" \
    "^test |test result|panicked" 60
QW="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8,32,128} --prefill ${PREFILL:-1024,4096}
     --prefill-variants-max 1024 --iters ${ITERS:-20} ${EB:-}"
for r in $(seq 1 "${TABLE_ROUNDS:-2}"); do
    echo "== table, round $r"
    # shellcheck disable=SC2086
    eb_run "${EB_TIMEOUT:-300}" "$L/engine-bench" "$D/table-r$r" \
        "^copy |^decode batch [0-9]+: |^prefill" $QW $EBF
done
