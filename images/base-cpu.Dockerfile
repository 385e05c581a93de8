# syntax=docker/dockerfile:1.7
# The CPU base image (eps-base-cpu): Python, the CPU build of torch and every dependency of the project from
# images/locks/cpu.txt (no vLLM), but not the project's code. Each CPU stage image (images/<stage>.Dockerfile,
# generated) adds the code and a single entrypoint on top. Caches live under /cache, a writable volume at run time.
#
#   docker buildx bake -f images/docker-bake.json eps-base-cpu

# pinned: Python 3.11 on Debian 12
FROM python:3.11.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# the CPU wheel of torch keeps several GB of CUDA libraries out of CPU images
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 eps \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash eps \
    && mkdir -p /cache \
    && chown 1000:1000 /cache

RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==25.0.1

# dependencies only, from the lock (the layer is reused until the lock changes): torch first, alone, from the
# CPU index, then every other package at its locked version and hash
COPY images/locks/cpu.txt /tmp/eps/lock.txt
RUN awk '/^torch==/ {on = 1} on {print} on && !/\\$/ {exit}' /tmp/eps/lock.txt > /tmp/eps/torch.txt \
    && pip install --no-cache-dir --no-deps --require-hashes --index-url "$TORCH_INDEX_URL" -r /tmp/eps/torch.txt \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/eps/lock.txt \
    && rm -rf /tmp/eps

ENV HOME=/home/eps \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    PIP_CACHE_DIR=/cache/pip \
    TORCH_HOME=/cache/torch \
    EPS_CACHE=/cache/eps
VOLUME ["/cache"]

USER 1000:1000
WORKDIR /home/eps
ENTRYPOINT ["python"]
