#!/usr/bin/env bash
# Compile every CUDA kernel source for sm_80 and sm_90 and fail on compile errors or register spills.
# Also builds the C++ CPU twin (the file the CPU tests load). No nvcc: says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
KERNELS=sae_core/kernels
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

if command -v "${CXX:-c++}" >/dev/null; then
    "${CXX:-c++}" -O3 -std=c++17 -shared -fPIC -pthread -Wall -Werror -I"$KERNELS" \
        "$KERNELS/sparse_cpu.cpp" -o "$OUT/sparse_cpu.so"
    echo "compile_kernels: sparse_cpu.cpp OK"
fi

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; fi
if [ -z "$NVCC" ]; then
    echo "compile_kernels: nvcc not found, skipping the CUDA kernels"
    exit 0
fi

status=0
for src in "$KERNELS"/*.cu; do
    log="$OUT/$(basename "$src").log"
    if ! "$NVCC" -O3 -std=c++17 -shared -Xcompiler -fPIC -Xcompiler -Wall -I"$KERNELS" \
        -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
        -Xptxas -v "$src" -o "$OUT/$(basename "$src" .cu).so" >"$log" 2>&1; then
        cat "$log"
        echo "compile_kernels: $src FAILED to compile"
        status=1
        continue
    fi
    spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
    if [ -n "$spills" ]; then
        grep -E "Compiling entry|bytes spill" "$log"
        echo "compile_kernels: $src spills registers"
        status=1
        continue
    fi
    echo "compile_kernels: $src OK ($(grep -c "Compiling entry" "$log") entry points, no spills)"
done
exit $status
