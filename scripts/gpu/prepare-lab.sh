#!/usr/bin/env bash
# Here (CPU machine, repository root): fill the folders that scripts/gpu/lab-runs.sh carries to the
# GPU machine, each under the 64 MiB a call carries.
#   needs: .carry/{engine,engine-it}.xz from scripts/build-cuda.sh (IT_MODULES="cuda_kernels cuda_model"),
#          target/debug/probe (cargo build -p probe), the SmolLM2 GGUF (scripts/fetch-model.sh),
#          the Qwen2.5 and Llama-2 tokenizers (scripts/fetch-tokenizer.sh, scripts/fetch-llama-tokenizer.sh).
#   makes: .lab-a (GGUF part aa), .lab-b (GGUF part ab, engine, probe, engine-it, Qwen2.5 tokenizer),
#          .lab-c (engine, probe, engine-it, Qwen2.5 and Llama-2 tokenizers),
#          .lab-e (engine, probe, engine-it, Qwen2.5 tokenizer), .lab-f (engine, probe, both tokenizers),
#          .lab-g (engine, probe, engine-it, engine-bench, Llama-2 tokenizer; engine-it built with
#          IT_MODULES="cuda_kernels cuda_model cuda_fused"), .lab-h (as .lab-f)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
GGUF=${SMOLLM2_GGUF:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PROBE=${PROBE_BIN:-target/debug/probe}
for f in .carry/engine.xz .carry/engine-it.xz "$PROBE" "$GGUF" \
    .cache/tokenizers/qwen2.5/tokenizer.json .cache/tokenizers/llama2/tokenizer.json; do
    [ -f "$f" ] || { echo "missing $f (see the header of this script)" >&2; exit 1; }
done
rm -rf .lab-a .lab-b .lab-c .lab-e .lab-f .lab-g .lab-h
mkdir -p .lab-a .lab-b/qwen2.5 .lab-c/llama2
split -b 60M "$GGUF" .lab-a/smolpart.
mv .lab-a/smolpart.ab .lab-b/
strip -o .lab-b/probe "$PROBE" && xz -6 -T2 -f .lab-b/probe
cp .carry/engine.xz .carry/engine-it.xz .lab-b/
xz -6 -T2 -c .cache/tokenizers/qwen2.5/tokenizer.json > .lab-b/qwen2.5/tokenizer.json.xz
cp .cache/tokenizers/qwen2.5/tokenizer_config.json .lab-b/qwen2.5/
cp .lab-b/engine.xz .lab-b/probe.xz .lab-b/engine-it.xz .lab-c/
cp -r .lab-b/qwen2.5 .lab-c/
cp .lab-b/smolpart.ab .lab-c/
xz -6 -T2 -c .cache/tokenizers/llama2/tokenizer.json > .lab-c/llama2/tokenizer.json.xz
cp .cache/tokenizers/llama2/tokenizer_config.json .lab-c/llama2/
mkdir -p .lab-e
cp .lab-b/engine.xz .lab-b/probe.xz .lab-b/engine-it.xz .lab-e/
cp -r .lab-b/qwen2.5 .lab-e/
mkdir -p .lab-f
cp .lab-b/engine.xz .lab-b/probe.xz .lab-f/
cp -r .lab-b/qwen2.5 .lab-c/llama2 .lab-f/
cp -r .lab-f .lab-h
mkdir -p .lab-g
cp .lab-b/engine.xz .lab-b/probe.xz .lab-b/engine-it.xz .lab-g/
[ -f .carry/engine-bench.xz ] && cp .carry/engine-bench.xz .lab-g/
cp -r .lab-c/llama2 .lab-g/
du -sh .lab-a .lab-b .lab-c .lab-e .lab-f .lab-g .lab-h
for d in .lab-a .lab-b .lab-c .lab-e .lab-f .lab-g .lab-h; do
    size=$(du -sb "$d" | cut -f1)
    [ "$size" -lt $((62 << 20)) ] || { echo "$d is $size bytes: over what one call carries with the tree" >&2; exit 1; }
done
