#!/usr/bin/env bash
# On the GPU machine: the engine's model on CUDA, in two back-to-back calls (one call carries at
# most 64 MiB, the SmolLM2 GGUF alone is 98 MB). Everything lands in $OUT.
#
#   stage a (carry .gguf-a: GGUF part 1 + engine-it.xz + engine-bench.xz):
#       copies them to /root/llmlab, runs the tiny-model CUDA-vs-CPU test and engine-bench.
#   stage b (carry .gguf-b: GGUF parts 2..n + engine.xz), right after a, on the still-warm machine:
#       joins and checks the GGUF, runs the SmolLM2 greedy test on the GPU, then serves it with
#       `engine --device cuda` and asks /health, /v1/completions, /v1/engine/startup, /metrics.
#
# Prepare here: scripts/build-cuda.sh with IT_MODULES="cuda_kernels cuda_model", then
#   split -b 45M SmolLM2-135M-Instruct.Q4_1.gguf smolpart.  (aa -> .gguf-a, the rest -> .gguf-b)
#   cp .carry/engine-it.xz .carry/engine-bench.xz .gguf-a/; cp .carry/engine.xz .gguf-b/
# Usage (repository root on the GPU machine): bash scripts/gpu/engine-check.sh a|b  (a0: stage a's copy only)
set -uo pipefail
OUT=${OUT:-/tmp/engine-check}
LAB=/root/llmlab
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$OUT" "$LAB"
unpack() {  # xz, or Python's lzma where xz is missing
    xz -dc "$1" > "$2" 2>/dev/null || python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
    chmod +x "$2"
}

case "${1:-}" in
a | a0)
    cp .gguf-a/smolpart.* "$LAB/"
    unpack .gguf-a/engine-it.xz "$LAB/engine-it"
    unpack .gguf-a/engine-bench.xz "$LAB/engine-bench"
    [ "$1" = a0 ] && { echo "copied part 1 and binaries to $LAB"; exit 0; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
    cat "$OUT/gpu.txt"
    echo "== tiny model: CUDA bf16 vs CPU f32"
    RUST_BACKTRACE=1 "$LAB/engine-it" cuda_model::cuda_bf16_logits_match_cpu_f32 --nocapture 2>&1 | tee "$OUT/cuda-model-tiny.log"
    echo "== engine-bench (Qwen2.5-1.5B shape, dummy weights, bf16)"
    RUST_BACKTRACE=1 timeout 420 "$LAB/engine-bench" --model configs/qwen2.5-1.5b-instruct.json \
        --load-format dummy --dtype bfloat16 --device cuda --out "$OUT/engine-bench.md" 2>&1 | tee "$OUT/engine-bench.log"
    ;;
b)
    [ -f "$LAB/smolpart.aa" ] || { echo "machine went cold: /root/llmlab/smolpart.aa missing, redo stage a"; exit 3; }
    cp .gguf-b/smolpart.* "$LAB/"
    unpack .gguf-b/engine.xz "$LAB/engine"
    cat "$LAB"/smolpart.* > "$LAB/smollm2.gguf"
    echo "$SHA  $LAB/smollm2.gguf" | sha256sum -c - || exit 4
    echo "== SmolLM2 greedy on CUDA bf16 (one test at a time: each test opens its own CUDA stream)"
    SMOLLM2_GGUF=$LAB/smollm2.gguf RUST_BACKTRACE=1 "$LAB/engine-it" cuda_model:: --nocapture --test-threads=1 2>&1 | tee "$OUT/cuda-model.log"
    echo "== the same, in parallel threads"
    SMOLLM2_GGUF=$LAB/smollm2.gguf "$LAB/engine-it" cuda_model:: --nocapture 2>&1 | tee "$OUT/cuda-model-parallel.log"
    echo "== engine --device cuda"
    RUST_LOG=info "$LAB/engine" "$LAB/smollm2.gguf" --device cuda --port 8765 --max-model-len 2048 \
        > "$OUT/serve.log" 2>&1 &
    pid=$!
    python3 - "$OUT" <<'EOF'
import json, sys, time, urllib.request
out = sys.argv[1]
base = "http://127.0.0.1:8765"
t0 = time.time()
while True:
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            break
    except Exception:
        pass
    if time.time() - t0 > 240:
        print("server not ready after 240 s"); sys.exit(1)
    time.sleep(0.5)
print(f"ready after {time.time() - t0:.1f} s of polling")
name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))
try:
    r = post("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                                       "max_tokens": 16, "temperature": 0})
    print("chat:", json.dumps(r)[:600])
except Exception as e:
    print("chat failed:", e)
t = time.time()
r = post("/v1/completions", {"model": name, "prompt": "Once upon a time", "max_tokens": 128, "temperature": 0, "ignore_eos": True})
dt = time.time() - t
print(f"completion of {r['usage']['completion_tokens']} tokens in {dt*1e3:.0f} ms ({r['usage']['completion_tokens']/dt:.0f} tok/s, batch 1 over HTTP)")
startup = json.load(urllib.request.urlopen(base + "/v1/engine/startup"))
open(out + "/startup.json", "w").write(json.dumps(startup, indent=1))
print("startup:", json.dumps(startup))
m = urllib.request.urlopen(base + "/metrics").read().decode()
open(out + "/metrics.txt", "w").write(m)
print("\n".join(l for l in m.splitlines() if "startup_phase" in l and not l.startswith("#")))
EOF
    kill "$pid"; wait "$pid" 2>/dev/null
    echo "== serve log"; cat "$OUT/serve.log" | head -40
    ;;
*) echo "usage: $0 a|b"; exit 2 ;;
esac
