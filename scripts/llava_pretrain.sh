#!/usr/bin/env bash
# LLaVA stage 1: train the projector only ('plain' template, lr 1e-3), on an LLM2CLIP or CLIP tower.
#   bash scripts/llava_pretrain.sh --vision-tower llm2clip        # tiny preset on the main job's run
#   bash scripts/llava_pretrain.sh                                # tiny preset, both towers (llm2clip, clip)
#   bash scripts/llava_pretrain.sh --model_name_or_path lmsys/vicuna-7b-v1.5 --data_path blip_558k.json \
#       --image_folder images/ --vision_tower runs/tiny/vision_tower --output_dir out/llava-7b-pretrain \
#       --per_device_train_batch_size 32 --deepspeed configs/deepspeed/zero2.json
# Flags are LLaVA's (llava/train/train.py; '-' or '_' both work). Writes mm_projector.bin/.safetensors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_llava_common.sh"
ensure_main_run "$@"

args=("$@")
if has_gpu && [[ " ${args[*]-} " != *" --deepspeed "* ]]; then
  args+=(--deepspeed configs/deepspeed/zero2.json)
fi
if [[ " ${args[*]-} " != *" --vision_tower "* && " ${args[*]-} " != *" --vision-tower "* ]]; then
  for tower in llm2clip clip; do python -m llava_integration pretrain --vision_tower "$tower" "${args[@]}"; done
  exit 0
fi
launch pretrain "${args[@]}"
