#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job: the end-to-end CPU demo (RIFT against its
# baselines on a synthetic math task). Extra arguments go to `megatron-rift demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/megatron-rift demo "$@"
