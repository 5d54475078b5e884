#!/usr/bin/env bash
# Create a virtual environment in the repository root and install megatron-rift with its CPU-friendly
# extras. Idempotent: a second run only checks what is installed.
#
#   bash scripts/setup_venv.sh                 # Python 3.11, megatron-core 0.16.1 -> .venv/
#   bash scripts/setup_venv.sh --python 3.12   # Python 3.12, megatron-core 0.19.2 -> .venv-py312/
#
# These two legs are the tested version matrix (README, "Versions"); pyproject.toml admits exactly
# that range. MEGATRON_CORE_VERSION overrides the pin of a leg.
set -euo pipefail
cd "$(dirname "$0")/.."
LEG="${1:-}"
if [ "$LEG" = "--python" ]; then LEG="${2:?--python needs a version, e.g. 3.12}"; fi
case "$LEG" in
    "" | 3.11) VENV=.venv; PYTHON="${PYTHON:-python3}"; MCORE="${MEGATRON_CORE_VERSION:-0.16.1}" ;;
    3.12)
        VENV=.venv-py312; MCORE="${MEGATRON_CORE_VERSION:-0.19.2}"
        if [ -z "${PYTHON:-}" ]; then
            # The first interpreter that really is 3.12 (a pyenv shim exists even when 3.12 is
            # not the active pyenv version, and then fails).
            for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python; do
                if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
                    PYTHON="$candidate"; break
                fi
            done
        fi
        PYTHON="${PYTHON:-python3.12}"
        ;;
    *) echo "setup_venv.sh: unknown leg '$LEG' (use --python 3.11 or --python 3.12)" >&2; exit 2 ;;
esac
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup_venv.sh: no Python interpreter '$PYTHON' for leg ${LEG:-3.11} (install it, e.g. pyenv install 3.12, or set PYTHON)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# A bare "torch" requirement with no torch installed pulls the multi-GB CUDA build. On a machine
# without a GPU install the pinned CPU build first (PyPI has it for Python 3.11 here; for 3.12 the
# same version comes as the CUDA build, which runs on the CPU too); GPU images (NVIDIA's PyTorch
# container) already carry torch, so nothing is installed there.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" torch
    else
        "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
    fi
fi
"${PIP[@]}" -e ".[all]" "megatron-core==$MCORE" 2>&1 | { grep -v "^WARNING: Location" || true; }
# The import check; Megatron-Core's import-time "no TE/Apex, falling back to torch" warnings are
# expected without a GPU and are left out here.
"$VENV/bin/python" -W "ignore::UserWarning" -W "ignore::FutureWarning" -c "import importlib.metadata, sys, torch, megatron.core, megatron_rift; mcore = importlib.metadata.version('megatron-core'); print(f'megatron-rift ready ({sys.argv[1]}): Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {mcore}')" "$VENV"
