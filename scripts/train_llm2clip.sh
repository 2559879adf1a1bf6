#!/usr/bin/env bash
# The main job on the embedded default (configs/tiny.yaml): CPU, no downloaded weights.
#   bash scripts/train_llm2clip.sh [--config FILE] [--set key=value ...] [--force]
# data -> stage 1 (tiny LM, CC fine-tuning, CRA) -> embedding cache -> CLIP baseline -> LLM2CLIP
# -> retrieval evaluation -> export. Steps whose outputs exist are reused unless --force.
# Outputs go to <run.out_dir> (runs/tiny by default): results.json, plots/, vision_tower/, llm2clip/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"

args=("$@")
[[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/tiny.yaml "${args[@]}")
exec llm2clip run "${args[@]}"
