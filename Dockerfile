# megatron-rift on NVIDIA's PyTorch container, which already carries CUDA, NCCL, torch, Transformer
# Engine and apex (needed for TE layers and FP8).
#
#   docker build -t megatron-rift .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it -v $PWD/runs:/workspace/runs \
#       megatron-rift torchrun --standalone --nproc-per-node 8 -m megatron_rift.train --help
#
# Pick a container release whose torch satisfies pyproject.toml (torch>=2.4) and whose TE works with
# megatron-core 0.16.x (25.01 or newer). Not built in CI here (no Docker engine on the dev machine).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-rift
COPY pyproject.toml README.md ./
COPY megatron_rift ./megatron_rift
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

# Keep the container's CUDA torch: pip must not replace it with a wheel from PyPI. A constraints
# file pins the installed version, so the install fails instead of silently swapping torch.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt -e ".[hf,eval]" \
 && python -c "import megatron.core, transformer_engine, megatron_rift; print('ok')"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["megatron-rift", "train", "--help"]
