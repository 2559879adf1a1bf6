#!/usr/bin/env bash
# The benchmark suite (docs/PERFORMANCE.md): our figures against llm2vec and open_clip, measured in one
# run on this machine. Peer environments are created under runs/bench/peers/ on first use (CI never
# needs them). Extra args go to `python -m benchmarks` (e.g. --quick, --no-peers, --rows encode,vision).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"
exec "$LLM2CLIP_PY" -m benchmarks "$@"
