"""Stock LLaVA's on-disk layout (haotian-liu/LLaVA c121f04), so its `load_pretrained_model` and eval
scripts read our outputs, and ours read theirs.

    config.json   model_type 'llava_llama' (LlavaLlamaForCausalLM; 'llava_mistral' for Mistral), the
                  LLM's keys in their 4.x spellings, and every mm_* key LLaVA's config reads, with
                  mm_vision_tower an absolute folder (its build_vision_tower needs os.path.exists)
    full          model.safetensors holds the LLM and the projector as `model.mm_projector.*`
    LoRA          non_lora_trainables.bin keys are PeftModel(LlavaLlamaForCausalLM) names,
                  `base_model.model.model.mm_projector.0.weight` (LLaVA strips `base_model.` then `model.`)
    tower         an unfrozen tower's weights are named as in 4.x: `model.vision_tower.vision_tower.vision_model.*`

LLaVA routes by folder name (llava/model/builder.py:48-52): 'llava' must be in it, and 'lora' for a
LoRA output; `llava_folder_name` says what a name is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llm2clip.portable import canonical_key, load_vision_layout, portable_config

# LM model_type -> (LLaVA's model_type, LLaVA's class). Other families keep their own type: stock LLaVA
# has no class for them, and our loader reads them as they are.
LLAVA_CLASSES = {"llama": ("llava_llama", "LlavaLlamaForCausalLM"),
                 "mistral": ("llava_mistral", "LlavaMistralForCausalLM"),
                 "mpt": ("llava_mpt", "LlavaMptForCausalLM")}
LM_TYPES = {llava: lm for lm, (llava, _) in LLAVA_CLASSES.items()}
PROJECTOR = "model.mm_projector."  # LlavaLlamaModel.mm_projector, seen from LlavaLlamaForCausalLM
TOWER = "model.vision_tower.vision_tower."  # LlavaLlamaModel.vision_tower (CLIPVisionTower).vision_tower
PEFT = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
NEWLINE = "model.image_newline"  # LLaVA-NeXT's LlavaMetaModel.image_newline (spatial_unpad merging)
BASE_KEY = "llava_base_model"  # ours: the LLM a projector-only or LoRA output was trained on


def tower_location(tower) -> str:
    """The tower's folder as an absolute path (stock LLaVA checks os.path.exists), or its hub name."""
    name = tower.vision_tower_name
    return os.path.abspath(name) if os.path.exists(name) else name


def llava_config(lm_config, model, *, projector_only: bool, base: str | None) -> dict:
    """config.json as LLaVA writes it after initialize_vision_modules (llava/train/train.py:917-943)."""
    data = portable_config(lm_config.to_dict())
    data.pop("llm2clip_run_dir", None)  # mm_vision_tower is resolved: the run dir is no longer needed
    # QLoRA trains on a 4-bit copy, but no saved weight is quantised: with this key left in, LLaVA's
    # loader would quantise the base it merges the adapter into (and 4.x may not parse 5.x's fields)
    data.pop("quantization_config", None)
    data.pop("_pre_quantization_dtype", None)
    if data.get("model_type") in LLAVA_CLASSES:
        data["model_type"], architecture = LLAVA_CLASSES[data["model_type"]]
        data["architectures"] = [architecture]
    tower = model.get_vision_tower()
    projector_params = list(model.mm_projector.parameters())
    data.update(
        mm_vision_tower=tower_location(tower), mm_hidden_size=tower.hidden_size,
        mm_vision_select_layer=tower.select_layer, mm_vision_select_feature=tower.select_feature,
        mm_projector_type=data.get("mm_projector_type", "linear"),
        mm_patch_merge_type=data.get("mm_patch_merge_type", "flat"),
        image_aspect_ratio=data.get("image_aspect_ratio", "square"),
        tokenizer_model_max_length=data.get("tokenizer_model_max_length", 2048),
        tokenizer_padding_side=data.get("tokenizer_padding_side", "right"),
        use_mm_proj=True, mm_use_im_start_end=False, mm_use_im_patch_token=False,  # LLaVA-1.5's choice
        tune_mm_mlp_adapter=projector_only,
        freeze_mm_mlp_adapter=bool(projector_params) and not any(p.requires_grad for p in projector_params),
        mm_projector_lr=data.get("mm_projector_lr"), use_cache=True)
    if base:
        data[BASE_KEY] = os.path.abspath(base) if os.path.exists(base) else base
    return data


def write_llava_config(lm_config, model, out: Path, *, projector_only: bool, base: str | None) -> None:
    data = llava_config(lm_config, model, projector_only=projector_only, base=base)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_lm_config(folder: Path, trust_remote_code: bool = False):
    """(the LM's own config, the raw config.json). A 'llava_llama' config is read as the LM's 'llama'
    one, so the LM loads as itself and only the projector's keys are left over."""
    from transformers import AutoConfig

    data = json.loads((folder / "config.json").read_text())
    model_type = data.get("model_type")
    if model_type in LM_TYPES:
        fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
        if "dtype" in fields:
            fields.pop("torch_dtype", None)  # the 4.x spelling of the same value
        return AutoConfig.for_model(LM_TYPES[model_type], **fields), data
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code), data


def tower_state(model, named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Trained tower weights (`vision_tower.vision_tower.*` of our model) under LLaVA's 4.x names."""
    model_class = type(model.get_vision_tower().vision_tower).__name__
    inner = "vision_tower.vision_tower."
    return {prefix + TOWER + canonical_key(model_class, k.removeprefix(inner)): v
            for k, v in named.items() if k.startswith(inner)}


def split_llava_names(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """LLaVA-named weights -> (LM's own, projector's own, our model's tower keys). Takes full-checkpoint
    names (`model.*`, `lm_head.*`) and LoRA non-LoRA names (`base_model.model.model.*`), as
    llava/model/builder.py:76-78 strips them; tower keys come back in the installed transformers' layout."""
    lm, projector, tower = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix(PEFT)
        if key == NEWLINE:  # read by newline_in
            continue
        if key.startswith(PROJECTOR):
            projector[key.removeprefix(PROJECTOR)] = value
        elif key.startswith(TOWER):
            tower["vision_tower.vision_tower." + key.removeprefix(TOWER)] = value
        else:
            lm[key] = value
    return lm, projector, load_vision_layout(tower, "vision_tower.vision_tower.")


def newline_in(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """LLaVA-NeXT's image_newline [D] among LLaVA-named weights (full or non-LoRA names), if there."""
    return next((v for k, v in state.items() if k.removeprefix(PEFT) == NEWLINE), None)


def read_weights(files: list[Path], prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of `prefixes`, from every file (shards of one checkpoint).
    .bin files (stock LLaVA's) are read with weights_only=True: tensors only, no code runs."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".bin":
            weights = torch.load(str(file), map_location="cpu", weights_only=True)
            state.update({k: v for k, v in weights.items() if k.startswith(prefixes)})
            continue
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})  # noqa: SIM118
    return state


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def llava_folder_name(folder: str | Path, lora: bool) -> str | None:
    """What stock LLaVA's name routing (get_model_name_from_path + builder.py:48-52) needs that the
    folder's name lacks, or None."""
    parts = Path(os.path.abspath(folder)).parts
    name = f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") else parts[-1]
    missing = [word for word in ("llava", "lora") if (word == "llava" or lora) and word not in name.lower()]
    return f"'{name}' lacks {' and '.join(repr(w) for w in missing)}: stock LLaVA routes by folder name" \
        if missing else None
