#!/usr/bin/env bash
# The CMAKE_ARGS that build llama.cpp (inside llama-cpp-python) for this machine's CPU, printed:
#   CMAKE_ARGS="$(bash scripts/llamacpp-cmake-args.sh)" pip install 'tokenwire[llamacpp]'
# -march=native (GGML_NATIVE) everywhere but on CPUs with AMX flags, where llama.cpp's native build dies with
# SIGILL in its AMX kernels (seen on the Intel Xeon with AVX512-BF16 and AMX): AVX512 on, AMX off there.
# Only llama.cpp's library is built (no tools, examples, tests or multimodal library).
set -euo pipefail
common="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  echo "$common -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
    "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  echo "$common -DGGML_NATIVE=ON"
fi
