# megatron-rift on NVIDIA's PyTorch container, which already carries CUDA, NCCL, torch, Transformer
# Engine and apex (needed for TE layers and FP8).
#
#   docker build -t megatron-rift .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it -v $PWD/runs:/workspace/runs \
#       megatron-rift torchrun --standalone --nproc-per-node 8 -m megatron_rift.train --help
#
# Written for nvcr.io/nvidia/pytorch:25.09-py3: Python 3.12, CUDA 13.0, torch 2.9.0a0+50eac811a6
# (a pre-release build that megatron-core's torch>=2.6.0 accepts; 25.01's 2.6.0a0 does not), and
# the Transformer Engine that image ships (2.7 in public reports). It installs megatron-core 0.19.2,
# the Python 3.12 leg of the tested matrix (README, "Versions"). scripts/check_docker_resolution.py
# checks these pins against the package metadata without Docker (a test runs it); the image itself
# is not built here (no Docker engine on the development machine). Change the three ARGs together.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}
ARG BASE_IMAGE_TORCH=2.9.0a0+50eac811a6.nv25.09
ARG MEGATRON_CORE_VERSION=0.19.2

WORKDIR /workspace/megatron-rift
COPY pyproject.toml README.md ./
COPY megatron_rift ./megatron_rift
COPY tools ./tools
COPY scripts ./scripts
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

# Keep the container's CUDA torch: pip must not replace it with a wheel from PyPI. A constraints
# file pins the installed version, so the install fails instead of silently swapping torch.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" -e ".[hf,eval]" \
 && python -c "import megatron.core, transformer_engine, megatron_rift; print('ok')"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["megatron-rift", "train", "--help"]
