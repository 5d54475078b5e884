#!/usr/bin/env bash
# Set up the environment (if needed), run the static checks, then the whole test suite.
#
#   bash scripts/test.sh [PYTEST ARGS]                  # Python 3.11, megatron-core 0.16.1 (.venv)
#   bash scripts/test.sh --python 3.12 [PYTEST ARGS]    # Python 3.12, megatron-core 0.19.2 (.venv-py312)
#
# The static checks, in order (configured in pyproject.toml; any failure stops the run):
#   lint-imports          the import layers and forbidden imports ([tool.importlinter])
#   ruff check            lint ([tool.ruff.lint])
#   ruff format --check   formatting; `.venv/bin/ruff format .` fixes it
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
LEG=()
if [ "${1:-}" = "--python" ]; then
    LEG=(--python "${2:?--python needs a version, e.g. 3.12}")
    [ "$2" = "3.12" ] && VENV=.venv-py312
    shift 2
fi
bash scripts/setup_venv.sh "${LEG[@]}"
"$VENV/bin/lint-imports" --no-cache --no-logo
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest tests --timeout=900 -q "$@"
