#!/usr/bin/env bash
# Set up the environment (idempotent), lint, and run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"
"$LLM2CLIP_PY" -m ruff check --quiet .
exec "$LLM2CLIP_PY" -m pytest "$@"
