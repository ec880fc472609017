# Shared by the scripts of scripts/gpu (decode-step.sh, l2-prefetch.sh, eb-ab.sh, floor-table.sh,
# serve-tpot.sh, lab-runs.sh), sourced from the repository root on the GPU machine.

# run_dirs RUN_DEFAULT LAB: OUT (default /tmp/out), RUN (default RUN_DEFAULT), D=$OUT/$RUN for
# the results and L=LAB for the unpacked binaries, both made.
run_dirs() {
    OUT=${OUT:-/tmp/out}
    RUN=${RUN:-$1}
    D=$OUT/$RUN
    L=$2
    mkdir -p "$D" "$L"
}

# unpack_bins DIR NAME...: each carried .lab-p/NAME.xz that is there, unpacked to DIR/NAME.
unpack_bins() {
    local dir=$1 f
    shift
    for f in "$@"; do
        if [ -f ".lab-p/$f.xz" ]; then
            xz -dc ".lab-p/$f.xz" > "$dir/$f" && chmod +x "$dir/$f"
        fi
    done
}

# join_smollm2 DIR: SmolLM2's GGUF from part aa (left in /root/llmlab by `lab-runs.sh a` in a call
# just before, on the still-warm machine) and part ab (carried in .lab-p), sha256-checked, into
# DIR/smollm2.gguf; exports SMOLLM2_GGUF when both parts are there (the SmolLM2 tests skip otherwise).
join_smollm2() {
    local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if [ -f /root/llmlab/smolpart.aa ] && [ -f .lab-p/smolpart.ab ]; then
        cat /root/llmlab/smolpart.aa .lab-p/smolpart.ab > "$1/smollm2.gguf"
        echo "$sha  $1/smollm2.gguf" | sha256sum -c - && export SMOLLM2_GGUF=$1/smollm2.gguf
    else
        echo "SmolLM2 parts not both here: its tests will skip"
    fi
}

# gpu_line FILE: the GPU's name, driver, power limit and top SM clock, printed and into FILE.
gpu_line() {
    nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader \
        | tee "$1"
}

# cuda_tests BIN LOG FILTERS PATTERN LINES: the CUDA tests FILTERS of the engine-it binary BIN, one
# thread, under TEST_TIMEOUT seconds (150), into LOG; prints the exit status and the last LINES
# lines of LOG matching PATTERN. Nothing when FILTERS is empty.
cuda_tests() {
    [ -n "$3" ] || return 0
    echo "== CUDA tests: $3"
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-150}" "$1" --test-threads=1 --nocapture $3 > "$2" 2>&1
    echo "exit $?"
    grep -E "$4" "$2" | tail -"$5"
}

# eb_run SECONDS BIN OUT PATTERN ARG...: engine-bench BIN with ARG... under a time limit, its
# table into OUT.md and its output into OUT.log; prints the exit status and OUT.log's lines
# matching PATTERN.
eb_run() {
    local secs=$1 bin=$2 out=$3 pattern=$4
    shift 4
    timeout "$secs" "$bin" "$@" --out "$out.md" > "$out.log" 2>&1
    echo "exit $?"
    grep -E "$pattern" "$out.log"
}

# wait_ready URL PID [TRIES]: 0 once URL/health answers, 1 if the process PID exits first or
# TRIES half-second polls (default 1200) pass.
wait_ready() {
    for _ in $(seq 1 "${3:-1200}"); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}
