#!/usr/bin/env bash
# The main job on the embedded default (configs/tiny.yaml): CPU, no downloaded weights.
#   bash scripts/train_llm2clip.sh [--config FILE] [--set key=value ...]
# Outputs go to <run.out_dir> (runs/tiny by default).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"

args=("$@")
[[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/tiny.yaml "${args[@]}")

echo "== data: the shapes world =="
llm2clip data synth "${args[@]}"
llm2clip data inspect "${args[@]}"

echo "== stage 1: LLM -> caption embedder (pretrain tiny LM, [MNTP], CC fine-tuning, CRA) =="
llm2clip stage1 all "${args[@]}"

cat <<'MSG'
== what is still to come ==
Stage 1 is done (CRA in <run.out_dir>/stage1/cra.json). The embedding cache, stage 2 (CLIP vision
training) and export are not implemented yet (issue #4); this script trains no CLIP until they land.
MSG
