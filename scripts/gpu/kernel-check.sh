#!/usr/bin/env bash
# On the GPU machine: unpacks the carried test binary (.carry/engine-it.xz, made by
# scripts/build-cuda.sh), runs the CUDA kernel tests, then the paged-attention decode benchmark.
# Everything lands in $OUT: gpu.txt, kernel-tests.log, decode-bench.md, bench.log.
# Usage (repository root on the GPU machine): bash scripts/gpu/kernel-check.sh
set -uo pipefail
OUT=${OUT:-/tmp/kernel-check}
mkdir -p "$OUT" /tmp/engine-bin
unpack() {  # xz, or Python's lzma where xz is missing
    xz -dc "$1" > "$2" 2>/dev/null || python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
    chmod +x "$2"
}
unpack .carry/engine-it.xz /tmp/engine-bin/engine-it || { echo "no .carry/engine-it.xz"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    nvidia-smi -q -d CLOCK | sed -n '1,40p'
} > "$OUT/gpu.txt" 2>&1
head -2 "$OUT/gpu.txt"
echo "== kernel tests"
RUST_BACKTRACE=1 /tmp/engine-bin/engine-it cuda_kernels:: --test-threads=1 --nocapture 2>&1 | tee "$OUT/kernel-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== decode benchmark"
KERNEL_BENCH_OUT=$OUT/decode-bench.md RUST_BACKTRACE=1 /tmp/engine-bin/engine-it \
    cuda_kernels::bench_paged_attention_decode --ignored --nocapture 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
