#!/usr/bin/env bash
# The Knowledge-CLIP recipe (arXiv 2412.03513) on the embedded default (configs/tiny.yaml), CPU.
#   bash scripts/train_knowledge_clip.sh [--config FILE] [--set key=value ...] [--force]
# k-means concepts over the cached LLM embeddings -> CLIP fine-tuned with CLIP + distillation +
# concept losses -> attribute probes, zero-shot attributes, CRA and retrieval against the CLIP
# baseline and LLM2CLIP. Reuses the main job's run (cache, pretrained CLIP, baselines) and runs the
# main job first when it is missing. Results: <run.out_dir>/knowledge_clip/results.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"

args=("$@")
[[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/tiny.yaml "${args[@]}")
# --config/--set go to the main job too; --force and --no-progress only to the knowledge step
main_args=()
while (( $# )); do
  case "$1" in
    --config|--set) main_args+=("$1" "$2"); shift 2 ;;
    *) shift ;;
  esac
done
[[ " ${main_args[*]-} " == *" --config "* ]] || main_args=(--config configs/tiny.yaml "${main_args[@]}")
run_dir="$(llm2clip config show "${main_args[@]}" | python -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["run"]["out_dir"])')"
if [[ ! -f "$run_dir/results.json" ]]; then
  echo "[knowledge-clip] the main job's run ($run_dir) is missing or unfinished; running it first"
  llm2clip run "${main_args[@]}"
fi
exec llm2clip knowledge all "${args[@]}"
