#!/usr/bin/env bash
# Shared by llava_pretrain.sh and llava_finetune.sh: environment, the main job's run, the launcher.
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"
cd "$LLM2CLIP_ROOT"
RUN_DIR="${LLM2CLIP_RUN_DIR:-runs/tiny}"

# The tiny preset (no --model_name_or_path / --data_path) trains on the main job's run: make sure it exists.
ensure_main_run() {
  local args=" $* "
  if [[ "$args" == *" --model_name_or_path "* || "$args" == *" --model-name-or-path "* \
        || "$args" == *" --data_path "* || "$args" == *" --data-path "* ]]; then
    return 0
  fi
  if [[ ! -f "$RUN_DIR/vision_tower/config.json" || ! -f "$RUN_DIR/clip_vision_tower/config.json" \
        || ! -f "$RUN_DIR/stage1/lm/config.json" || ! -f "$RUN_DIR/data/llava/train_instruct.json" ]]; then
    echo "[llava] the main job's run ($RUN_DIR: towers, tiny LM, LLaVA data) is missing or incomplete;" \
         "running bash scripts/train_llm2clip.sh first"
    bash "$LLM2CLIP_ROOT/scripts/train_llm2clip.sh"
  fi
}

# One process on CPU or one GPU; torchrun over all GPUs otherwise. DeepSpeed is used when a
# --deepspeed config is passed (the scripts pass LLaVA's defaults on GPU machines).
launch() {
  local gpus
  gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
  if (( gpus > 1 )); then
    exec torchrun --nproc_per_node "$gpus" -m llava_integration "$@"
  fi
  exec python -m llava_integration "$@"
}

has_gpu() { python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; }
