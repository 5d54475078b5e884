#!/usr/bin/env bash
# Create .venv in the repository root and install megatron-rift with its CPU-friendly extras.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# A bare "torch" requirement with no torch installed pulls the multi-GB CUDA build. On a machine
# without a GPU install the pinned CPU build first; GPU images (NVIDIA's PyTorch container) already
# carry torch, so nothing is installed there.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" torch
    else
        "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
    fi
fi
"${PIP[@]}" -e ".[all]" 2>&1 | { grep -v "^WARNING: Location" || true; }
# The import check; Megatron-Core's import-time "no TE/Apex, falling back to torch" warnings are
# expected without a GPU and are left out here.
.venv/bin/python -W "ignore::UserWarning" -c "import torch, megatron.core, megatron_rift; print(f'megatron-rift ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
