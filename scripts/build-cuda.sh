#!/usr/bin/env bash
# Builds the GPU engine (`--features cuda`, candle-core 0.11.1 CUDA backend + engine/kernels/*.cu)
# on a Debian x86_64 machine WITHOUT a GPU or CUDA install, for H100/H200 (compute capability 9.0)
# machines with NVIDIA driver 580 (CUDA 13.0 driver API).
#
# Usage:  scripts/build-cuda.sh            (from anywhere; the workspace is this script's parent)
#   env:  CUDA_VENV          PyPI CUDA toolchain venv     (default <workspace>/.cache/cuda13)
#         CARGO_TARGET_DIR   cargo target dir             (default <workspace>/target/cuda)
#         CUDA_COMPUTE_CAP   PTX/SASS target              (default 90)
#         SKIP_BUILD=1       set up toolchain + vendored crate only
#         KERNELS_ONLY=1     integration-test binary with only the cuda_kernels module (when other
#                            test modules of the working tree do not compile yet)
#         MIRROR_FROM=<rev>  build a commit (git archive) instead of the working tree
#         IT_MODULES="a b"   integration-test binary with only these modules (e.g. "cuda_kernels cuda_model")
#
# Output: .carry/engine.xz (release server), .carry/engine-bench.xz and .carry/engine-it.xz (the integration-test binary),
# stripped and xz-compressed, to be carried to the GPU machine (see scripts/gpu/).
#
# Why each step (nothing here touches the CPU build, CI, Cargo.toml or Cargo.lock):
#  1. nvcc/headers/static cudart 13.0.2 from PyPI: the driver 580 JITs PTX up to ISA 9.0 (CUDA 13.0)
#     only, and cudarc 0.19 refuses nvcc >= 13.5.
#  2. `-lcudart` (asked for by candle-kernels) resolves through a linker script to libcudart_static.a.
#  3. candle-core 0.11.1 asks cudarc for "dynamic-linking" (-lcuda -lcublas ... at link time, which
#     do not exist here). A copy under .cache/vendor/ asks for "dynamic-loading" instead (dlopen at
#     run time); it is applied with `cargo --config patch...` on the command line.
#  4. A [patch] rewrites Cargo.lock, so the build runs in a mirror of the workspace
#     (.cache/cuda-build/ws, mtimes preserved, so incremental builds stay incremental) and the
#     shared Cargo.lock is never written.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CUDA_VENV=${CUDA_VENV:-$ROOT/.cache/cuda13}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
CANDLE_VERSION=0.11.1
VENDOR=$ROOT/.cache/vendor
MIRROR=$ROOT/.cache/cuda-build/ws
CARRY=$ROOT/.carry

say() { printf '== %s\n' "$*" >&2; }

# ---------------------------------------------------------------- 1. toolchain
if [ ! -x "$CUDA_VENV/cuda/bin/nvcc" ]; then
    say "installing CUDA 13.0.2 toolchain from PyPI into $CUDA_VENV"
    [ -x "$CUDA_VENV/bin/pip" ] || python3 -m venv "$CUDA_VENV"
    "$CUDA_VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,crt,nvvm,cccl]==13.0.2"
    tree=$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    ln -sfn "$tree" "$CUDA_VENV/cuda"
fi
CUDA_HOME=$CUDA_VENV/cuda
nvcc_version=$("$CUDA_HOME/bin/nvcc" --version | tail -1)
case "$nvcc_version" in
    *cuda_13.0.*) say "nvcc: $nvcc_version" ;;
    *) echo "need nvcc 13.0.x, found: $nvcc_version" >&2; exit 1 ;;
esac

# ---------------------------------------------------------------- 2. -lcudart -> static cudart
mkdir -p "$CUDA_VENV/link"
printf '/* linker script: -lcudart resolves to the static CUDA runtime */\nINPUT(%s)\n' \
    "$CUDA_HOME/lib/libcudart_static.a" > "$CUDA_VENV/link/libcudart.so"

# ---------------------------------------------------------------- 3. patched candle-core
if [ ! -f "$VENDOR/candle-core/Cargo.toml" ]; then
    say "vendoring candle-core $CANDLE_VERSION (cudarc dynamic-linking -> dynamic-loading)"
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/candle-core-$CANDLE_VERSION.crate 2>/dev/null | head -1 || true)
    if [ -z "$crate" ]; then
        (cd "$ROOT" && cargo fetch -q)
        crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/candle-core-$CANDLE_VERSION.crate | head -1)
    fi
    mkdir -p "$VENDOR"
    rm -rf "$VENDOR/candle-core" "$VENDOR/candle-core-$CANDLE_VERSION"
    tar xzf "$crate" -C "$VENDOR"
    mv "$VENDOR/candle-core-$CANDLE_VERSION" "$VENDOR/candle-core"
    rm -f "$VENDOR/candle-core/.cargo_vcs_info.json" "$VENDOR/candle-core/.cargo-ok"
    sed -i 's/^    "dynamic-linking",$/    "dynamic-loading",/' "$VENDOR/candle-core/Cargo.toml"
fi
if [ "$(grep -c '"dynamic-loading"' "$VENDOR/candle-core/Cargo.toml")" != 1 ] ||
    grep -q '"dynamic-linking"' "$VENDOR/candle-core/Cargo.toml"; then
    echo "patched candle-core at $VENDOR/candle-core is not as expected; delete it and rerun" >&2
    exit 1
fi
[ "${SKIP_BUILD:-0}" = 1 ] && exit 0

# ---------------------------------------------------------------- 4. mirror + build
# One build at a time: builds share the mirror and the target dir (a caller that already holds
# the lock, e.g. to package the outputs before another build replaces them, sets BUILD_CUDA_LOCKED=1).
if [ "${BUILD_CUDA_LOCKED:-0}" != 1 ]; then
    exec 9>"$ROOT/.cache/build-cuda.lock"
    flock 9
fi
say "mirroring the workspace into $MIRROR"
mkdir -p "$MIRROR"
list=$(mktemp)
if [ -n "${MIRROR_FROM:-}" ]; then
    # A commit instead of the working tree (when others' uncommitted edits do not build): only
    # files whose content differs are replaced, with a fresh mtime, so cargo sees every change.
    say "mirroring commit $MIRROR_FROM instead of the working tree"
    snap=$(mktemp -d)
    (cd "$ROOT" && git archive "$MIRROR_FROM") | (cd "$snap" && tar xf -)
    (cd "$snap" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) > "$list"
    while IFS= read -r f; do
        if ! cmp -s "$snap/$f" "$MIRROR/$f"; then
            mkdir -p "$MIRROR/$(dirname "$f")" && cp "$snap/$f" "$MIRROR/$f"
        fi
    done < "$list"
    rm -rf "$snap"
else
    (cd "$ROOT" && git ls-files -co --exclude-standard | while IFS= read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done | LC_ALL=C sort) > "$list"
    (cd "$ROOT" && tar cf - -T "$list") | (cd "$MIRROR" && tar xpf -)
fi
# drop files deleted from the workspace (keep the mirror's Cargo.lock: it carries the patch)
(cd "$MIRROR" && find . -type f ! -path './Cargo.lock' | sed 's|^\./||' | LC_ALL=C sort) |
    comm -23 - "$list" | (cd "$MIRROR" && xargs -r rm -f)
rm -f "$list"
if [ "${KERNELS_ONLY:-0}" = 1 ] && [ -z "${IT_MODULES:-}" ]; then
    IT_MODULES=cuda_kernels
fi
if [ -n "${IT_MODULES:-}" ]; then
    { printf '//! GPU test modules only (scripts/build-cuda.sh IT_MODULES="%s").\n\n' "$IT_MODULES"
      for m in $IT_MODULES; do printf 'mod %s;\n' "$m"; done; } > "$MIRROR/engine/tests/it/main.rs"
elif [ -f "$MIRROR/engine/tests/it/main.rs" ]; then
    touch "$MIRROR/engine/tests/it/main.rs"  # a restored older mtime would not trigger a rebuild
fi

export NVCC=$CUDA_HOME/bin/nvcc CUDA_HOME CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=$CAP
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} CANDLE_CUDA_LINK_DIR=$CUDA_VENV/link
patch_cfg="patch.crates-io.candle-core.path=\"$VENDOR/candle-core\""
cd "$MIRROR"
say "cargo build --release --features cuda (target $CARGO_TARGET_DIR)"
nice -n 10 cargo --config "$patch_cfg" build --release -p engine --features cuda --bin engine --bin engine-bench
say "cargo test --no-run --release --features cuda --test it"
test_json=$(mktemp)
nice -n 10 cargo --config "$patch_cfg" test --release -p engine --features cuda --test it --no-run \
    --message-format=json-render-diagnostics > "$test_json"
test_bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "it" and m.get("executable"):
        print(m["executable"])' "$test_json" | tail -1)
rm -f "$test_json"
[ -n "$test_bin" ] || { echo "integration-test binary not found" >&2; exit 1; }

# ---------------------------------------------------------------- 5. carry
mkdir -p "$CARRY"
for pair in "$CARGO_TARGET_DIR/release/engine:engine" "$CARGO_TARGET_DIR/release/engine-bench:engine-bench" "$test_bin:engine-it"; do
    src=${pair%%:*} name=${pair##*:}
    strip -o "$CARRY/$name" "$src"
    xz -6 -T2 -f "$CARRY/$name"
done
say "PTX ISA versions in the engine binary (driver 580 needs <= 9.0):"
xz -dc "$CARRY/engine.xz" | strings -n 8 | grep '^\.version' | sort | uniq -c >&2 || true
ls -la "$CARRY" >&2
