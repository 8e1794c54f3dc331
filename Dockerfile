# syntax=docker/dockerfile:1
# inferq worker image. CPU by default; for the GPU image pick a CUDA wheel index:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t inferq:gpu .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERQ_HOME=/data \
    HF_HOME=/data/hf

# a C compiler: the engine builds its CPU kernels (worker/engine/csrc) on first use
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen index (constraints.txt pins torch==2.13.0, which a +cpu / +cuXXX
# local version also matches; .ci/image-deps checks TORCH_VERSION against it).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Then exactly what CI tested: locks/serve.txt pins every other package with its hash
# ([worker,gateway], gptqmodel without the quantization-only packages it declares: `make lock`).
WORKDIR /app
COPY locks/serve.txt locks/serve.txt
RUN pip install --no-deps --require-hashes -r locks/serve.txt
COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 --user-group inferq \
    && mkdir -p /data \
    && chown inferq:inferq /data

USER inferq
# a named volume mounted on /data starts out owned by inferq (copied from the image)
ENTRYPOINT ["inferq"]
CMD ["worker"]
