# The adapterflow image the k8s/ manifests run (Ray head, workers, job submitter):
#   docker build --build-arg VARIANT=cpu -t adapterflow:0.1.0-cpu .    # python slim, torch CPU wheel
#   docker build --build-arg VARIANT=gpu -t adapterflow:0.1.0-cuda .   # CUDA devel base, torch CUDA wheel
# The install steps are scripts/install.sh, the same recipe `make setup` runs (without the test extra
# here). The repository is installed at /app (editable), which is also every Ray job's working copy.
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
# devel: DeepSpeed JIT-builds its CUDA and CPU-Adam ops (ZeRO offload) with nvcc and g++
ARG GPU_BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

FROM ${CPU_BASE} AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# PyPI's Linux torch wheel is the multi-GB CUDA build: take the CPU one from PyTorch's CPU index
ENV TORCH_SPEC=torch==2.13.0+cpu \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    DS_ACCELERATOR=cpu

FROM ${GPU_BASE} AS base-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
# PyPI's Linux torch==2.13.0 wheel is the CUDA build
ENV TORCH_SPEC=torch==2.13.0

FROM base-${VARIANT}
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /app
COPY . /app
RUN bash scripts/install.sh /opt/venv/bin/python \
    && rm -rf /root/.cache/pip
# DeepSpeed's CPU shared-memory collective op, JIT-built once here instead of in every CPU worker
RUN if [ "$VARIANT" = cpu ]; then \
        python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"; \
    fi
CMD ["adapterflow", "--help"]
