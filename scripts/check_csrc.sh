#!/usr/bin/env bash
# Compile check of csrc/ on a machine without a GPU (and with a CPU build of torch):
#   * csrc/block_attention.cu -> object file with nvcc, for each arch in CSRC_ARCHS
#     (default "80 90"), with the flags torch's JIT build adds (no implicit half conversions);
#   * csrc/bindings.cpp -> object with g++ against torch's headers plus CUDA's include dir (not
#     linked: a CPU torch has no libc10_cuda). The CPU torch wheel lacks
#     c10/cuda/impl/cuda_cmake_macros.h (CUDA builds generate it), so the check defines
#     C10_CUDA_NO_CMAKE_CONFIGURE_FILE; the real build does not need it;
#   * every vllm_twotower:: symbol bindings.o needs is defined by block_attention.o.
# Prints ptxas register/spill lines for the kernels. Exits 0 on success, and also when nvcc is
# absent ("nvcc not found: skipped"). PYTHON picks the interpreter with torch (default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
fi
if [ -z "$NVCC" ]; then
    echo "nvcc not found: skipped"
    exit 0
fi
# nvcc may be a wrapper script: ask it where the toolkit's headers are.
CUDA_INC="${CUDA_HOME:-}/include"
if [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
    CUDA_INC="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
        sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)"
    CUDA_INC="${CUDA_INC%/}"
fi
if [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
    echo "[check_csrc] cannot find the CUDA include dir (set CUDA_HOME)" >&2
    exit 1
fi

PY="${PYTHON:-$ROOT/.venv/bin/python}"
mapfile -t TORCH_INC < <("$PY" -c \
    'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

GENCODE=()
for a in ${CSRC_ARCHS:-80 90}; do
    GENCODE+=(-gencode "arch=compute_$a,code=sm_$a")
done
START=$SECONDS
echo "[check_csrc] nvcc: $($NVCC --version | tail -1)"
echo "[check_csrc] block_attention.cu for sm ${CSRC_ARCHS:-80 90}"
"$NVCC" -std=c++17 -O3 -c csrc/block_attention.cu -o "$TMP/block_attention.o" "${GENCODE[@]}" \
    --threads 0 -Xptxas -v -Werror all-warnings \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    2>"$TMP/ptxas.log" || { cat "$TMP/ptxas.log" >&2; exit 1; }
# One line per kernel: name, arch, registers, spills.
grep -E "Compiling entry|registers|spill" "$TMP/ptxas.log" | { c++filt 2>/dev/null || cat; } |
    sed -E "s/.*entry function '.*::([a-z_]+<[^>]*>)\(.*for '(sm_[0-9]+)'.*/\2 \1/;
            s/ptxas info *: Used ([0-9]+ registers).*/\1/; s/ *[0-9]+ bytes stack frame, //" |
    paste -d' ' - - - || true

echo "[check_csrc] bindings.cpp (compiled, not linked)"
INC=()
for d in "${TORCH_INC[@]}"; do INC+=(-I "$d"); done
"${CXX:-g++}" -std=c++20 -c -fPIC -Wall -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    "${INC[@]}" -I "$CUDA_INC" csrc/bindings.cpp -o "$TMP/bindings.o"
# The two host functions are declared by hand in bindings.cpp: their mangled names (which
# encode the parameter types) must be defined by the kernel's object.
nm --defined-only "$TMP/block_attention.o" | awk '{print $3}' >"$TMP/defined.txt"
MISSING=0
while read -r sym; do
    if ! grep -qx "$sym" "$TMP/defined.txt"; then
        echo "[check_csrc] bindings.cpp needs $sym, block_attention.o does not define it" >&2
        MISSING=1
    fi
done < <(nm --undefined-only "$TMP/bindings.o" | awk '{print $2}' | grep '^_ZN13vllm_twotower')
[ "$MISSING" = 0 ]

echo "[check_csrc] OK in $((SECONDS - START)) s"
