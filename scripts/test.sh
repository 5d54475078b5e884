#!/usr/bin/env bash
# Set up .venv (if needed), run the static checks, then the whole test suite. Extra arguments go to
# pytest. The static checks, in order (configured in pyproject.toml; any failure stops the run):
#   lint-imports          the import layers and forbidden imports ([tool.importlinter])
#   ruff check            lint ([tool.ruff.lint])
#   ruff format --check   formatting; `.venv/bin/ruff format .` fixes it
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/lint-imports --no-cache --no-logo
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest tests --timeout=900 -q "$@"
