"""Command-line arguments with LLaVA's names (llava/train/train.py), parsed by HfArgumentParser.

Both `--vision_tower` and `--vision-tower` spellings work. Defaults follow LLaVA-1.5's scripts where
they differ from train.py's (select layer -2, mlp2x_gelu, LoRA r128/alpha256); unknown flags are errors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
import yaml

from llm2clip.errors import ConfigError

from .data import DataArguments

__all__ = ["DataArguments", "ModelArguments", "TrainingArguments", "validate"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = None  # HF causal LM folder (the tiny preset uses runs/tiny/stage1/lm)
    version: str = "v1"  # conversation template: 'plain' for pretraining, 'v1' for instruction tuning
    freeze_backbone: bool = False  # freeze the LLM (projector-only training)
    tune_mm_mlp_adapter: bool = False  # pretraining: train the projector only, save mm_projector.bin
    vision_tower: str | None = None  # 'llm2clip', 'clip', a folder, or an openai/laion CLIP name
    mm_vision_select_layer: int = -2  # hidden-state index fed to the projector
    mm_vision_select_feature: str = "patch"  # 'patch' drops CLS, 'cls_patch' keeps it
    pretrain_mm_mlp_adapter: str | None = None  # mm_projector.bin / .safetensors from pretraining
    mm_projector_type: str = "mlp2x_gelu"  # 'linear', 'mlp<N>x_gelu' or 'identity'
    mm_use_im_start_end: bool = False  # LLaVA-1.5 uses False; True is not supported
    mm_use_im_patch_token: bool = False  # accepted for LLaVA compatibility (no effect when False)
    mm_patch_merge_type: str = "flat"  # 'flat', or LLaVA-NeXT's 'spatial' / 'spatial_unpad' (+ image_newline)
    unfreeze_mm_vision_tower: bool = False  # train the tower too (gradients follow this flag)
    llm2clip_run_dir: str | None = None  # where 'llm2clip'/'clip' towers are looked up (default runs/tiny)
    attn_implementation: str = "sdpa"  # LLM attention: 'sdpa' or 'eager'
    trust_remote_code: bool = False  # custom model code from the LLM folder runs only if you ask


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    output_dir: str | None = None  # the tiny preset fills it in
    optim: str = "adamw_torch"
    remove_unused_columns: bool = False  # the collator needs every column (images)
    freeze_mm_mlp_adapter: bool = False  # keep the projector frozen during instruction tuning
    model_max_length: int = 2048  # sequences (image tokens included) are truncated to this
    double_quant: bool = True  # QLoRA: bitsandbytes double quantisation
    quant_type: str = "nf4"  # QLoRA: 'nf4' or 'fp4'
    bits: int = 16  # 16 (no quantisation), 8 or 4 (QLoRA: the LLM only, never tower or projector)
    lora_enable: bool = False  # LoRA on every Linear of the LLM except lm_head
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_bias: str = "none"  # peft's bias mode: 'none', 'all' or 'lora_only'
    mm_projector_lr: float | None = None  # separate learning rate for the projector
    mm_vision_tower_lr: float | None = None  # separate learning rate for an unfrozen tower
    group_by_modality_length: bool = False  # batches hold image samples or text-only samples, not both
    group_by_length: bool = False  # batches of similar lengths, less padding (transformers 4.x's flag name)
    report_to: str | list[str] = field(default_factory=lambda: ["none"])  # e.g. tensorboard, wandb
    warmup_ratio: float | None = None  # LLaVA's flag; transformers 5 takes a ratio in warmup_steps

    def __post_init__(self):
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


def validate(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Refuse what we cannot honour before any model is loaded."""
    problems = []
    if not model_args.model_name_or_path:
        problems.append("--model_name_or_path is required (an HF causal LM folder)")
    if not model_args.vision_tower:
        problems.append("--vision_tower is required ('llm2clip', 'clip' or a CLIP folder)")
    if not data_args.data_path:
        problems.append("--data_path is required (a LLaVA JSON list)")
    if not training_args.output_dir:
        problems.append("--output_dir is required")
    if training_args.bits not in (4, 8, 16):
        problems.append(f"--bits {training_args.bits}: use 16, 8 or 4")
    if training_args.bits in (4, 8) and not (training_args.lora_enable or model_args.tune_mm_mlp_adapter):
        problems.append(f"--bits {training_args.bits} quantises the LLM, which then cannot be fully trained; "
                        "add --lora_enable True (QLoRA) or --tune_mm_mlp_adapter True")
    if training_args.quant_type not in ("nf4", "fp4"):
        problems.append(f"--quant_type {training_args.quant_type}: use nf4 or fp4")
    if model_args.mm_use_im_start_end:
        problems.append("--mm_use_im_start_end True is not supported (LLaVA-1.5 uses False)")
    problems += _anyres_problems(model_args, data_args)
    if not 0 <= data_args.max_mismatch_fraction <= 1:
        problems.append("--max_mismatch_fraction must be within [0, 1]")
    deepspeed = training_args.deepspeed
    if deepspeed and training_args.bits in (4, 8) and "zero3" in str(deepspeed):
        problems.append("4/8-bit loading is incompatible with ZeRO-3 (LLaVA #1692): use "
                        "configs/deepspeed/zero2.json for QLoRA")
    if problems:
        raise ConfigError("; ".join(problems))


def _anyres_problems(model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    from .anyres import MERGE_TYPES, parse_grid_pinpoints

    problems = []
    if model_args.mm_patch_merge_type not in MERGE_TYPES:
        problems.append(f"--mm_patch_merge_type {model_args.mm_patch_merge_type}: use one of {', '.join(MERGE_TYPES)}")
    elif model_args.mm_patch_merge_type != "flat" and model_args.mm_vision_select_feature != "patch":
        problems.append(f"--mm_patch_merge_type {model_args.mm_patch_merge_type} lays patches out on a square grid; "
                        "use --mm_vision_select_feature patch (no CLS)")
    if data_args.image_aspect_ratio not in ("square", "pad", "anyres"):
        problems.append(f"--image_aspect_ratio {data_args.image_aspect_ratio}: use 'square', 'pad' or 'anyres'")
    elif data_args.image_aspect_ratio == "anyres" and not data_args.image_grid_pinpoints:
        problems.append("--image_aspect_ratio anyres needs --image_grid_pinpoints, e.g. "
                        "'[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]' for a 336 px tower")
    elif data_args.image_aspect_ratio != "anyres" and data_args.image_grid_pinpoints:
        problems.append("--image_grid_pinpoints only applies with --image_aspect_ratio anyres")
    elif data_args.image_grid_pinpoints:
        try:
            parse_grid_pinpoints(data_args.image_grid_pinpoints, 1)  # the tile size is checked with the tower
        except ConfigError as e:
            problems.append(str(e))
    return problems


def expand_config(argv: list[str]) -> list[str]:
    """`--config preset.yaml` -> the file's `flag: value` pairs as flags, placed first so that flags given
    on the command line win (as in argparse, the last occurrence counts)."""
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file, e.g. configs/llava/llava-1.5-7b_pretrain.yaml")
    path, rest = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    try:
        preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read it as YAML ({type(e).__name__}). Fix the path or "
                          "the file") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of LLaVA flags (flag: value)")
    flags: list[str] = []
    for key, value in preset.items():
        # a list is a flag's several values, but a list of lists (image_grid_pinpoints) is one value
        values = value if isinstance(value, list) and not any(isinstance(v, list) for v in value) else [value]
        flags += [f"--{key}", *(str(v) for v in values)]
    return flags + rest


def parse(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = expand_config(list(sys.argv[1:] if argv is None else argv))
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unknown arguments {rest}; see `python -m llava_integration pretrain --help`")
    return model_args, data_args, training_args
