#!/usr/bin/env bash
# LLaVA stage 2: instruction tuning ('v1' template): full, LoRA (--lora_enable True, r128/alpha256) or
# QLoRA (--lora_enable True --bits 4, ZeRO-2).
#   bash scripts/llava_finetune.sh          # tiny preset: both towers, same LLM/data/steps, VQA table,
#                                           # runs/tiny/llava/results.json and runs/tiny/llava/hf_export/
#   bash scripts/llava_finetune.sh --vision-tower llm2clip --lora_enable True --bits 4
#   bash scripts/llava_finetune.sh --model_name_or_path lmsys/vicuna-7b-v1.5 --data_path mix665k.json \
#       --image_folder data/ --vision_tower runs/tiny/vision_tower --pretrain_mm_mlp_adapter out/llava-7b-pretrain/mm_projector.bin \
#       --output_dir out/llava-7b-finetune --deepspeed configs/deepspeed/zero3.json
# Pretrained projectors missing for the tiny preset are trained first.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_llava_common.sh"
ensure_main_run "$@"

if (( $# == 0 )); then
  exec python -m llava_integration compare
fi
args=("$@")
if has_gpu && [[ " ${args[*]} " != *" --deepspeed "* ]]; then
  # LLaVA's choice: ZeRO-3 for full and LoRA tuning; 4/8-bit loading needs ZeRO-2 (LLaVA #1692).
  if [[ " ${args[*]} " == *" --bits 4 "* || " ${args[*]} " == *" --bits 8 "* ]]; then
    args+=(--deepspeed configs/deepspeed/zero2.json)
  else
    args+=(--deepspeed configs/deepspeed/zero3.json)
  fi
fi
launch finetune "${args[@]}"
