#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"
exec "$LLM2CLIP_PY" -m pytest "$@"
