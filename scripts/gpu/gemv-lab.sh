#!/usr/bin/env bash
# GPU machine, repository root: builds scripts/gpu/gemv-lab.cu with the machine's nvcc and runs
# scripts/gpu/gemv-lab.py (timings into $OUT/lab.md), then Nsight Compute over the kernels whose
# label holds each of NCU_ONLY's ';'-separated strings (default: the served ones), into $OUT.
set -u
T=$(mktemp -d)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader
"$NVCC" --cubin -O3 -std=c++17 -arch=sm_90 ${LAB_DEFINES:-} -o "$T/lab.cubin" scripts/gpu/gemv-lab.cu || exit 1
timeout "${LAB_TIMEOUT:-240}" python3 scripts/gpu/gemv-lab.py "$T/lab.cubin" ${LAB_ARGS:-} | tee "$OUT/lab.md"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
IFS=';' read -ra ONLY <<< "${NCU_ONLY-(served)}"
i=0
for only in "${ONLY[@]}"; do
    i=$((i + 1))
    timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section LaunchStats python3 scripts/gpu/gemv-lab.py "$T/lab.cubin" --ncu --only "$only" \
        > "$OUT/ncu-$i.txt" 2>&1
    echo "ncu $i ($only): exit $?"
done
