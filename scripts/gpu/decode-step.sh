#!/usr/bin/env bash
# On the GPU machine, repository root: the persistent decode step against the per-op launches.
# Carry .lab-p (engine-it.xz with the cuda_model module, engine-bench.xz; scripts/build-cuda.sh
# makes both under .carry/; optionally smolpart.ab, see below). Writes $OUT/<RUN>/: the CUDA test log, then engine-bench tables at
# the Qwen2.5-1.5B shape (dummy bf16, CUDA graphs, context 1k) with `--persistent-decode` and as
# served (per-op launches), alternating, ROUNDS rounds; with CL34=1 also CodeLlama-34B batch 1.
# env: RUN (default decode-step), TESTS (engine-it filters; empty skips), ROUNDS (default 2),
#      BATCHES (default 1,8), EB (extra engine-bench flags), CL34=1.
set -uo pipefail
# shellcheck source=scripts/gpu/common.sh
. scripts/gpu/common.sh
run_dirs decode-step /root/dstep
unpack_bins "$L" engine-it engine-bench
# SmolLM2 for the cuda_model tests: part aa left by `lab-runs.sh a` in a call just before, part ab
# carried here.
join_smollm2 "$L"
gpu_line "$D/gpu.txt"
cuda_tests "$L/engine-it" "$D/cuda-tests.log" "${TESTS-cuda_model::cuda_persistent}" \
    "^test |test result|relative|panicked|differ" 40
QW="--model configs/qwen2.5-1.5b-instruct.json --load-format dummy --dtype bfloat16 --device cuda"
EBF="--cuda-graphs --batch-sizes ${BATCHES:-1,8} --prefill 16 --prefill-variants-max 0 --iters 20 ${EB:-}"
for r in $(seq 1 "${ROUNDS:-2}"); do
    for v in persistent per-op; do
        w=""; [ "$v" = persistent ] && w="--persistent-decode"
        echo "== round $r, $v"
        # shellcheck disable=SC2086
        eb_run 120 "$L/engine-bench" "$D/eb-r$r-$v" \
            "^decode batch [0-9]+: |^decode batch 1, (as served|persistent)|^persistent step" $QW $EBF $w
    done
done
if [ "${CL34:-0}" = 1 ]; then
    CLF="--model configs/codellama-34b.json --load-format dummy --dtype bfloat16 --device cuda"
    for v in persistent per-op; do
        w=""; [ "$v" = persistent ] && w="--persistent-decode"
        echo "== CodeLlama-34B, $v"
        # shellcheck disable=SC2086
        eb_run 150 "$L/engine-bench" "$D/eb34-$v" "^decode batch [0-9]+: " $CLF --cuda-graphs \
            --batch-sizes 1 --prefill 16 --prefill-variants-max 0 --iters 5 $w
    done
fi
