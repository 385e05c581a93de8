# syntax=docker/dockerfile:1.7
# The GPU base image (eps-base-gpu): CUDA runtime, Python, torch, vLLM and every dependency of the project
# from images/locks/gpu.txt, but not the project's code. Each GPU stage image (images/<stage>.Dockerfile, generated)
# adds the code and a single entrypoint on top. Caches (Hugging Face, pip, torch, vLLM, Triton) live under /cache,
# a writable volume at run time (emptyDir or a shared PVC on the cluster), never in the image.
#
#   docker buildx bake -f images/docker-bake.json eps-base-gpu

# pinned: CUDA 12.8 runtime on Ubuntu 24.04 (Python 3.12); torch's wheels bring their own CUDA libraries,
# this image brings the user-space pieces that vLLM and Triton expect
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev and gcc: Triton compiles small launchers at run time
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates git python3 python3-dev python3-venv gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# the non-root user every pod runs as (uid 1000 replaces the image's default "ubuntu" user)
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 eps \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash eps \
    && mkdir -p /cache \
    && chown 1000:1000 /cache

RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==25.0.1

# dependencies only, from the lock (the layer is reused until the lock changes): vLLM, the torch it was built
# for and the transformers it admits, every package at its locked version and hash
COPY images/locks/gpu.txt /tmp/eps/lock.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/eps/lock.txt \
    && rm -rf /tmp/eps

ENV HOME=/home/eps \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    PIP_CACHE_DIR=/cache/pip \
    TORCH_HOME=/cache/torch \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    EPS_CACHE=/cache/eps
VOLUME ["/cache"]

USER 1000:1000
WORKDIR /home/eps
ENTRYPOINT ["python"]
